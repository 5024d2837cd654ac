"""Loading adapters and checking model folders: safetensors only, and every error names the file.

``PeftModel.from_pretrained`` falls back to a pickled ``adapter_model.bin`` (arbitrary code on
load) and reports a corrupt file as a bare ``SafetensorError`` without its path;
``from_pretrained`` of a model folder holding only ``pytorch_model.bin`` says ``no file named
model.safetensors``. :func:`load_adapter` and :func:`check_model_folder` check the files first and
say what is wrong, where, and what to do.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

from .saving import ADAPTER_CONFIG, ADAPTER_WEIGHTS

logger = logging.getLogger(__name__)

__all__ = [
    "AdapterLoadError",
    "ModelFilesError",
    "check_adapter_folder",
    "check_model_folder",
    "check_model_weights",
    "check_safetensors_file",
    "load_adapter",
    "peft_wrapping_warnings_silenced",
    "resolve_adapter",
]

#: Pickle weight files (``torch.load``) odedit-hf never loads.
PICKLE_ADAPTER = "adapter_model.bin"
PICKLE_MODEL_FILES = (
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "tf_model.h5",
    "flax_model.msgpack",
)


@contextlib.contextmanager
def peft_wrapping_warnings_silenced() -> Iterator[None]:
    """Silence, for the block, the one warning every ``get_peft_model`` / ``PeftModel.from_pretrained``
    prints that a user can do nothing about: transformers 5 deprecates
    ``PreTrainedModel.is_gradient_checkpointing``, which ``PeftModel.__init__`` still reads. Matched by
    message, category and the module that raises it (``transformers.modeling_utils``), nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"`is_gradient_checkpointing` is deprecated",
            category=FutureWarning,
            module=r"transformers\.modeling_utils",
        )
        yield


class AdapterLoadError(ValueError):
    """An adapter that cannot be loaded; the message names the file and what to do."""


class ModelFilesError(ValueError):
    """A model folder whose files cannot be loaded; the message names the file and what to do."""


def check_safetensors_file(path: str, *, error: type[ValueError] = ValueError) -> list[str]:
    """Open the safetensors file's header (cheap: no tensor is read) and return its tensor names.

    The header check catches truncated and corrupt files: safetensors verifies that the header's
    offsets cover the file exactly.

    Raises:
        ``error``: the file is unreadable, naming it and saying what to do.
    """
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            return list(handle.keys())
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...: all mean "unreadable file"
        raise error(
            f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc}); it is probably "
            "truncated or corrupt (an interrupted copy or download): copy, download or save it again"
        ) from None


# ------------------------------------------------------------------------------------------- adapters
def check_adapter_folder(folder: str) -> dict[str, Any]:
    """Check an adapter folder: a parseable ``adapter_config.json`` and a readable
    ``adapter_model.safetensors`` (a pickle ``adapter_model.bin`` is refused). Returns the config dict.

    Raises:
        AdapterLoadError: missing, pickled or corrupt files, named.
    """
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise AdapterLoadError(f"adapter {folder}: no such folder")
    config_path = os.path.join(folder, ADAPTER_CONFIG)
    if not os.path.isfile(config_path):
        raise AdapterLoadError(
            f"adapter {folder}: no {ADAPTER_CONFIG} in it; give the folder that "
            "PeftModel.save_pretrained / 'odedit-hf edit --save-adapter' wrote"
        )
    try:
        with open(config_path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterLoadError(
            f"{config_path} is not valid JSON ({exc}); save or download the adapter again"
        ) from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise AdapterLoadError(f"{config_path} has no 'peft_type': it is not a PEFT adapter config")
    weights = os.path.join(folder, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        pickle = os.path.join(folder, PICKLE_ADAPTER)
        if os.path.isfile(pickle):
            raise AdapterLoadError(
                f"adapter {folder}: its weights are a pickle ({PICKLE_ADAPTER}), which odedit-hf does not load "
                "(unpickling can run arbitrary code); if you trust its origin, convert it once with "
                "torch.load + safetensors.torch.save_file to adapter_model.safetensors, or re-save the adapter "
                "with save_pretrained (safetensors is its default)"
            )
        raise AdapterLoadError(f"adapter {folder}: no {ADAPTER_WEIGHTS} in it; save the adapter again")
    check_safetensors_file(weights, error=AdapterLoadError)
    return config


def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~", "/"))


def resolve_adapter(
    path_or_repo: str | os.PathLike[str], *, revision: str | None = None, token: str | None = None
) -> str:
    """The local folder of an adapter: ``path_or_repo`` itself, or -- for a Hub repo id (``org/name``)
    that is not a local folder -- its ``adapter_config.json``, ``adapter_model.safetensors`` and
    model card downloaded into the Hub cache (never a pickle).

    Raises:
        AdapterLoadError: no such folder, or the download failed (the message says why).
    """
    text = os.fspath(path_or_repo)
    if os.path.isdir(text):
        return os.path.abspath(text)
    if not _looks_like_repo_id(text):
        raise AdapterLoadError(
            f"adapter {text!r}: no such folder (and not a Hub repo id of the form org/name)"
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        config = hf_hub_download(text, ADAPTER_CONFIG, revision=revision, token=token)
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, auth: all reported the same way
        raise AdapterLoadError(
            f"adapter {text!r}: not a local folder, and its {ADAPTER_CONFIG} could not be fetched from the Hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); check the repo id, "
            "the network (HF_HUB_OFFLINE) and your token"
        ) from None
    try:
        hf_hub_download(text, ADAPTER_WEIGHTS, revision=revision, token=token)
    except EntryNotFoundError:
        raise AdapterLoadError(
            f"adapter {text!r} on the Hub has no {ADAPTER_WEIGHTS}; odedit-hf loads safetensors adapters only "
            "(ask its author to re-save it with save_pretrained, whose default is safetensors)"
        ) from None
    except Exception as exc:  # noqa: BLE001
        raise AdapterLoadError(
            f"adapter {text!r}: downloading {ADAPTER_WEIGHTS} failed ({type(exc).__name__}: {exc})"
        ) from None
    folder = os.path.dirname(config)
    try:
        hf_hub_download(text, "README.md", revision=revision, token=token)
    except Exception:  # noqa: BLE001 - the card is optional
        logger.debug("adapter %s has no model card", text)
    return folder


def load_adapter(
    model: Any,
    path_or_repo: str | os.PathLike[str],
    *,
    adapter_name: str = "default",
    is_trainable: bool = False,
    revision: str | None = None,
    token: str | None = None,
) -> Any:
    """Load a saved adapter onto ``model`` and return the ``PeftModel`` -- safetensors only.

    ``path_or_repo`` is an adapter folder (``odedit-hf edit --save-adapter``, ``save_pretrained``) or a
    Hub repo id. Every odedit-hf PEFT type (``FTL``, ``ODEDIT``, ...) is registered first, so this
    works whichever odedit-hf modules were imported. ``model`` must be a plain transformers model
    (``get_peft_model`` and ``PeftModel.from_pretrained`` modify it in place: load each adapter onto a
    fresh copy).

    Raises:
        AdapterLoadError: missing, pickled or corrupt files (named), an unknown PEFT type, or a model
            that already carries adapters.
    """
    from odedit_hf._registration import import_method_packages

    if hasattr(model, "peft_config"):
        raise AdapterLoadError(
            "load_adapter: the model already carries PEFT adapters (get_peft_model / from_pretrained modify "
            "the model in place); load the base model again and pass the fresh copy"
        )
    folder = resolve_adapter(path_or_repo, revision=revision, token=token)
    config = check_adapter_folder(folder)
    import_method_packages()
    from peft import PeftModel
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    types = [config["peft_type"]] + (
        [config["editor"]["peft_type"]]
        if isinstance(config.get("editor"), dict) and "peft_type" in config["editor"]
        else []
    )
    for peft_type in types:
        if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
            raise AdapterLoadError(
                f"{os.path.join(folder, ADAPTER_CONFIG)}: PEFT type {peft_type!r} is not registered with peft "
                "(neither a peft method nor an odedit-hf one); install the package that defines it"
            )
    try:
        with peft_wrapping_warnings_silenced():
            return PeftModel.from_pretrained(
                model, folder, adapter_name=adapter_name, is_trainable=is_trainable
            )
    except (KeyError, RuntimeError) as exc:
        raise AdapterLoadError(
            f"adapter {folder} does not fit this model ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "load it onto the base model it was made for (its adapter_config.json names it in "
            "base_model_name_or_path)"
        ) from None


# ----------------------------------------------------------------------------------------- models
def check_model_folder(folder: str, *, weights: bool = True) -> None:
    """Check a local model folder before ``from_pretrained``: ``config.json`` present and (``weights``)
    weights in safetensors (a folder with only pickle weights is refused), every ``*.safetensors``
    readable.

    Raises:
        ModelFilesError: what is missing or broken, the file, and what to do.
    """
    folder = os.path.abspath(folder)
    names = set(os.listdir(folder))
    if "config.json" not in names:
        hint = ""
        if "world_info.json" in names and "model" in names:
            hint = f"; this is a world folder: its model is {os.path.join(folder, 'model')}"
        elif "adapter_config.json" in names:
            hint = "; this is an adapter folder: pass the base model as --model and this folder as --adapter"
        raise ModelFilesError(
            f"{folder} has no config.json, so it is not a saved transformers model (save one with "
            f"model.save_pretrained(folder)){hint}"
        )
    if weights:
        check_model_weights(folder)


def check_model_weights(folder: str) -> None:
    """The weights part of :func:`check_model_folder`.

    Raises:
        ModelFilesError: no safetensors weights (pickle only, or none), or an unreadable file (named).
    """
    folder = os.path.abspath(folder)
    names = set(os.listdir(folder))
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    if not shards:
        pickles = sorted(n for n in names if n in PICKLE_MODEL_FILES or n.startswith("pytorch_model-"))
        if pickles:
            raise ModelFilesError(
                f"{folder} holds its weights only as {', '.join(pickles)}, which odedit-hf does not load "
                "(pickle files can run arbitrary code); if you trust its origin, convert it once: "
                "load it with from_pretrained(folder, use_safetensors=False) and save it again with "
                "save_pretrained (safetensors is the default)"
            )
        raise ModelFilesError(
            f"{folder} holds no weights (no *.safetensors file); save the model there with save_pretrained"
        )
    for name in shards:
        check_safetensors_file(os.path.join(folder, name), error=ModelFilesError)

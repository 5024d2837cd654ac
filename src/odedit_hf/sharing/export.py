"""Plain artefacts of an edit that stock libraries load without odedit-hf.

- :func:`export_merged`: the base model with the adapter merged into its weights, saved with
  ``save_pretrained`` (safetensors): ``transformers`` alone loads it. Always possible for an editor
  whose adapter merges (every editor layer implements ``merge``).
- :func:`export_plain_adapter`: an adapter of a *stock* PEFT type. A wrapper method (ODEdit, ...)
  changes only the objective of an edit; its adapter layers and state dict are exactly those of the
  editor it wraps, so an ``odedit+lora`` adapter *is* a LoRA adapter once its config is the nested
  ``LoraConfig``. An adapter whose layers are odedit-hf's own (FT-L, ...) has no stock equivalent:
  export it merged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

from odedit_hf.editing.saving import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    default_mode,
    write_bytes_atomic,
)

logger = logging.getLogger(__name__)

__all__ = [
    "check_export_target",
    "export_merged",
    "export_plain_adapter",
    "is_stock_peft_type",
    "plain_adapter_config",
]


def is_stock_peft_type(peft_type: str) -> bool:
    """Whether ``peft_type`` is one of peft's own methods (loadable without odedit-hf)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    config_class = PEFT_TYPE_TO_CONFIG_MAPPING.get(str(peft_type))
    return config_class is not None and config_class.__module__.split(".")[0] == "peft"


def plain_adapter_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The adapter config that stock peft loads for the same weights.

    A stock config is returned as is; a wrapper's config (one with a nested ``editor`` config) gives
    the nested config, carrying the outer bookkeeping fields (base model, task type, inference mode).

    Raises:
        ValueError: the adapter's layers are odedit-hf's own, naming its type and pointing at the merged export.
    """
    peft_type = str(config.get("peft_type"))
    if is_stock_peft_type(peft_type):
        return dict(config)
    editor = config.get("editor")
    if isinstance(editor, Mapping) and "peft_type" in editor:
        inner = str(editor["peft_type"])
        if is_stock_peft_type(inner):
            plain = dict(editor)
            for key in ("base_model_name_or_path", "revision", "task_type", "inference_mode"):
                if key in config:
                    plain[key] = config[key]
            return plain
        raise ValueError(
            f"this {peft_type} adapter wraps a {inner} adapter, whose layers are odedit-hf's own: stock peft cannot "
            "load them; export the merged model instead (odedit-hf export ... --format merged)"
        )
    raise ValueError(
        f"the {peft_type} adapter's layers are odedit-hf's own: stock peft cannot load them; export the merged "
        "model instead (odedit-hf export ... --format merged)"
    )


def check_export_target(out: str, overwrite: bool = False) -> str:
    """Check that an export may be written to ``out``; return its absolute path.

    Raises:
        ValueError: ``out`` is a file, or a non-empty folder without ``overwrite``.
    """
    target = os.path.abspath(os.fspath(out))
    if os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(f"export target {target} is a file; give a folder path")
    if os.path.isdir(target) and os.listdir(target) and not overwrite:
        raise ValueError(
            f"export target {target} is not empty; give a new or empty folder (or overwrite=True / --overwrite)"
        )
    return target


def _publish(tmp: str, target: str) -> None:
    """Move the finished folder ``tmp`` to ``target`` (replacing it), with the umask's mode."""
    os.chmod(tmp, default_mode(directory=True))
    parent = os.path.dirname(target)
    if os.path.isdir(target):
        old = tempfile.mkdtemp(prefix=".export-old-", dir=parent)
        os.replace(target, os.path.join(old, "x"))
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def export_plain_adapter(adapter_dir: str, out: str, *, overwrite: bool = False) -> str:
    """Write a stock-peft adapter folder of the same edit to ``out`` (see :func:`plain_adapter_config`).

    The weights file is copied unchanged (a wrapper's state dict is its editor's); the config is the
    stock one. Written atomically; ``overwrite`` replaces a non-empty ``out``.

    Returns:
        The absolute path written.

    Raises:
        ValueError / AdapterLoadError: a broken adapter (named), or one with no stock equivalent.
    """
    from odedit_hf.editing.loading import check_adapter_folder

    config = plain_adapter_config(check_adapter_folder(adapter_dir))
    target = check_export_target(out, overwrite)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        shutil.copyfile(os.path.join(adapter_dir, ADAPTER_WEIGHTS), os.path.join(tmp, ADAPTER_WEIGHTS))
        os.chmod(os.path.join(tmp, ADAPTER_WEIGHTS), default_mode())
        write_bytes_atomic(os.path.join(tmp, ADAPTER_CONFIG), (json.dumps(config, indent=2) + "\n").encode())
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def export_merged(
    model: Any, adapter: str, out: str, *, processor: Any = None, overwrite: bool = False
) -> str:
    """Merge the adapter into ``model`` and save the result (and ``processor``) to ``out``.

    Args:
        model: the plain base model (transformers); it is modified in place (merged).
        adapter: the adapter folder or Hub repo id (loaded with :func:`odedit_hf.editing.load_adapter`).
        out: the folder to write (atomically); ``from_pretrained(out)`` loads it with transformers alone.
        processor: the model's processor or tokenizer, saved beside it.
        overwrite: replace a non-empty ``out``.

    Returns:
        The absolute path written.

    Raises:
        ValueError: a broken adapter, an editor whose layers cannot merge, or ``out`` in the way.
    """
    from odedit_hf.editing.loading import load_adapter

    target = check_export_target(out, overwrite)
    peft_model = load_adapter(model, adapter)
    try:
        merged = peft_model.merge_and_unload()
    except (NotImplementedError, ValueError) as exc:
        raise ValueError(f"the adapter {adapter} cannot be merged into the model: {exc}") from None
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        merged.save_pretrained(tmp)  # safetensors (transformers 5 writes nothing else)
        if processor is not None:
            processor.save_pretrained(tmp)
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

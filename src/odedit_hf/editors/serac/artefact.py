"""SERAC's trained artefact: a safetensors folder with the classifier and the counterfactual deltas.

Layout of ``DIR``:

- ``serac_weights.safetensors``: ``classifier.proj_w`` ``(D, H)``, ``classifier.proj_b`` ``(D,)``,
  ``classifier.log_scale`` ``()``, the copy head ``cf_head.copy_q`` / ``copy_k`` / ``gate_w`` / ``gate_b``
  (when it has one), and per counterfactual linear module ``cf.<module name>.A`` / ``.B``;
- ``serac_config.json``: ``format`` (:data:`ARTEFACT_FORMAT`), ``architecture`` (the adapter's shape:
  rank, alpha, proj_dim, hidden_size, cls_layer, similarity, embedding_module, cf_modules), ``threshold``,
  ``base_model`` (:func:`base_identity`), ``training`` (the training config and arguments) and
  ``history`` (the Trainer's log: the validation curve).

The base model's identity is its ``name_or_path``, the SHA-256 of its config (volatile keys -- the path,
dtype, transformers version, ``use_cache`` -- left out) and a fingerprint of its input embedding (a strided
sample of the weights rounded to bfloat16, so an fp32 and a bf16 load of one model agree). An artefact is
refused by a model whose config hash or fingerprint differs (:func:`check_identity`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "ARTEFACT_FORMAT",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "Architecture",
    "base_identity",
    "check_identity",
    "load_artefact",
    "save_artefact",
]

ARTEFACT_FORMAT = "odedit-hf/serac/1"
CONFIG_NAME = "serac_config.json"
WEIGHTS_NAME = "serac_weights.safetensors"
_VOLATILE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache", "_commit_hash"}


@dataclass
class Architecture:
    """The shape of a SERAC adapter (what :class:`~.config.SERACConfig` needs besides the threshold)."""

    embedding_module: str
    cf_modules: list[str]
    hidden_size: int
    rank: int = 16
    alpha: float = 32.0
    proj_dim: int = 64
    copy_dim: int = 32
    cls_layer: int = -1
    pooling: str = "mean"
    similarity: str = "l2"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "embedding_module": self.embedding_module,
            "cf_modules": list(self.cf_modules),
            "hidden_size": self.hidden_size,
            "rank": self.rank,
            "alpha": self.alpha,
            "proj_dim": self.proj_dim,
            "copy_dim": self.copy_dim,
            "cls_layer": self.cls_layer,
            "pooling": self.pooling,
            "similarity": self.similarity,
        }


def _strip(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _strip(v) for k, v in sorted(value.items()) if k not in _VOLATILE}
    if isinstance(value, (list, tuple)):
        return [_strip(v) for v in value]
    return value


def base_identity(model: nn.Module) -> dict[str, str]:
    """``{"name_or_path", "config_sha256", "weights_fingerprint"}`` of a transformers model (see the module
    docstring)."""
    config = model.config
    name = str(getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "") or "")
    text = json.dumps(_strip(config.to_dict()), sort_keys=True, default=str)
    weight = model.get_input_embeddings().weight.detach().flatten()
    sample = weight[:: max(1, weight.numel() // 65536)].to(torch.bfloat16).to(torch.float32).cpu()
    digest = hashlib.sha256(sample.numpy().tobytes())
    digest.update(str(tuple(model.get_input_embeddings().weight.shape)).encode())
    return {
        "name_or_path": name,
        "config_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "weights_fingerprint": digest.hexdigest(),
    }


def check_identity(saved: Mapping[str, Any], model: nn.Module, where: str) -> None:
    """Raise ``ValueError`` when the artefact at ``where`` was trained for another base model than ``model``."""
    current = base_identity(model)
    for key, what in (("config_sha256", "config"), ("weights_fingerprint", "input-embedding weights")):
        if saved.get(key) != current[key]:
            raise ValueError(
                f"SERAC: the editor weights at {where} were trained for another base model "
                f"({saved.get('name_or_path') or 'unnamed'!r}; its {what} differ from those of "
                f"{current['name_or_path'] or 'the given model'!r}). Train SERAC for this model "
                "(odedit_hf.editors.serac.train_serac / odedit-hf train-editor --method serac) and pass that folder"
            )
    if saved.get("name_or_path") != current["name_or_path"]:
        logger.info(
            "SERAC: editor weights trained on %r, used with %r (same config and weights)",
            saved.get("name_or_path"),
            current["name_or_path"],
        )


def save_artefact(
    out_dir: str,
    architecture: Architecture,
    tensors: Mapping[str, torch.Tensor],
    *,
    threshold: float,
    identity: Mapping[str, str],
    training: Mapping[str, Any],
    history: list[dict[str, Any]],
) -> str:
    """Write the artefact folder atomically (a sibling temporary folder renamed over ``out_dir``)."""
    from safetensors.torch import save_file

    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".serac-")
    try:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, os.path.join(tmp, WEIGHTS_NAME)
        )
        meta = {
            "format": ARTEFACT_FORMAT,
            "architecture": architecture.to_dict(),
            "threshold": threshold,
            "base_model": dict(identity),
            "training": dict(training),
            "history": history,
        }
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, default=str)
        if os.path.isdir(out_dir):
            old = tempfile.mkdtemp(dir=parent, prefix=".serac-old-")
            os.replace(out_dir, os.path.join(old, "x"))
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_artefact(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(meta, tensors)`` of an artefact folder; ``ValueError`` with what is missing otherwise."""
    from safetensors.torch import load_file

    config_path, weights_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(config_path) or not os.path.isfile(weights_path):
        raise ValueError(
            f"SERAC: {path!r} is not a SERAC artefact folder (needs {CONFIG_NAME} and {WEIGHTS_NAME}); "
            "train one with odedit_hf.editors.serac.train_serac (odedit-hf train-editor --method serac)"
        )
    try:
        with open(config_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"SERAC: {config_path} is not readable JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != ARTEFACT_FORMAT:
        raise ValueError(
            f"SERAC: {config_path} has format {meta.get('format') if isinstance(meta, dict) else None!r}, "
            f"expected {ARTEFACT_FORMAT!r}; retrain with this version of odedit-hf"
        )
    return meta, load_file(weights_path)


def architecture_from(meta: Mapping[str, Any]) -> Architecture:
    arch = dict(meta["architecture"])
    return Architecture(
        **{k: arch[k] for k in Architecture.__dataclass_fields__ if k in arch and k != "extra"}
    )

"""Editing: the :class:`EditMethod` protocol, the per-edit loop, the shared loss, rollback checks,
and the plain editors (FT-L, LoRA) as methods.

Importing this package imports neither peft's tuners nor any editor: methods are built lazily by
name with :func:`get_method`.
"""

from __future__ import annotations

from .loop import EditLoopConfig, run_edit_loop
from .loss import LossFn, model_inputs, nll_from_logits, target_nll
from .methods import (
    FTMethod,
    LoRAMethod,
    available_methods,
    get_method,
    model_device,
    register_method,
    trainable_parameters,
)
from .protocol import EditMethod, EditStats
from .rollback import AdapterSnapshot, BaseWeights, RollbackError, hash_tensors
from .samples import EVAL_SAMPLE_NAMES, edit_sample, edit_samples, eval_samples

__all__ = [
    "EVAL_SAMPLE_NAMES",
    "AdapterSnapshot",
    "BaseWeights",
    "EditLoopConfig",
    "EditMethod",
    "EditStats",
    "FTMethod",
    "LoRAMethod",
    "LossFn",
    "RollbackError",
    "available_methods",
    "edit_sample",
    "edit_samples",
    "eval_samples",
    "get_method",
    "hash_tensors",
    "model_device",
    "model_inputs",
    "nll_from_logits",
    "register_method",
    "run_edit_loop",
    "target_nll",
    "trainable_parameters",
]

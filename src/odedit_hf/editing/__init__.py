"""Editing: the editor contract (:class:`Editor` and its hooks), the one per-edit loop, the shared
loss, rollback checks, method discovery (:func:`get_method`), and -- imported lazily, as they need
peft -- the generic wrapper (:mod:`.wrapper`), the environment batches (:mod:`.environments`),
atomic saving (:mod:`.saving`) and safetensors-only adapter loading (:func:`load_adapter`).

Importing this package imports neither peft's tuners nor any method: methods are folders under
``odedit_hf/editors/`` and ``odedit_hf/methods/``, built by name with :func:`get_method`.
"""

from __future__ import annotations

import importlib
from typing import Any

from .editor import (
    ConstrainedLayer,
    Editor,
    FFNEditor,
    NLLObjective,
    apply_constraints,
    model_device,
    trainable_parameters,
)
from .loop import EditDivergedError, EditLoopConfig, StepObjective, run_edit_loop
from .loss import LossFn, model_inputs, nll_from_logits, target_nll
from .protocol import EditMethod, EditStats
from .registry import (
    DEFAULT_METHOD,
    available_methods,
    build_method,
    get_method,
    method_class,
    split_method_name,
)
from .rollback import AdapterSnapshot, BaseWeights, RollbackError, hash_tensors
from .samples import EVAL_SAMPLE_NAMES, edit_sample, edit_samples, eval_samples

_LAZY = {
    "Wrapper": "wrapper",
    "WrapperConfig": "wrapper",
    "WrapperModel": "wrapper",
    "EditBatch": "environments",
    "GROUPS": "environments",
    "build_edit_batch": "environments",
    "run_groups": "environments",
    "save_adapter": "saving",
    "check_adapter_target": "saving",
    "write_bytes_atomic": "saving",
    "load_adapter": "loading",
    "resolve_adapter": "loading",
    "check_adapter_folder": "loading",
    "check_model_folder": "loading",
    "AdapterLoadError": "loading",
    "ModelFilesError": "loading",
}

__all__ = [
    "DEFAULT_METHOD",
    "EVAL_SAMPLE_NAMES",
    "AdapterLoadError",
    "ModelFilesError",
    "GROUPS",
    "AdapterSnapshot",
    "BaseWeights",
    "ConstrainedLayer",
    "EditBatch",
    "EditDivergedError",
    "EditLoopConfig",
    "EditMethod",
    "EditStats",
    "Editor",
    "FFNEditor",
    "LossFn",
    "NLLObjective",
    "RollbackError",
    "StepObjective",
    "Wrapper",
    "WrapperConfig",
    "WrapperModel",
    "apply_constraints",
    "available_methods",
    "build_edit_batch",
    "build_method",
    "check_adapter_folder",
    "check_adapter_target",
    "check_model_folder",
    "edit_sample",
    "edit_samples",
    "eval_samples",
    "get_method",
    "hash_tensors",
    "load_adapter",
    "method_class",
    "model_device",
    "model_inputs",
    "nll_from_logits",
    "resolve_adapter",
    "run_edit_loop",
    "run_groups",
    "save_adapter",
    "split_method_name",
    "target_nll",
    "trainable_parameters",
    "write_bytes_atomic",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)

"""ODEdit: invariant trajectory learning around any base editor (arXiv 2601.19700).

``ODEditConfig`` (PEFT type ``ODEDIT``) wraps an editor's config; the risks, the IRM-TV penalty and the
lambda network are plain functions/modules; ``ODEditMethod`` runs the per-edit primal-dual loop and
``ODEditTrainer`` the same loss under ``transformers.Trainer``.

Attributes load lazily so that ``import odedit_hf`` (which imports ``registration`` only) stays free of
torch and peft; ``ODEDIT`` is registered with peft as soon as peft is imported.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "EditBatch",
    "LambdaNetwork",
    "ODEditConfig",
    "ODEditMethod",
    "ODEditModel",
    "ODEditObjective",
    "ODEditTrainer",
    "ODEditTrainingArguments",
    "add_odedit_arguments",
    "irm_tv_penalty",
    "method_from_args",
    "odedit_method",
    "save_adapter",
]

_EXPORTS: dict[str, str] = {
    "ODEditConfig": "config",
    "ODEditModel": "model",
    "LambdaNetwork": "lambda_net",
    "irm_tv_penalty": "penalty",
    "EditBatch": "risks",
    "ODEditMethod": "method",
    "ODEditTrainer": "trainer",
    "ODEditTrainingArguments": "trainer",
    "add_odedit_arguments": "cli_args",
    "method_from_args": "cli_args",
    "odedit_method": "method",
    "save_adapter": "cli_args",
    "ODEditObjective": "objective",
}


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

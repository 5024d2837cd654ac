"""Sharing edits: a model card generated from the results file, pushing an adapter to the Hub, and
exporting plain artefacts that stock libraries load without odedit-hf (a merged model; a plain
adapter where the edit's maths is a stock PEFT method, e.g. LoRA).

Nothing here imports torch, peft or huggingface_hub at import time.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "edited_facts": "card",
    "model_card": "card",
    "resolve_base_model": "card",
    "check_repo_id": "hub",
    "push_adapter": "hub",
    "check_export_target": "export",
    "export_merged": "export",
    "export_plain_adapter": "export",
    "plain_adapter_config": "export",
    "is_stock_peft_type": "export",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)

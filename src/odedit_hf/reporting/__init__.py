"""Looking at results: figures (matplotlib, the ``extras`` extra) and a self-contained HTML page made
from one or more results files (``odedit-hf edit --out``).

Nothing here imports matplotlib at import time; :func:`write_report` does, and says how to install
it when it is missing.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ResultsRun": "data",
    "load_results": "data",
    "metric_bars": "figures",
    "sequential_curves": "figures",
    "outcome_strips": "figures",
    "write_report": "page",
    "Projection": "projection",
    "hidden_state_projection": "projection",
    "projection_figure": "projection",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)

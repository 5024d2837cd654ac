"""GRACE: a growing codebook of (key, value, radius, label) entries at one layer, as a PEFT adapter
(Hartvigsen et al., "Aging with GRACE", NeurIPS 2023).

One name everywhere: folder ``grace``, method ``grace``, PEFT type ``GRACE``, prefix ``grace_``.
Importing this package registers the PEFT type ``GRACE`` with peft, so ``get_peft_model(model,
GRACEConfig(...))`` and ``PeftModel.from_pretrained(model, path)`` work on GRACE adapters (a grown
codebook loads into a fresh model at its saved size).
"""

from __future__ import annotations

from odedit_hf.editing.peft_types import extend_peft_type, register_peft_type

extend_peft_type("GRACE")  # before .config: GRACEConfig.__post_init__ sets peft_type = PeftType.GRACE

from .config import REPLACEMENTS, VALUE_INITS, GRACEConfig  # noqa: E402
from .layer import GRACELayer, Linear  # noqa: E402
from .method import EXPAND_SLACK, GRACEMethod, GRACESnapshot, grace_layers  # noqa: E402
from .model import GRACEModel  # noqa: E402

__all__ = [
    "EXPAND_SLACK",
    "METHOD",
    "REPLACEMENTS",
    "VALUE_INITS",
    "GRACEConfig",
    "GRACELayer",
    "GRACEMethod",
    "GRACEModel",
    "GRACESnapshot",
    "Linear",
    "grace_layers",
]

register_peft_type(name="grace", config_cls=GRACEConfig, model_cls=GRACEModel, prefix="grace_")

#: The method of this folder (``get_method("grace")``).
METHOD = GRACEMethod

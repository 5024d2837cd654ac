"""T-Patcher: patch neurons added to the last FFN, one per wrong target token, as a growing PEFT adapter.

One name everywhere: folder ``tpatcher``, method ``tpatcher``, PEFT type ``TPATCHER``, prefix
``tpatcher_``. Importing this package registers the PEFT type ``TPATCHER`` with peft, so
``get_peft_model(model, TPatcherConfig(...))`` and ``PeftModel.from_pretrained(model, path)`` work on
T-Patcher adapters (a saved adapter keeps its neuron count; loading resizes the fresh layers).
"""

from __future__ import annotations

from odedit_hf.editing.peft_types import extend_peft_type, register_peft_type

# before .config: TPatcherConfig.__post_init__ sets peft_type = PeftType.TPATCHER
extend_peft_type("TPATCHER")

from .config import TPatcherConfig  # noqa: E402
from .layer import Linear, TPatcherLayer  # noqa: E402
from .method import TPatcherMethod, TPatcherSnapshot, activation_loss, memory_loss  # noqa: E402
from .model import TPatcherModel  # noqa: E402

__all__ = [
    "METHOD",
    "Linear",
    "TPatcherConfig",
    "TPatcherLayer",
    "TPatcherMethod",
    "TPatcherModel",
    "TPatcherSnapshot",
    "activation_loss",
    "memory_loss",
]

register_peft_type(name="tpatcher", config_cls=TPatcherConfig, model_cls=TPatcherModel, prefix="tpatcher_")

#: The method of this folder (``get_method("tpatcher")``).
METHOD = TPatcherMethod

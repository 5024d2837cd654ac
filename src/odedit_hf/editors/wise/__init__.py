"""WISE: a side memory on one FFN projection, routed against the main memory by activation distance, with
knowledge shards and TIES merging, as a PEFT adapter (Wang et al., "WISE: Rethinking the Knowledge Memory
for Lifelong Model Editing of Large Language Models", NeurIPS 2024).

One name everywhere: folder ``wise``, method ``wise``, PEFT type ``WISE``, prefix ``wise_``. Importing this
package registers the PEFT type ``WISE`` with peft, so ``get_peft_model(model, WISEConfig(...))`` and
``PeftModel.from_pretrained(model, path)`` work on WISE adapters (stored shards load back at their count).
"""

from __future__ import annotations

from odedit_hf.editing.peft_types import extend_peft_type, register_peft_type

extend_peft_type("WISE")  # before .config: WISEConfig.__post_init__ sets peft_type = PeftType.WISE

from .config import IDENTITY_ACT, WISEConfig  # noqa: E402
from .layer import AttentionMaskHolder, Linear, WISELayer, ties_merge  # noqa: E402
from .method import (  # noqa: E402
    LOCALITY_PROMPTS,
    WISEMethod,
    WISESnapshot,
    activation_margin_loss,
    wise_layers,
)
from .model import WISEModel  # noqa: E402

__all__ = [
    "IDENTITY_ACT",
    "LOCALITY_PROMPTS",
    "METHOD",
    "AttentionMaskHolder",
    "Linear",
    "WISEConfig",
    "WISELayer",
    "WISEMethod",
    "WISEModel",
    "WISESnapshot",
    "activation_margin_loss",
    "ties_merge",
    "wise_layers",
]

register_peft_type(name="wise", config_cls=WISEConfig, model_cls=WISEModel, prefix="wise_")

#: The method of this folder (``get_method("wise")``).
METHOD = WISEMethod

"""UniKE: intrinsic (patch neurons) and extrinsic (latent in-context key-value memory) knowledge editing,
cooperating through a semantic and a truthfulness space, as a growing PEFT adapter (Pan et al.,
"Towards Unified Multimodal Editing with Enhanced Knowledge Collaboration", NeurIPS 2024).

One name everywhere: folder ``unike``, method ``unike``, PEFT type ``UNIKE``, prefix ``unike_``. Importing
this package registers the PEFT type ``UNIKE`` with peft, so ``PeftModel.from_pretrained(model, path)``
reloads a grown UniKE adapter (neurons, memory entries and heads).
"""

from __future__ import annotations

from odedit_hf.editing.peft_types import extend_peft_type, register_peft_type

extend_peft_type("UNIKE")  # before .config: UniKEConfig.__post_init__ sets peft_type = PeftType.UNIKE

from .config import UniKEConfig  # noqa: E402
from .encoder import collect_states, contrastive_loss, train_head  # noqa: E402
from .layer import MemoryLinear, PatchLinear, UniKEMemoryLayer  # noqa: E402
from .method import VARIANTS, UniKEMethod, UniKESnapshot, attention_output_name  # noqa: E402
from .model import UniKEModel  # noqa: E402

__all__ = [
    "METHOD",
    "VARIANTS",
    "MemoryLinear",
    "PatchLinear",
    "UniKEConfig",
    "UniKEMemoryLayer",
    "UniKEMethod",
    "UniKEModel",
    "UniKESnapshot",
    "attention_output_name",
    "collect_states",
    "contrastive_loss",
    "train_head",
]

register_peft_type(name="unike", config_cls=UniKEConfig, model_cls=UniKEModel, prefix="unike_")

#: The method of this folder (``get_method("unike")``).
METHOD = UniKEMethod

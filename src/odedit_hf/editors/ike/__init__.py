"""IKE: in-context knowledge editing as a PEFT adapter (Zheng et al., "Can We Edit Factual Knowledge by
In-Context Learning?", EMNLP 2023).

One name everywhere: folder ``ike``, method ``ike``, PEFT type ``IKE``, prefix ``ike_``. No weight
changes: the adapter is a memory of edited facts and demonstrations (token ids and sentence
embeddings, saved as safetensors), and the wrapped model's forward prepends the retrieved context to
every input and returns the logits of the original positions. Importing this package registers the
PEFT type ``IKE`` with peft.
"""

from __future__ import annotations

from odedit_hf.editing.peft_types import extend_peft_type, register_peft_type

extend_peft_type("IKE")  # before .config: IKEConfig.__post_init__ sets peft_type = PeftType.IKE

from .config import IKEConfig  # noqa: E402
from .demos import DEMO_KINDS, demo_index, demo_texts, fact_context, load_demo_records  # noqa: E402
from .encoder import (  # noqa: E402
    HashEncoder,
    SentenceEncoder,
    TransformerEncoder,
    encoder_available,
    get_encoder,
    minilm_dir,
    register_encoder,
)
from .layer import Embedding, IKELayer  # noqa: E402
from .method import IKEMethod, IKESnapshot, attach, ike_layer, ike_tuner  # noqa: E402
from .model import IKEModel, IKERuntime, RowContext  # noqa: E402

__all__ = [
    "DEMO_KINDS",
    "METHOD",
    "Embedding",
    "HashEncoder",
    "IKEConfig",
    "IKELayer",
    "IKEMethod",
    "IKEModel",
    "IKERuntime",
    "IKESnapshot",
    "RowContext",
    "SentenceEncoder",
    "TransformerEncoder",
    "attach",
    "demo_index",
    "demo_texts",
    "encoder_available",
    "fact_context",
    "get_encoder",
    "ike_layer",
    "ike_tuner",
    "load_demo_records",
    "minilm_dir",
    "register_encoder",
]

register_peft_type(name="ike", config_cls=IKEConfig, model_cls=IKEModel, prefix="ike_")

#: The method of this folder (``get_method("ike")``).
METHOD = IKEMethod

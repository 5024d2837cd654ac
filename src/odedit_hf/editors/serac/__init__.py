"""SERAC: semi-parametric editing with a retrieval-augmented counterfactual model as a PEFT adapter
(Mitchell et al., "Memory-Based Model Editing at Scale", ICML 2022).

One name everywhere: folder ``serac``, method ``serac``, PEFT type ``SERAC``, prefix ``serac_``. No weight
of the base model changes: the adapter holds a cache of edits, a scope classifier and a counterfactual
model's low-rank deltas (saved as safetensors); the wrapped model's forward sends the inputs in scope of
a cached edit to the counterfactual model and every other input to the base model. The classifier and
the counterfactual model are trained once per base model (:func:`train_serac`). Importing this package
registers the PEFT type ``SERAC`` with peft.
"""

from __future__ import annotations

from odedit_hf.editing.peft_types import extend_peft_type, register_peft_type

extend_peft_type("SERAC")  # before .config: SERACConfig.__post_init__ sets peft_type = PeftType.SERAC

from .artefact import Architecture, base_identity, check_identity, load_artefact, save_artefact  # noqa: E402
from .config import SIMILARITIES, SERACConfig  # noqa: E402
from .layer import Embedding, Linear, SERACLayer  # noqa: E402
from .method import (  # noqa: E402
    SERACMethod,
    SERACSnapshot,
    adapter_tensors,
    context_ids,
    default_architecture,
    load_adapter_tensors,
    prompt_markers,
    serac_layer,
    serac_tuner,
)
from .model import SERACModel, pooled_features, prefix_inputs  # noqa: E402
from .trainer import SERACTrainer, SERACTrainingArguments, SERACTrainingConfig, train_serac  # noqa: E402

__all__ = [
    "METHOD",
    "SIMILARITIES",
    "Architecture",
    "Embedding",
    "Linear",
    "SERACConfig",
    "SERACLayer",
    "SERACMethod",
    "SERACModel",
    "SERACSnapshot",
    "SERACTrainer",
    "SERACTrainingArguments",
    "SERACTrainingConfig",
    "adapter_tensors",
    "base_identity",
    "check_identity",
    "context_ids",
    "default_architecture",
    "load_adapter_tensors",
    "load_artefact",
    "pooled_features",
    "prefix_inputs",
    "prompt_markers",
    "save_artefact",
    "serac_layer",
    "serac_tuner",
    "train_serac",
]

register_peft_type(name="serac", config_cls=SERACConfig, model_cls=SERACModel, prefix="serac_")

#: The method of this folder (``get_method("serac")``).
METHOD = SERACMethod

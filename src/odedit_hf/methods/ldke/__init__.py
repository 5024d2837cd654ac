"""LDKE: Localized and Disentangled Knowledge Editing (arXiv 2605.29826) as a wrapper method around
any base editor (``--method ldke+EDITOR``, e.g. ``ldke+lora``, ``ldke+ftl``).

``LDKEConfig`` (PEFT type ``LDKE``) wraps an editor's config; ``LDKEModel`` adds the Disentanglement
Classifier's state and the gating hooks to the editor's adapter layers; ``LDKEMethod`` (``METHOD``)
runs Fast Localization and the classifier before the shared edit loop. What the paper states and
what is our design: ``docs/methods/ldke.md``. Importing this package registers ``LDKE`` with peft.
"""

from __future__ import annotations

from odedit_hf.editing.peft_types import extend_peft_type, register_peft_type

extend_peft_type("LDKE")  # before .config: LDKEConfig.__post_init__ sets peft_type = PeftType.LDKE

from .classifier import ClassifierState, gate_features, train_logistic  # noqa: E402
from .config import LDKEConfig  # noqa: E402
from .method import LDKEMethod, layer_scores  # noqa: E402
from .model import LDKEModel  # noqa: E402

register_peft_type(name="ldke", config_cls=LDKEConfig, model_cls=LDKEModel, prefix="ldke_")

#: The method of this folder (``get_method("ldke+lora")``).
METHOD = LDKEMethod

__all__ = [
    "METHOD",
    "ClassifierState",
    "LDKEConfig",
    "LDKEMethod",
    "LDKEModel",
    "gate_features",
    "layer_scores",
    "train_logistic",
]

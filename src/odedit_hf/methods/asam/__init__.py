"""ASAM: Adversarial Subspace Alignment (arXiv 2605.23780) as a wrapper method around an intrinsic editor
(``--method asam+EDITOR`` for ``ftl``, ``lora``, ``tpatcher``).

``ASAMConfig`` (PEFT type ``ASAM``) wraps an editor's config; ``ASAMModel`` is the delegating wrapper
tuner; ``ASAMMethod`` (``METHOD``) runs the per-edit objective -- the edit prompt's NLL, Latent
Adversarial Robustification (PGD variants in the hidden states entering the edit layer),
Rank-Constrained Subspace Learning over the knowledge unit (asymmetric: the clean edit prompt is the
anchor) and a locality KL -- through the shared edit loop. What the abstract states and what is our
design: ``docs/methods/asam.md``. Importing this package registers ``ASAM`` with peft.
"""

from __future__ import annotations

from odedit_hf.editing.peft_types import extend_peft_type, register_peft_type

extend_peft_type("ASAM")  # before .config: ASAMConfig.__post_init__ sets peft_type = PeftType.ASAM

from .config import ASAMConfig  # noqa: E402
from .method import SUPPORTED_EDITORS, ASAMMethod, ASAMObjective, edit_layers  # noqa: E402
from .model import ASAMModel  # noqa: E402
from .subspace import lar_perturbations, lar_radius, project_to_ball, rcsl_penalty, unit_matrix  # noqa: E402

register_peft_type(name="asam", config_cls=ASAMConfig, model_cls=ASAMModel, prefix="asam_")

#: The method of this folder (``get_method("asam+ftl")``).
METHOD = ASAMMethod

__all__ = [
    "METHOD",
    "SUPPORTED_EDITORS",
    "ASAMConfig",
    "ASAMMethod",
    "ASAMModel",
    "ASAMObjective",
    "edit_layers",
    "lar_perturbations",
    "lar_radius",
    "project_to_ball",
    "rcsl_penalty",
    "unit_matrix",
]

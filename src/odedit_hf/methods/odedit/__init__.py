"""ODEdit: invariant trajectory learning around any base editor (arXiv 2601.19700).

``ODEditConfig`` (PEFT type ``ODEDIT``) wraps an editor's config; the risks, the IRM-TV penalty and the
lambda network are plain functions/modules; ``ODEditMethod`` (``METHOD``, ``--method odedit+EDITOR``)
runs the per-edit primal-dual objective through the shared edit loop, and ``ODEditTrainer`` the same
loss under ``transformers.Trainer``. Importing this package registers ``ODEDIT`` with peft.
"""

from __future__ import annotations

from odedit_hf.editing.peft_types import extend_peft_type, register_peft_type

extend_peft_type("ODEDIT")  # before .config: ODEditConfig.__post_init__ sets peft_type = PeftType.ODEDIT

from .config import ODEditConfig  # noqa: E402
from .lambda_net import LambdaNetwork  # noqa: E402
from .method import ODEditDivergedError, ODEditMethod  # noqa: E402
from .model import ODEditModel  # noqa: E402
from .objective import ODEditObjective  # noqa: E402
from .penalty import irm_tv_penalty  # noqa: E402
from .trainer import ODEditTrainer, ODEditTrainingArguments  # noqa: E402

register_peft_type(name="odedit", config_cls=ODEditConfig, model_cls=ODEditModel, prefix="odedit_")

#: The method of this folder (``get_method("odedit+lora")``).
METHOD = ODEditMethod

__all__ = [
    "METHOD",
    "LambdaNetwork",
    "ODEditConfig",
    "ODEditDivergedError",
    "ODEditMethod",
    "ODEditModel",
    "ODEditObjective",
    "ODEditTrainer",
    "ODEditTrainingArguments",
    "irm_tv_penalty",
]

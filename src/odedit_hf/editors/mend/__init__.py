"""MEND: model editor networks with gradient decomposition (Mitchell et al., ICLR 2022), as a PEFT adapter.

One name everywhere: folder ``mend``, method ``mend``, PEFT type ``MEND``, prefix ``mend_``. A trained
hypernetwork (:mod:`.hypernet`, trained by :mod:`.trainer` through ``transformers.Trainer``) turns the
rank-1 gradient factors of an edit prompt into a low-rank weight update; the adapter keeps every edit's
factors (:mod:`.layer`), so edits accumulate and roll back exactly. Importing this package registers the
PEFT type ``MEND`` with peft.
"""

from __future__ import annotations

from odedit_hf.editing.peft_types import extend_peft_type, register_peft_type

extend_peft_type("MEND")  # before .config: MENDConfig.__post_init__ sets peft_type = PeftType.MEND

from .config import MENDConfig  # noqa: E402
from .hypernet import MENDNet, MENDNetConfig, base_identity, check_identity, load_net, save_net  # noqa: E402
from .layer import Linear, MENDLayer  # noqa: E402
from .method import MENDMethod, MENDSnapshot, default_mend_modules, mend_layers, token_rows  # noqa: E402
from .model import MENDModel  # noqa: E402

__all__ = [
    "METHOD",
    "Linear",
    "MENDConfig",
    "MENDLayer",
    "MENDMethod",
    "MENDModel",
    "MENDNet",
    "MENDNetConfig",
    "MENDSnapshot",
    "base_identity",
    "check_identity",
    "default_mend_modules",
    "load_net",
    "mend_layers",
    "save_net",
    "token_rows",
]

register_peft_type(name="mend", config_cls=MENDConfig, model_cls=MENDModel, prefix="mend_")

#: The method of this folder (``get_method("mend")``).
METHOD = MENDMethod

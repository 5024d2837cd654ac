"""FT-L: fine-tuning chosen FFN projections of chosen layers, as a reversible PEFT adapter.

One name everywhere: folder ``ftl``, method ``ftl`` (alias ``ft``), PEFT type ``FTL``, prefix ``ftl_``.
Importing this package registers the PEFT type ``FTL`` with peft, so ``get_peft_model(model,
FTLConfig(...))`` and ``PeftModel.from_pretrained(model, path)`` work on FT-L adapters.
"""

from __future__ import annotations

from odedit_hf.editing.peft_types import extend_peft_type, register_peft_type

extend_peft_type("FTL")  # before .config: FTLConfig.__post_init__ sets peft_type = PeftType.FTL

from .config import FTLConfig  # noqa: E402
from .layer import FTLLayer, Linear  # noqa: E402
from .method import FTLMethod  # noqa: E402
from .model import FTLModel  # noqa: E402

__all__ = ["METHOD", "FTLConfig", "FTLLayer", "FTLMethod", "FTLModel", "Linear"]

register_peft_type(name="ftl", config_cls=FTLConfig, model_cls=FTLModel, prefix="ftl_")

#: The method of this folder (``get_method("ftl")``; alias ``ft``).
METHOD = FTLMethod

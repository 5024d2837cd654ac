"""FT-L: fine-tuning chosen FFN projections of chosen layers, as a reversible PEFT adapter.

Importing this package registers the PEFT type ``FTL`` with peft, so ``get_peft_model(model,
FTLConfig(...))`` and ``PeftModel.from_pretrained(model, path)`` work on FT-L adapters.
"""

from __future__ import annotations

from odedit_hf.editors import extend_peft_type, register_peft_type

extend_peft_type("FTL")  # before .config: FTLConfig.__post_init__ sets peft_type = PeftType.FTL

from .config import FTLConfig  # noqa: E402
from .layer import FTLLayer, Linear  # noqa: E402
from .model import FTLModel  # noqa: E402

__all__ = ["FTLConfig", "FTLLayer", "FTLModel", "Linear", "ftl_config_for"]

register_peft_type(name="ftl", config_cls=FTLConfig, model_cls=FTLModel, prefix="ftl_")


def ftl_config_for(
    backbone: object,
    *,
    layers: list[int] | None = None,
    projections: list[str] | tuple[str, ...] | None = None,
    norm_constraint: float | None = None,
) -> FTLConfig:
    """An :class:`FTLConfig` on the backbone's default edit targets (or the ones given).

    Args:
        backbone: an :class:`odedit_hf.backbones.Backbone`.
        layers: decoder layer indices (negative counts from the end); default the backbone's
            ``default_edit_layers()``.
        projections: FFN projection names inside a decoder layer (e.g. ``["mlp.down_proj"]``); default
            the family's ``default_edit_projections``.
        norm_constraint: see :class:`FTLConfig`.

    Returns:
        A config whose ``target_modules`` are the fully qualified module names.
    """
    names = backbone.ffn_module_names(layers=layers, projections=projections)
    return FTLConfig(target_modules=list(names), norm_constraint=norm_constraint)

"""``ASAMModel``: the peft tuner of PEFT type ``ASAM``.

ASAM changes the *objective* of an edit, not the layers, so its tuner is the generic delegating wrapper
tuner (:class:`~odedit_hf.editing.wrapper.WrapperModel`): the adapter layers are exactly those of the
wrapped editor, and a saved ASAM adapter holds the editor's tensors only. LAR's and RCSL's forward hooks
live only inside an edit (:mod:`.subspace`), never on the saved or served model.
"""

from __future__ import annotations

from typing import ClassVar

from odedit_hf.editing.wrapper import WrapperModel

from .config import ASAMConfig

__all__ = ["ASAMModel"]


class ASAMModel(WrapperModel):
    """Creates the wrapped editor's adapter layers and delegates every tuner operation to it.

    Use it through peft: ``get_peft_model(model, ASAMConfig(editor=LoraConfig(...)))``. All ASAM adapters
    on one model must wrap the same editor type.
    """

    prefix: str = "asam_"
    config_class: ClassVar[type[ASAMConfig]] = ASAMConfig

"""``ODEditModel``: the peft tuner of PEFT type ``ODEDIT``.

ODEdit changes the *objective* of an edit, not the layers, so its tuner is the generic delegating
wrapper tuner (:class:`~odedit_hf.editing.wrapper.WrapperModel`): the adapter layers are exactly those
of the wrapped editor.
"""

from __future__ import annotations

from typing import ClassVar

from odedit_hf.editing.wrapper import WrapperModel

from .config import ODEditConfig

__all__ = ["ODEditModel"]


class ODEditModel(WrapperModel):
    """Creates the wrapped editor's adapter layers and delegates every tuner operation to it.

    Use it through peft: ``get_peft_model(model, ODEditConfig(editor=LoraConfig(...)))``. All ODEdit
    adapters on one model must wrap the same editor type.
    """

    prefix: str = "odedit_"
    config_class: ClassVar[type[ODEditConfig]] = ODEditConfig

"""Configuration of a MEND adapter (the per-edit low-rank updates MEND's hypernetwork produces)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig
from peft.utils import PeftType

__all__ = ["MENDConfig"]


@dataclass
class MENDConfig(PeftConfig):
    """Configuration of a MEND adapter: the accumulated low-rank weight updates of MEND edits on chosen
    ``nn.Linear`` modules.

    Every edit appends, per edited module, the factors of its update ``ΔW = B·A`` (``A``: the
    hypernetwork's pseudo-activations ``ũ``, one row per token of the edit prompt; ``B``: ``-η_l δ̃ᵀ``);
    the edited layer computes ``base(x) + (x Aᵀ) Bᵀ`` summed over all edits. A fresh adapter holds no
    factor (the identity); disabling, deleting or restoring the adapter gives the base model back bit
    for bit. The hypernetwork itself is not part of the adapter: it is a separately trained artefact
    (``odedit-hf train-editor --method mend``), so a saved MEND adapter loads with stock peft.

    Args:
        target_modules (`list[str] | str | None`):
            The ``nn.Linear`` modules MEND edits (names, ``.``-suffixes, or one regex); required
            (``get_method('mend').peft_config(backbone)`` picks the backbone registry's FFN projections
            of the last layers).
        exclude_modules (`list[str] | str | None`):
            Modules never to edit, matched like ``target_modules``.
        modules_to_save (`list[str] | None`):
            Extra modules saved in full beside the adapter (peft's usual meaning).
    """

    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules MEND edits (names, suffixes, or one regex)."}
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules never to edit (names, suffixes, or one regex)."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules saved in full beside the adapter."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.MEND
        if self.target_modules is None:
            raise ValueError(
                "MENDConfig.target_modules is required: name the nn.Linear modules to edit, e.g. "
                "['model.language_model.layers.1.mlp.down_proj'] (get_method('mend').peft_config(backbone) "
                "picks them from the backbone registry)"
            )
        if isinstance(self.target_modules, (list, tuple, set)):
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(
                    f"MENDConfig.target_modules must be a non-empty list of module names, got {self.target_modules!r}"
                )
            self.target_modules = set(self.target_modules)
        elif not isinstance(self.target_modules, str):
            raise ValueError(
                "MENDConfig.target_modules must be a list of module names or a regex string, "
                f"got {type(self.target_modules).__name__}"
            )
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)

"""Configuration of FT-L (fine-tuning chosen FFN projections of chosen layers, as a reversible delta)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from peft.config import PeftConfig
from peft.utils import PeftType

__all__ = ["FTLConfig"]


@dataclass
class FTLConfig(PeftConfig):
    """Configuration of an FT-L adapter: a trainable dense delta ``ΔW`` added to chosen ``nn.Linear`` weights.

    The edited layer computes ``base(x) + x ΔWᵀ``; ``ΔW`` starts at zero, so a fresh adapter leaves the
    model unchanged, and disabling or deleting the adapter gives the base model back bit for bit.
    This is EasyEdit's FT-L (constrained fine-tuning of one FFN projection, Zhu et al. 2020) recast as
    a PEFT adapter: the base weights are never written.

    Args:
        target_modules (`list[str] | str | None`):
            Modules to edit, matched as in peft: a list of names (exact, or a ``.``-suffix of the module
            name), or a regex matched against the whole name. ``None`` takes the family's
            ``default_edit_projections`` from the odedit-hf backbone registry (every layer, unless
            ``layers_to_transform`` narrows it). Only ``nn.Linear`` modules can be targeted.
        exclude_modules (`list[str] | str | None`):
            Modules never to edit, matched like ``target_modules``.
        layers_to_transform (`list[int] | int | None`):
            Decoder layer indices to edit when ``target_modules`` is a list of suffixes; ``None`` = all.
        layers_pattern (`list[str] | str | None`):
            The name of the layer list in module names (e.g. ``"layers"``), used with ``layers_to_transform``.
        norm_constraint (`float | None`):
            If set, every entry of ``ΔW`` is clamped to ``[-norm_constraint, norm_constraint]`` after each
            optimiser step (EasyEdit FT-L's ``norm_constraint``), which bounds how far the edit moves the
            weights. ``None`` leaves ``ΔW`` free.
        init_weights (`bool`):
            ``True`` (default) starts ``ΔW`` at zero (identity edit). ``False`` draws it from
            ``N(0, 1e-3)``, which is only useful to test that an adapter really changes outputs.
        modules_to_save (`list[str] | None`):
            Extra modules trained and saved in full beside the adapter (peft's usual meaning).
    """

    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules to edit (names, suffixes, or one regex)."}
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules never to edit (names, suffixes, or one regex)."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Decoder layer indices to edit; None = all."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the decoder layer list in module names, e.g. 'layers'."}
    )
    norm_constraint: float | None = field(
        default=None,
        metadata={"help": "Clamp every entry of the delta to [-c, c] after each step; None = free."},
    )
    init_weights: bool = field(default=True, metadata={"help": "Start the delta at zero (identity edit)."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules trained and saved in full beside the adapter."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.FTL
        if isinstance(self.target_modules, (list, tuple)):
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(
                    f"FTLConfig.target_modules must be a non-empty list of module names, got {self.target_modules!r}"
                )
            self.target_modules = set(self.target_modules)
        elif self.target_modules is not None and not isinstance(self.target_modules, (str, set)):
            raise ValueError(
                "FTLConfig.target_modules must be a list of module names, a regex string or None, "
                f"got {type(self.target_modules).__name__}"
            )
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.layers_to_transform, (list, tuple)):
            if not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers_to_transform
            ):
                raise ValueError(
                    "FTLConfig.layers_to_transform must hold non-negative layer indices, "
                    f"got {self.layers_to_transform!r}"
                )
            self.layers_to_transform = list(self.layers_to_transform)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                "FTLConfig: layers_to_transform cannot be used with a regex target_modules; "
                "put the layer indices in the regex or pass target_modules as a list."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                "FTLConfig: layers_pattern is only meaningful with layers_to_transform; set both."
            )
        if self.norm_constraint is not None:
            value = self.norm_constraint
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ValueError(
                    f"FTLConfig.norm_constraint must be a positive finite number or None, got {value!r}"
                )
            self.norm_constraint = float(value)

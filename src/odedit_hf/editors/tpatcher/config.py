"""Configuration of T-Patcher (patch neurons added to one FFN, Huang et al., ICLR 2023)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from peft.config import PeftConfig
from peft.utils import PeftType

__all__ = ["ROLES", "TPatcherConfig"]

#: The part each targeted projection plays in a patch neuron: ``key`` holds the neuron's router row
#: (its pre-activation ``k·x + b`` is the "activation" T-Patcher's losses act on: ``fc1`` of a plain FFN,
#: ``gate_proj`` of a SwiGLU FFN), ``up`` the row of the gated partner (``up_proj``; SwiGLU only) and
#: ``value`` the neuron's output column (``fc2`` / ``down_proj``) with its scale ``a``.
ROLES: tuple[str, ...] = ("key", "up", "value")


@dataclass
class TPatcherConfig(PeftConfig):
    """Configuration of a T-Patcher adapter: patch neurons appended to one FFN.

    A patch neuron is one more hidden unit of the FFN: one more row of its input projection(s) and one
    more column of its output projection, so the FFN's own activation (and gating) applies to it. For a
    plain FFN ``y = W₂ σ(W₁x + b₁)`` the patched FFN computes ``y + V diag(a) σ(Kx + b)``; for a SwiGLU FFN
    ``y = W_d (σ(W_g x) ⊙ W_u x)`` it computes ``y + V diag(a) (σ(K_g x + b) ⊙ K_u x)``. The base weights
    are never written: the adapter layers widen the intermediate activation with the neurons' outputs and
    the output projection adds their contribution. A fresh adapter has no neuron (the identity); the
    editor adds neurons before every edit (one per wrong target token), so their number grows and is
    saved with the adapter.

    Args:
        key_module (`str`):
            Full name of the FFN's router projection (``fc1`` of a plain FFN, ``gate_proj`` of a SwiGLU
            FFN), e.g. ``"model.language_model.layers.1.mlp.gate_proj"``.
        value_module (`str`):
            Full name of the FFN's output projection (``fc2`` / ``down_proj``).
        up_module (`str | None`):
            Full name of the gated partner projection (``up_proj``) of a SwiGLU FFN; ``None`` for a plain FFN.
        scale_init (`float`):
            Initial value of every new neuron's output scale ``a`` (T-Patcher's ``amplify_con``, 10).
        init_weights (`bool`):
            ``True`` (default): new neurons start with a zero value column, so adding them changes no
            output. ``False`` draws the value columns from ``N(0, 0.1)``; only useful in tests.
    """

    key_module: str | None = field(default=None, metadata={"help": "Full name of the router projection."})
    value_module: str | None = field(default=None, metadata={"help": "Full name of the output projection."})
    up_module: str | None = field(default=None, metadata={"help": "Full name of the gated up projection."})
    scale_init: float = field(default=10.0, metadata={"help": "Initial output scale a of a new neuron."})
    init_weights: bool = field(default=True, metadata={"help": "New neurons start with zero value columns."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Set from key_module, up_module and value_module; do not pass."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.TPATCHER
        for name in ("key_module", "value_module"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(
                    f"TPatcherConfig.{name} must name a module (e.g. 'model.layers.1.mlp.down_proj'), got "
                    f"{value!r}; build the config with get_method('tpatcher').peft_config(backbone)"
                )
        if self.up_module is not None and (not isinstance(self.up_module, str) or not self.up_module):
            raise ValueError(
                f"TPatcherConfig.up_module must be a module name or None, got {self.up_module!r}"
            )
        names = [self.key_module, self.value_module] + ([self.up_module] if self.up_module else [])
        if len(set(names)) != len(names):
            raise ValueError(f"TPatcherConfig: key, up and value modules must differ, got {names}")
        value = self.scale_init
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value <= 0
        ):
            raise ValueError(f"TPatcherConfig.scale_init must be a positive finite number, got {value!r}")
        self.scale_init = float(value)
        expected = set(names)
        if self.target_modules is not None and set(self.target_modules) != expected:
            raise ValueError(
                f"TPatcherConfig.target_modules is derived from key/up/value modules ({sorted(expected)}); "
                f"got {self.target_modules!r}"
            )
        self.target_modules = expected

    def role_of(self, module_name: str) -> str:
        """The role (see :data:`ROLES`) of the module called ``module_name`` (a full name or a suffix match)."""
        for role, name in (("key", self.key_module), ("up", self.up_module), ("value", self.value_module)):
            if name and (module_name == name or module_name.endswith("." + name)):
                return role
        raise ValueError(
            f"T-Patcher: module {module_name!r} is none of key {self.key_module!r}, up {self.up_module!r}, "
            f"value {self.value_module!r}"
        )

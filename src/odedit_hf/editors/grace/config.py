"""Configuration of GRACE (a growing key-value codebook at one layer, Hartvigsen et al. 2023)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from peft.config import PeftConfig
from peft.utils import PeftType

__all__ = ["REPLACEMENTS", "VALUE_INITS", "GRACEConfig"]

#: Which positions a codebook hit replaces (see :class:`GRACEConfig`).
REPLACEMENTS: tuple[str, ...] = ("span", "last")
#: How a new value starts: ``cold`` = uniform random in ``[0, 1)`` (GRACE's default), ``warm`` = the
#: layer's own output at the key position.
VALUE_INITS: tuple[str, ...] = ("cold", "warm")


@dataclass
class GRACEConfig(PeftConfig):
    """Configuration of a GRACE adapter: a codebook of (key, value, radius, label) entries on one
    ``nn.Linear`` (by default the last decoder layer's FFN down projection).

    At every position the layer's *input* is a query; when it lies within the radius of its nearest key
    (Euclidean distance), the layer's *output* there is replaced by that key's value. Queries outside
    every radius leave the output bit for bit as the base layer computes it, and an empty codebook is
    the identity. The codebook grows by one entry per edit (or widens an entry's radius); it is adapter
    state, saved with the adapter (keys, radii and labels as persistent buffers, values as parameters).

    Args:
        target_modules (`list[str] | str | None`):
            The module(s) to wrap, matched as in peft (names, ``.``-suffixes or one regex). GRACE wraps one
            layer; several targets give independent codebooks. ``None`` is refused: name the module (the
            editor method picks the backbone registry's default edit module).
        eps_init (`float`):
            The radius of a new key (EasyEdit and the GRACE repo: 1.0), in the units of the wrapped layer's
            input. It also sets the reach of the add/expand rule: a new query farther than
            ``eps_init + ε_nearest`` from its nearest key always adds a key.
        replacement (`str`):
            Which positions a hit replaces. ``"span"`` (default): a query within a key's radius at
            position ``p`` replaces the outputs at ``p, …, p + n - 1``, where ``n`` is the number of target
            tokens stored with the key (its label), so that under teacher forcing (and in generation) every
            position predicting a target token gets the value; a later hit starts its own span.
            ``"last"``: only the positions whose own query is within a radius (EasyEdit's
            ``replace_last`` evaluated at every position).
        value_init (`str`):
            ``"cold"`` (default, as GRACE): a new value is uniform random in ``[0, 1)``; ``"warm"``: the base
            layer's output at the key position.
        modules_to_save (`list[str] | None`):
            Extra modules trained and saved in full beside the adapter (peft's usual meaning).
    """

    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "The module(s) holding a codebook (names, suffixes or one regex)."}
    )
    eps_init: float = field(default=1.0, metadata={"help": "Radius of a new key (layer-input units)."})
    replacement: str = field(
        default="span", metadata={"help": "Positions a hit replaces: 'span' (the label's length) or 'last'."}
    )
    value_init: str = field(default="cold", metadata={"help": "New values: 'cold' (U[0,1)) or 'warm'."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules trained and saved in full beside the adapter."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.GRACE
        if self.target_modules is None:
            raise ValueError(
                "GRACEConfig.target_modules is required: name the layer that holds the codebook, e.g. "
                "['model.layers.1.mlp.down_proj'] (get_method('grace').peft_config(backbone) picks the "
                "backbone registry's default edit module)"
            )
        if isinstance(self.target_modules, (list, tuple, set)):
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(
                    f"GRACEConfig.target_modules must be a non-empty list of module names, got {self.target_modules!r}"
                )
            self.target_modules = set(self.target_modules)
        elif not isinstance(self.target_modules, str):
            raise ValueError(
                "GRACEConfig.target_modules must be a list of module names or a regex string, "
                f"got {type(self.target_modules).__name__}"
            )
        value = self.eps_init
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value <= 0
        ):
            raise ValueError(f"GRACEConfig.eps_init must be a positive finite number, got {value!r}")
        self.eps_init = float(value)
        if self.replacement not in REPLACEMENTS:
            raise ValueError(
                f"GRACEConfig.replacement must be one of {', '.join(REPLACEMENTS)}, got {self.replacement!r}"
            )
        if self.value_init not in VALUE_INITS:
            raise ValueError(
                f"GRACEConfig.value_init must be one of {', '.join(VALUE_INITS)}, got {self.value_init!r}"
            )

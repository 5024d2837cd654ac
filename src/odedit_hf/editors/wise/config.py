"""Configuration of WISE (a side memory on one FFN projection with a routing rule, Wang et al. 2024)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from peft.config import PeftConfig
from peft.utils import PeftType

__all__ = ["IDENTITY_ACT", "WISEConfig", "check_activation"]

#: The ``act_fn`` value that measures distances on the raw layer outputs (no activation).
IDENTITY_ACT = "identity"


def check_activation(name: object, where: str) -> str:
    """``name`` if it is :data:`IDENTITY_ACT` or a key of transformers' ``ACT2FN``, else ``ValueError``."""
    from transformers.activations import ACT2FN

    if not isinstance(name, str) or (name != IDENTITY_ACT and name not in ACT2FN):
        raise ValueError(
            f"{where} must be {IDENTITY_ACT!r} or an activation name of transformers' ACT2FN "
            f"(e.g. 'silu', 'gelu', 'relu'), got {name!r}"
        )
    return name


def _number(
    where: str, value: object, *, low: float, high: float | None = None, low_open: bool = False
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    value = float(value)
    if value < low or (low_open and value == low) or (high is not None and value > high):
        bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}]"
        raise ValueError(f"{where} must lie in {bounds}, got {value!r}")
    return value


def _positive_int(where: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where} must be a positive int, got {value!r}")
    return value


@dataclass
class WISEConfig(PeftConfig):
    """Configuration of a WISE adapter on one ``nn.Linear`` (by default the backbone registry's edit module,
    an FFN down/out projection).

    The layer keeps the frozen base weight ``W`` (the *main memory*) and a *side memory* ``W' = W + Δ``,
    where ``Δ`` is trained only on a random subset of entries (the shard's gradient mask) and clamped to
    ``[-norm_constraint, norm_constraint]``. At inference every sequence is routed: with ``Δ_k(x)`` the
    per-token mean (over the attended positions) of ``‖act(W_k x) − act(W x)‖₂`` for a memory ``W_k``, the
    output is the main memory's unless a memory's ``Δ_k`` reaches its threshold ``τ = act_ratio · min
    recorded Δ_edit``. Every ``save_freq`` edits the side memory becomes a shard (and a new mask is drawn);
    every ``merge_freq`` edits shards are TIES-merged (peft's ``ties``).

    Args:
        target_modules (`list[str] | str | None`):
            The module(s) to wrap (names, ``.``-suffixes or one regex). ``None`` is refused: name the module
            (``get_method('wise').peft_config(backbone)`` picks the registry's default).
        mask_module (`str | None`):
            The module whose forward receives the 2-D ``attention_mask`` (the decoder stack, e.g.
            ``model.language_model``), read by a forward pre-hook so that routing averages over attended
            positions only. ``None``: the part of the target's name before ``.layers.<i>.``; without a mask
            every position counts.
        mask_ratio (`float`):
            The fraction of ``Δ``'s entries a shard may train (WISE / EasyEdit: 0.2), drawn per shard.
        norm_constraint (`float | None`):
            After every optimiser step ``Δ`` is clamped to ``[-c, c]`` (``W' ∈ W ± c``; EasyEdit: 1.0);
            ``None``: no clamp.
        act_ratio (`float`):
            ``τ = act_ratio · min Δ_edit`` over the edits recorded for a memory (EasyEdit: 0.4).
        act_fn (`str`):
            The activation applied to both outputs before the distance (EasyEdit: the model's
            ``hidden_act``); ``"identity"`` for none.
        retrieve (`bool`):
            ``False`` (the merged-memory variant): candidates are the merged memory, the shards not merged
            yet and the side memory, all against one τ; the largest ``Δ`` wins if any reaches τ.
            ``True``: every stored shard keeps its own τ; the side memory is used when it reaches its τ,
            a stored shard when its ``Δ`` is larger than every earlier candidate's and above its own τ.
        save_freq (`int`):
            Edits per shard (EasyEdit: 500).
        merge_freq (`int`):
            Edits per merge; a multiple of ``save_freq`` (EasyEdit: 1000).
        densities (`float`):
            The fraction of entries TIES keeps per task vector (EasyEdit: 0.53).
        weights (`float`):
            The weight of each shard in a merge (EasyEdit: 1.0; the merge is normalised, so equal weights
            give the mean of the sign-agreeing entries).
        mask_seed (`int`):
            Seeds the shard masks (shard ``i`` uses ``mask_seed + i``).
        long_sequence (`int`):
            At inference, a sequence longer than this many tokens is routed on its largest per-token
            distance instead of the mean (EasyEdit: 100).
        modules_to_save (`list[str] | None`):
            Extra modules trained and saved in full beside the adapter (peft's usual meaning).
    """

    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "The module holding the side memory (name, suffix or regex)."}
    )
    mask_module: str | None = field(
        default=None, metadata={"help": "The module whose forward receives the 2-D attention_mask."}
    )
    mask_ratio: float = field(
        default=0.2, metadata={"help": "Fraction of side-memory entries a shard trains."}
    )
    norm_constraint: float | None = field(default=1.0, metadata={"help": "Clamp of W' to W ± c (None: off)."})
    act_ratio: float = field(
        default=0.4, metadata={"help": "Routing threshold: act_ratio x min edit distance."}
    )
    act_fn: str = field(default="silu", metadata={"help": "Activation applied before the distance."})
    retrieve: bool = field(default=False, metadata={"help": "Route over stored shards (True) or merge them."})
    save_freq: int = field(default=500, metadata={"help": "Edits per shard."})
    merge_freq: int = field(
        default=1000, metadata={"help": "Edits per TIES merge (a multiple of save_freq)."}
    )
    densities: float = field(default=0.53, metadata={"help": "TIES density."})
    weights: float = field(default=1.0, metadata={"help": "Weight of each shard in a merge."})
    mask_seed: int = field(default=0, metadata={"help": "Seed of the shard masks."})
    long_sequence: int = field(default=100, metadata={"help": "Longer sequences route on their max token."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules trained and saved in full beside the adapter."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.WISE
        if self.target_modules is None:
            raise ValueError(
                "WISEConfig.target_modules is required: name the layer that holds the side memory, e.g. "
                "['model.language_model.layers.1.mlp.down_proj'] (get_method('wise').peft_config(backbone) "
                "picks the backbone registry's default edit module)"
            )
        if isinstance(self.target_modules, (list, tuple, set)):
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(
                    f"WISEConfig.target_modules must be a non-empty list of module names, got {self.target_modules!r}"
                )
            self.target_modules = set(self.target_modules)
        elif not isinstance(self.target_modules, str):
            raise ValueError(
                "WISEConfig.target_modules must be a list of module names or a regex string, "
                f"got {type(self.target_modules).__name__}"
            )
        if self.mask_module is not None and (not isinstance(self.mask_module, str) or not self.mask_module):
            raise ValueError(
                f"WISEConfig.mask_module must be a module name or None, got {self.mask_module!r}"
            )
        self.mask_ratio = _number("WISEConfig.mask_ratio", self.mask_ratio, low=0.0, high=1.0, low_open=True)
        if self.norm_constraint is not None:
            self.norm_constraint = _number(
                "WISEConfig.norm_constraint", self.norm_constraint, low=0.0, low_open=True
            )
        self.act_ratio = _number("WISEConfig.act_ratio", self.act_ratio, low=0.0)
        self.act_fn = check_activation(self.act_fn, "WISEConfig.act_fn")
        if not isinstance(self.retrieve, bool):
            raise ValueError(f"WISEConfig.retrieve must be true or false, got {self.retrieve!r}")
        self.save_freq = _positive_int("WISEConfig.save_freq", self.save_freq)
        self.merge_freq = _positive_int("WISEConfig.merge_freq", self.merge_freq)
        if self.merge_freq % self.save_freq:
            raise ValueError(
                f"WISEConfig.merge_freq ({self.merge_freq}) must be a multiple of save_freq ({self.save_freq}): "
                "a merge combines whole shards"
            )
        self.densities = _number("WISEConfig.densities", self.densities, low=0.0, high=1.0, low_open=True)
        self.weights = _number("WISEConfig.weights", self.weights, low=0.0, low_open=True)
        if isinstance(self.mask_seed, bool) or not isinstance(self.mask_seed, int) or self.mask_seed < 0:
            raise ValueError(f"WISEConfig.mask_seed must be an int >= 0, got {self.mask_seed!r}")
        self.long_sequence = _positive_int("WISEConfig.long_sequence", self.long_sequence)

"""``ASAMConfig``: the PEFT config of ASAM (Adversarial Subspace Alignment), holding the nested config of
the intrinsic editor it wraps and ASAM's own switches and weights."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from odedit_hf.editing.peft_types import extend_peft_type
from odedit_hf.editing.wrapper import WrapperConfig

logger = logging.getLogger(__name__)

__all__ = ["LOC_POSITIONS", "RCSL_NORMS", "ASAMConfig"]

#: How the RCSL penalty is normalised: the tail singular values over all of them, or their plain sum.
RCSL_NORMS: tuple[str, ...] = ("ratio", "sum")
#: The positions the locality KL compares (as ODEdit's ``loc_positions``).
LOC_POSITIONS: tuple[str, ...] = ("answer", "all")


@dataclass
class ASAMConfig(WrapperConfig):
    """Configuration of ASAM around an intrinsic editor (FT-L, LoRA, T-Patcher); see
    ``docs/methods/asam.md`` for what the abstract states and what is our design.

    One edit's objective, per step (the editor's own loop: its steps, learning rate and early stop on the
    clean edit prompt's NLL)::

        NLL(edit) + variant_weight · NLL(LAR variants) + rcsl_weight · RCSL(unit)
                  + loc_weight · KL(pre || post on loc, m_loc) + the editor's own terms

    The *edit layer* is the lowest decoder layer holding the editor's adapter layers (LAR perturbs the
    hidden states entering it); the *representation layer* is the highest one (RCSL reads its output).
    For the default single-layer editors they are the same layer.

    Args:
        editor (`PeftConfig`):
            The config of the wrapped editor (`FTLConfig`, peft's `LoraConfig`, `TPatcherConfig`). Saved
            nested in `adapter_config.json` and rebuilt on load.
        lar (`bool`, defaults to True):
            Latent Adversarial Robustification on: per step, `n_variants` PGD variants of the edit prompt
            in the hidden states entering the edit layer, trained to the target (ablation switch).
        n_variants (`int`, defaults to 2):
            LAR variants per edit prompt and step (each from its own random start in the ball).
        epsilon (`float`, defaults to 0.03):
            The ball's radius, relative and per token: a variant's perturbation at prompt position t obeys
            ``‖δ_t‖₂ ≤ epsilon · ‖h_t‖₂`` (h_t the clean hidden state entering the edit layer).
        pgd_steps (`int`, defaults to 3):
            Projected gradient-ascent steps on the target NLL per variant and step (0: the random start).
        pgd_step_size (`float`, defaults to 0.5):
            One PGD step moves each token's perturbation by this fraction of its radius, along its
            normalised gradient, before the projection back onto the ball.
        variant_weight (`float`, defaults to 1.0):
            Weight of the variants' target NLL (their mean over tokens).
        rcsl (`bool`, defaults to True):
            Rank-Constrained Subspace Learning on (ablation switch).
        rank (`int`, defaults to 1):
            Leading singular directions the unit may use; the penalty is on the singular values beyond.
        rcsl_weight (`float`, defaults to 1.0):
            Weight of the RCSL penalty.
        rcsl_norm (`str`, defaults to `"ratio"`):
            `"ratio"`: ``Σ_{i>rank} σ_i / Σ_i σ_i`` (in [0, 1), scale-free); `"sum"`: ``Σ_{i>rank} σ_i``.
        symmetric (`bool`, defaults to False):
            False: asymmetric gradient flow, the clean edit prompt's representation is a constant anchor in
            the RCSL matrix (variants and rephrases move towards it); True: it takes gradient too (ablation).
        num_rephrases (`int`, defaults to 3):
            Rephrases per kind (text, image) of the knowledge unit in the RCSL matrix; a request carrying
            fewer uses those it has (the tiny world's records carry 3 text and 2 image rephrases).
        loc (`bool`, defaults to True):
            The locality term on: KL(pre-edit || post-edit) on the record's `loc` and `m_loc` prompts.
        loc_weight (`float`, defaults to 1.0):
            Its weight.
        loc_positions (`str`, defaults to `"answer"`):
            `"answer"`: the positions predicting the locality answers; `"all"`: every text position.
    """

    lar: bool = field(default=True, metadata={"help": "Latent Adversarial Robustification on/off."})
    n_variants: int = field(default=2, metadata={"help": "LAR variants per edit prompt and step."})
    epsilon: float = field(default=0.03, metadata={"help": "Relative per-token L2 radius of the LAR ball."})
    pgd_steps: int = field(default=3, metadata={"help": "PGD ascent steps per variant (0 = random start)."})
    pgd_step_size: float = field(default=0.5, metadata={"help": "PGD step as a fraction of the radius."})
    variant_weight: float = field(default=1.0, metadata={"help": "Weight of the variants' target NLL."})
    rcsl: bool = field(default=True, metadata={"help": "Rank-Constrained Subspace Learning on/off."})
    rank: int = field(default=1, metadata={"help": "Leading singular directions left unpenalised."})
    rcsl_weight: float = field(default=1.0, metadata={"help": "Weight of the RCSL penalty."})
    rcsl_norm: str = field(default="ratio", metadata={"help": "ratio | sum."})
    symmetric: bool = field(default=False, metadata={"help": "Gradient through the anchor too (ablation)."})
    num_rephrases: int = field(default=3, metadata={"help": "Rephrases per kind in the knowledge unit."})
    loc: bool = field(default=True, metadata={"help": "Locality KL term on/off."})
    loc_weight: float = field(default=1.0, metadata={"help": "Weight of the locality KL."})
    loc_positions: str = field(default="answer", metadata={"help": "answer | all."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = extend_peft_type("ASAM")
        where = "ASAMConfig"
        for name in ("lar", "rcsl", "symmetric", "loc"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{where}.{name} must be True or False, got {getattr(self, name)!r}")
        for name, low in (("n_variants", 1), ("rank", 1), ("num_rephrases", 1), ("pgd_steps", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{where}.{name} must be an int >= {low}, got {value!r}")
        for name in ("epsilon", "pgd_step_size", "variant_weight", "rcsl_weight", "loc_weight"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"{where}.{name} must be a finite number >= 0, got {value!r}")
            setattr(self, name, float(value))
        if self.lar and self.epsilon == 0:
            raise ValueError(f"{where}.epsilon must be > 0 with lar on (or turn lar off)")
        if self.rcsl_norm not in RCSL_NORMS:
            raise ValueError(f"{where}.rcsl_norm must be one of {RCSL_NORMS}, got {self.rcsl_norm!r}")
        if self.loc_positions not in LOC_POSITIONS:
            raise ValueError(
                f"{where}.loc_positions must be one of {LOC_POSITIONS}, got {self.loc_positions!r}"
            )

"""``LDKEConfig``: the PEFT config of LDKE (Localized and Disentangled Knowledge Editing), holding the
nested config of the editor it wraps and LDKE's own switches."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from odedit_hf.editing.peft_types import extend_peft_type
from odedit_hf.editing.wrapper import WrapperConfig

logger = logging.getLogger(__name__)

__all__ = ["GATE_MODES", "LOCALIZATION_SCORES", "LDKEConfig"]

#: How the classifier's decision gates the edit delta: a 0/1 route or a sigmoid weight.
GATE_MODES: tuple[str, ...] = ("hard", "soft")
#: The per-layer attribution of Fast Localization.
LOCALIZATION_SCORES: tuple[str, ...] = ("grad_x_weight", "grad_norm")


@dataclass
class LDKEConfig(WrapperConfig):
    """Configuration of LDKE around a base editor (see ``docs/methods/ldke.md`` for what the paper
    states and what is our design).

    The wrapped editor's adapter sits on every *candidate* decoder layer. Per edit, Fast Localization
    scores the candidate layers with one backward pass of the edit prompt's NLL and the edit trains the
    editor's parameters of the ``k`` best layers only (layers no edit has chosen contribute nothing).
    The Disentanglement Classifier, a logistic probe per edit on the model's own hidden states at the
    input of the lowest candidate layer, decides per input position whether the edit applies; the
    adapter layers' output is ``base(x) + gate · (adapter(x) - base(x))``.

    Args:
        editor (`PeftConfig`):
            The config of the wrapped editor, e.g. peft's `LoraConfig` or odedit-hf's `FTLConfig`. Saved
            nested in `adapter_config.json` and rebuilt on load.
        k (`int`, defaults to 1):
            Layers Fast Localization keeps per edit (all candidates when there are no more than `k`).
        localization (`bool`, defaults to True):
            Fast Localization on (ablation switch; `False` trains every candidate layer).
        localization_score (`str`, defaults to `"grad_x_weight"`):
            The layer score: `"grad_x_weight"` = sum of |dL/dW * W| over the layer's edited projections
            (W the base weight), `"grad_norm"` = the Frobenius norm of dL/dW.
        candidate_layers (`list[int] | None`, defaults to None):
            Decoder layers the adapter sits on, for FFN editors (FT-L, LoRA) whose own `layers` is unset;
            `None` = every decoder layer. Editors that choose their own layer (GRACE, T-Patcher) take
            their own targets as the candidates.
        classifier (`bool`, defaults to True):
            Disentanglement Classifier on (ablation switch; `False` applies the edit to every input).
        gate (`str`, defaults to `"hard"`):
            `"hard"`: the delta applies where the classifier's logit is > 0 and not at all elsewhere (an
            out-of-scope input gets the base output bit for bit); `"soft"`: scaled by the sigmoid.
        classifier_steps (`int`, defaults to 200):
            Adam steps of the per-edit logistic classifier.
        classifier_lr (`float`, defaults to 0.05):
            Its learning rate.
        classifier_weight_decay (`float`, defaults to 0.001):
            Its L2 penalty (on the weight vector).
        classifier_capacity (`int`, defaults to 256):
            Classifier slots in the adapter (one per edited request; fixed so that a saved adapter
            loads with stock peft). A sequential run longer than this raises.
        num_rephrases (`int`, defaults to 1):
            Rephrase prompts per kind (text, image) among the classifier's positives.
        negative_pool (`int`, defaults to 256):
            Feature rows of earlier edits' prompts kept as extra negatives (unrelated records); 0 = none.
    """

    k: int = field(default=1, metadata={"help": "Layers kept per edit by Fast Localization."})
    localization: bool = field(default=True, metadata={"help": "Fast Localization on/off."})
    localization_score: str = field(default="grad_x_weight", metadata={"help": "grad_x_weight | grad_norm."})
    candidate_layers: list[int] | None = field(
        default=None, metadata={"help": "Candidate decoder layers (FFN editors); None = all."}
    )
    classifier: bool = field(default=True, metadata={"help": "Disentanglement Classifier on/off."})
    gate: str = field(default="hard", metadata={"help": "hard | soft."})
    classifier_steps: int = field(default=200, metadata={"help": "Adam steps of the classifier."})
    classifier_lr: float = field(default=0.05, metadata={"help": "Classifier learning rate."})
    classifier_weight_decay: float = field(default=1e-3, metadata={"help": "Classifier L2 penalty."})
    classifier_capacity: int = field(default=256, metadata={"help": "Classifier slots in the adapter."})
    num_rephrases: int = field(default=1, metadata={"help": "Rephrases per kind among the positives."})
    negative_pool: int = field(default=256, metadata={"help": "Earlier edits' feature rows as negatives."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = extend_peft_type("LDKE")
        where = "LDKEConfig"
        for name in ("k", "classifier_steps", "classifier_capacity", "num_rephrases"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{where}.{name} must be a positive int, got {value!r}")
        if (
            isinstance(self.negative_pool, bool)
            or not isinstance(self.negative_pool, int)
            or self.negative_pool < 0
        ):
            raise ValueError(f"{where}.negative_pool must be an int >= 0, got {self.negative_pool!r}")
        for name in ("localization", "classifier"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{where}.{name} must be True or False, got {getattr(self, name)!r}")
        if self.localization_score not in LOCALIZATION_SCORES:
            raise ValueError(
                f"{where}.localization_score must be one of {LOCALIZATION_SCORES}, got {self.localization_score!r}"
            )
        if self.gate not in GATE_MODES:
            raise ValueError(f"{where}.gate must be one of {GATE_MODES}, got {self.gate!r}")
        for name in ("classifier_lr", "classifier_weight_decay"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"{where}.{name} must be a finite number >= 0, got {value!r}")
            setattr(self, name, float(value))
        if self.classifier_lr == 0:
            raise ValueError(f"{where}.classifier_lr must be > 0")
        if self.candidate_layers is not None:
            layers = self.candidate_layers
            if isinstance(layers, int) and not isinstance(layers, bool):
                layers = [layers]
            if (
                not isinstance(layers, (list, tuple))
                or not layers
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
            ):
                raise ValueError(
                    f"{where}.candidate_layers must be a non-empty list of layer indices or None, got {layers!r}"
                )
            self.candidate_layers = list(layers)

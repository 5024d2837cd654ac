"""Configuration of SERAC (semi-parametric editing with a retrieval-augmented counterfactual model,
Mitchell et al., ICML 2022)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig
from peft.utils import PeftType

__all__ = ["POOLINGS", "SIMILARITIES", "SERACConfig"]

#: How the classifier pools a row's prompt states: their mean, or the last prompt position's state.
POOLINGS: tuple[str, ...] = ("mean", "last")
#: The scope classifier's similarities: ``"l2"`` (``exp(-scale * squared L2)``, EasyEdit's) or
#: ``"cos"`` (``sigmoid(scale * (cos - 0.5))`` -- cosine mapped into (0, 1)).
SIMILARITIES: tuple[str, ...] = ("l2", "cos")


def _check_int(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"SERACConfig.{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_float(name: str, value: object, *, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"SERACConfig.{name} must be a number, got {value!r}")
    value = float(value)
    if not value > low or (high is not None and not value < high):
        bound = f"in ({low}, {high})" if high is not None else f"> {low}"
        raise ValueError(f"SERACConfig.{name} must be {bound}, got {value!r}")
    return value


@dataclass
class SERACConfig(PeftConfig):
    """Configuration of a SERAC adapter: a cache of edits, a scope classifier and a counterfactual model.

    The adapter holds (see :mod:`.layer`): on the model's input embedding, the cache (each edit's context
    tokens and the base model's pooled image+text features of its input) and the scope classifier (a
    linear projection and a learned scale); on every ``cf_modules`` linear layer, a low-rank delta that is
    switched on only inside the counterfactual model's forward. The routing runs around the whole
    model's forward (:class:`~.model.SERACModel`). An empty cache, or ``disable_adapter()``, leaves every
    forward exactly as the base model computes it.

    Args:
        target_modules (`list[str] | None`):
            ``[embedding] + cf linear modules``: the input embedding (first, named again by
            ``embedding_module``) and the linear layers that get the counterfactual model's low-rank delta.
        embedding_module (`str | None`):
            The input embedding's module name (holds the cache and the classifier).
        rank (`int`): rank of the counterfactual model's low-rank deltas.
        alpha (`float`): their scaling is ``alpha / rank``.
        proj_dim (`int`): width of the scope classifier's projection.
        copy_dim (`int`): width of the counterfactual model's copy head (``0``: no copy head, the
            counterfactual output is the delta-adapted model's own softmax).
        hidden_size (`int`): width of the pooled features (the language model's hidden size).
        cls_layer (`int`): which entry of the base model's ``hidden_states`` is pooled (``-1``: the last).
        pooling (`str`): ``"mean"`` over the prompt positions or ``"last"`` (see :data:`POOLINGS`).
        similarity (`str`): ``"l2"`` or ``"cos"`` (see :data:`SIMILARITIES`).
        threshold (`float`): an input is in scope when its best similarity exceeds this (0.5).
    """

    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "The input embedding, then the counterfactual model's linears."}
    )
    embedding_module: str | None = field(default=None, metadata={"help": "The input embedding's name."})
    rank: int = field(default=16, metadata={"help": "Rank of the counterfactual deltas."})
    alpha: float = field(default=32.0, metadata={"help": "Scaling alpha / rank of the deltas."})
    proj_dim: int = field(default=64, metadata={"help": "Width of the classifier's projection."})
    copy_dim: int = field(default=32, metadata={"help": "Width of the copy head (0: none)."})
    hidden_size: int = field(default=0, metadata={"help": "Width of the pooled features."})
    cls_layer: int = field(default=-1, metadata={"help": "hidden_states entry the classifier pools."})
    pooling: str = field(default="mean", metadata={"help": "'mean' or 'last'."})
    similarity: str = field(default="l2", metadata={"help": "'l2' or 'cos'."})
    threshold: float = field(default=0.5, metadata={"help": "In scope when the similarity exceeds it."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.SERAC
        if self.target_modules is None or self.embedding_module is None:
            raise ValueError(
                "SERACConfig.target_modules and embedding_module are required: name the input embedding and "
                "the counterfactual model's linear layers (get_method('serac').peft_config(backbone) picks them)"
            )
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        names = list(self.target_modules)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"SERACConfig.target_modules must be module names, got {self.target_modules!r}")
        if self.embedding_module not in names:
            raise ValueError(
                f"SERACConfig.embedding_module {self.embedding_module!r} must be one of target_modules"
            )
        self.target_modules = set(names)
        self.rank = _check_int("rank", self.rank, minimum=1)
        self.alpha = _check_float("alpha", self.alpha, low=0.0)
        self.proj_dim = _check_int("proj_dim", self.proj_dim, minimum=1)
        self.copy_dim = _check_int("copy_dim", self.copy_dim, minimum=0)
        self.hidden_size = _check_int("hidden_size", self.hidden_size, minimum=1)
        if isinstance(self.cls_layer, bool) or not isinstance(self.cls_layer, int):
            raise ValueError(f"SERACConfig.cls_layer must be an int, got {self.cls_layer!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"SERACConfig.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"SERACConfig.similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        self.threshold = _check_float("threshold", self.threshold, low=0.0, high=1.0)

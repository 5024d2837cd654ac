"""Configuration of UniKE (Pan et al., "Towards Unified Multimodal Editing with Enhanced Knowledge
Collaboration", NeurIPS 2024) as a PEFT adapter."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from peft.config import PeftConfig
from peft.utils import PeftType

__all__ = ["UniKEConfig"]

_ROLES = ("key", "up", "value")


@dataclass
class UniKEConfig(PeftConfig):
    """Configuration of a UniKE adapter: patch neurons in FFN(s) plus a latent key-value memory at the
    self-attention output of one decoder layer, with the two projection heads of the disentangled spaces.

    The adapter is the identity when fresh: no neuron, no memory entry (the heads are stored but act only
    through the memory). Everything grows edit by edit and is saved with the adapter.

    Args:
        patch_modules (`dict[str, str]`):
            Full names of the patched FFN projections mapped to their T-Patcher role (``key``, ``up``,
            ``value``; see :data:`odedit_hf.editors.tpatcher.config.ROLES`), for every patched layer.
        memory_module (`str`):
            Full name of the self-attention output projection (``o_proj``) whose *input* carries the latent
            key-value memory.
        sem_dim (`int`):
            Width of the semantic space (the retrieval head's output).
        tru_dim (`int`):
            Width of the truthfulness space.
        ffn_dim (`int`):
            Input width of the patched FFNs (the truthfulness head reads those states).
        scale_init (`float`):
            Initial output scale ``a`` of a new patch neuron (T-Patcher's ``amplify_con``).
        sim_threshold (`float`):
            Retrieval gate: a memory entry acts at a position only where the cosine similarity of the
            position's state and the entry's anchor (in the semantic space) exceeds this.
        alpha_max (`float`):
            Largest mixing weight ``α`` of the retrieved in-context knowledge (at similarity 1).
        semantic_retrieval (`bool`):
            ``True``: retrieval compares states in the semantic space (the trained head); ``False``: in the
            raw hidden space (the ablation without disentanglement).
        init_weights (`bool`):
            ``True``: new neurons start with zero value columns (adding them changes nothing).
    """

    patch_modules: dict[str, str] | None = field(default=None, metadata={"help": "FFN projection -> role."})
    memory_module: str | None = field(default=None, metadata={"help": "Self-attention output projection."})
    sem_dim: int = field(default=16, metadata={"help": "Width of the semantic space."})
    tru_dim: int = field(default=16, metadata={"help": "Width of the truthfulness space."})
    ffn_dim: int = field(default=0, metadata={"help": "Input width of the patched FFNs."})
    scale_init: float = field(default=10.0, metadata={"help": "Initial output scale a of a new neuron."})
    sim_threshold: float = field(default=0.5, metadata={"help": "Retrieval gate on the cosine similarity."})
    alpha_max: float = field(default=1.0, metadata={"help": "Largest mixing weight of the memory."})
    semantic_retrieval: bool = field(default=True, metadata={"help": "Retrieve in the semantic space."})
    init_weights: bool = field(default=True, metadata={"help": "New neurons start with zero value columns."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Set from patch_modules and memory_module; do not pass."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.UNIKE
        if not isinstance(self.patch_modules, dict) or not self.patch_modules:
            raise ValueError(
                f"UniKEConfig.patch_modules must map FFN projection names to roles, got {self.patch_modules!r}; "
                "build the config with get_method('unike').peft_config(backbone)"
            )
        bad = {k: v for k, v in self.patch_modules.items() if v not in _ROLES or not isinstance(k, str)}
        if bad:
            raise ValueError(f"UniKEConfig.patch_modules: roles must be one of {_ROLES}, got {bad}")
        if not isinstance(self.memory_module, str) or not self.memory_module:
            raise ValueError(
                f"UniKEConfig.memory_module must name the self-attention output projection, got "
                f"{self.memory_module!r}"
            )
        if self.memory_module in self.patch_modules:
            raise ValueError(f"UniKEConfig: {self.memory_module!r} cannot be both patched and the memory")
        for name in ("sem_dim", "tru_dim", "ffn_dim"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (0 if name == "ffn_dim" else 1)
            ):
                raise ValueError(f"UniKEConfig.{name} must be a positive int, got {value!r}")
        for name in ("scale_init", "sim_threshold", "alpha_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"UniKEConfig.{name} must be a finite number, got {value!r}")
            setattr(self, name, float(value))
        if self.scale_init <= 0 or not -1.0 <= self.sim_threshold < 1.0 or not 0.0 < self.alpha_max <= 1.0:
            raise ValueError(
                "UniKEConfig: scale_init must be > 0, sim_threshold in [-1, 1) and alpha_max in (0, 1]; got "
                f"{self.scale_init}, {self.sim_threshold}, {self.alpha_max}"
            )
        expected = {*self.patch_modules, self.memory_module}
        if self.target_modules is not None and set(self.target_modules) != expected:
            raise ValueError(
                f"UniKEConfig.target_modules is derived from patch_modules and memory_module ({sorted(expected)}); "
                f"got {self.target_modules!r}"
            )
        self.target_modules = expected

    def role_of(self, module_name: str) -> str:
        """``key`` / ``up`` / ``value`` for a patched projection, ``memory`` for the memory module."""
        for name, role in [(self.memory_module, "memory"), *self.patch_modules.items()]:
            if module_name == name or module_name.endswith("." + name):
                return role
        raise ValueError(f"UniKE: module {module_name!r} is neither patched nor the memory module")

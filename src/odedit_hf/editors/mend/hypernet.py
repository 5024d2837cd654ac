"""MEND's gradient-decomposition hypernetwork (Mitchell et al., "Fast Model Editing at Scale", ICLR 2022).

For an edited ``nn.Linear`` with input ``u`` (per token, ``in`` wide) and output gradient ``δ`` (``out``
wide), the gradient of the weight is the rank-1 sum ``Σ_t δ_t u_tᵀ``. MEND transforms each token's pair:

1. normalise: ``u ← (u - μ_u) / σ_u``, ``δ ← (δ - μ_δ) / σ_δ`` with per-feature statistics of the training
   edits (:class:`RunningStats`; frozen once training ends — never updated at edit time);
2. one identity-initialised low-rank MLP per weight *shape* (shared across the layers of that shape, with a
   per-layer scale and shift of its input, MEND's ``mode`` embeddings) on the concatenation ``[u; δ]``
   (``combine``), whose output layer starts at zero so the network starts as the identity through its
   residual (:class:`LowRankResidual`);
3. the update ``ΔW_l = -η_l Σ_t δ̃_t ũ_tᵀ`` with a learned per-layer step ``η_l``.

:class:`MENDNet` holds the transforms and the steps for a fixed list of edited modules; :func:`save_net` /
:func:`load_net` write and read it as a safetensors artefact with its config and the identity of the base
model it was trained for (:func:`base_identity`), and :func:`check_identity` refuses another model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "ARTEFACT_CONFIG",
    "ARTEFACT_WEIGHTS",
    "LowRankResidual",
    "MENDNet",
    "MENDNetConfig",
    "RunningStats",
    "base_identity",
    "check_identity",
    "load_net",
    "save_net",
]

ARTEFACT_CONFIG = "mend_config.json"
ARTEFACT_WEIGHTS = "model.safetensors"
ARTEFACT_FORMAT = "odedit-hf/mend-hypernet"
ARTEFACT_VERSION = 1
_EPS = 1e-7


@dataclass
class MENDNetConfig:
    """What defines a MEND hypernetwork.

    Args:
        modules: the edited ``nn.Linear`` modules (names relative to the transformers model), in order.
        shapes: ``[in_features, out_features]`` of each module.
        rank: the hidden rank of each low-rank layer (capped at the layer's width ``in + out``).
        n_hidden: hidden layers of the MLP (MEND: 1), each followed by a ReLU; plus one output layer.
        combine: one MLP on ``[u; δ]`` (MEND's default) rather than one per side.
        edit_lr: the initial per-layer step ``η_l``.
        norm: normalise ``u`` and ``δ`` by the training statistics.
    """

    modules: list[str]
    shapes: list[list[int]]
    rank: int = 1920
    n_hidden: int = 1
    combine: bool = True
    edit_lr: float = 1e-3
    norm: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.modules or len(self.modules) != len(self.shapes):
            raise ValueError(
                f"MENDNetConfig: give one [in, out] shape per module, got {len(self.modules)} modules and "
                f"{len(self.shapes)} shapes"
            )
        self.shapes = [[int(s[0]), int(s[1])] for s in self.shapes]
        for name, value, low in (("rank", self.rank, 1), ("n_hidden", self.n_hidden, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"MENDNetConfig.{name} must be an int >= {low}, got {value!r}")
        if isinstance(self.edit_lr, bool) or not isinstance(self.edit_lr, (int, float)):
            raise ValueError(f"MENDNetConfig.edit_lr must be a number, got {self.edit_lr!r}")
        if not math.isfinite(self.edit_lr):
            raise ValueError(f"MENDNetConfig.edit_lr must be finite, got {self.edit_lr!r}")
        self.edit_lr = float(self.edit_lr)

    def shape_key(self, index: int) -> str:
        i, o = self.shapes[index]
        return f"{i}x{o}"


class RunningStats(nn.Module):
    """Per-feature mean and standard deviation of a stream of vectors (Chan et al.'s parallel update, in
    float64); :meth:`update` adds a batch, and nothing else changes them.

    Buffers (saved): ``count`` (scalar), ``mean`` and ``m2`` (``dim``). With fewer than two samples
    :meth:`normalise` falls back to a per-call RMS scaling (an untrained network; see :class:`MENDNet`).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @property
    def ready(self) -> bool:
        return float(self.count) >= 2

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` ``(n, dim)``."""
        x = x.detach().to(torch.float64).reshape(-1, self.mean.shape[0])
        n = x.shape[0]
        if n == 0:
            return
        mean_b = x.mean(0)
        self.merge(n, mean_b, ((x - mean_b) ** 2).sum(0))

    @torch.no_grad()
    def merge(self, count: float | torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Add the summary ``(count, mean, m2)`` of other rows (e.g. another process's share of the
        statistics pass); a count of 0 adds nothing."""
        n = float(count)
        if n == 0:
            return
        mean = mean.to(self.mean.device, torch.float64)
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += m2.to(self.m2.device, torch.float64) + delta**2 * (self.count * n / total)
        self.count.fill_(float(total))

    def std(self) -> torch.Tensor:
        return (self.m2 / (self.count - 1).clamp(min=1)).sqrt()

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / (std + eps)`` (float32), or ``x / rms(x)`` when the statistics are not ready."""
        if not self.ready:
            return x / (x.pow(2).mean().sqrt() + _EPS)
        mean = self.mean.to(x.device, torch.float32)
        std = self.std().to(x.device, torch.float32)
        return (x - mean) / (std + _EPS)


class LowRankResidual(nn.Module):
    """``x' = x·scale_m + shift_m``; ``y = x' + act(U V x' + b)``, ``U`` zero-initialised (identity at init).

    ``scale_m`` / ``shift_m`` are per-mode (per edited layer) embeddings, initialised to 1 / 0.
    """

    def __init__(self, dim: int, rank: int, n_modes: int, relu: bool) -> None:
        super().__init__()
        rank = min(rank, dim)
        self.relu = relu
        self.u = nn.Parameter(torch.zeros(dim, rank))
        self.v = nn.Parameter(torch.empty(rank, dim))
        nn.init.xavier_uniform_(self.v)
        self.bias = nn.Parameter(torch.zeros(dim))
        self.mode_scale = nn.Parameter(torch.ones(n_modes, dim))
        self.mode_shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, x: torch.Tensor, mode: int) -> torch.Tensor:
        x = x * self.mode_scale[mode] + self.mode_shift[mode]
        h = (x @ self.v.T) @ self.u.T + self.bias
        if self.relu:
            h = h.clamp(min=0)
        return x + h


class _MLP(nn.Module):
    def __init__(self, dim: int, rank: int, n_hidden: int, n_modes: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [LowRankResidual(dim, rank, n_modes, relu=i < n_hidden) for i in range(n_hidden + 1)]
        )

    def forward(self, x: torch.Tensor, mode: int) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mode)
        return x


class GradientTransform(nn.Module):
    """The transform of one weight shape ``(in, out)``: statistics of ``u`` and ``δ`` and the MLP(s)."""

    def __init__(self, in_features: int, out_features: int, config: MENDNetConfig, n_modes: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.combine = config.combine
        self.norm = config.norm
        self.stats_u = RunningStats(in_features)
        self.stats_d = RunningStats(out_features)
        if config.combine:
            self.mlp = _MLP(in_features + out_features, config.rank, config.n_hidden, n_modes)
        else:
            self.mlp_u = _MLP(in_features, config.rank, config.n_hidden, n_modes)
            self.mlp_d = _MLP(out_features, config.rank, config.n_hidden, n_modes)

    def forward(self, u: torch.Tensor, d: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        u, d = u.to(torch.float32), d.to(torch.float32)
        if self.norm:
            u, d = self.stats_u.normalise(u), self.stats_d.normalise(d)
        if self.combine:
            out = self.mlp(torch.cat([u, d], dim=-1), mode)
            return out[..., : self.in_features], out[..., self.in_features :]
        return self.mlp_u(u, mode), self.mlp_d(d, mode)


class MENDNet(nn.Module):
    """MEND's hypernetwork for the edited modules of one base model (see the module docstring).

    Args:
        config: the :class:`MENDNetConfig` (modules, shapes, sizes).

    Attributes:
        transforms: one :class:`GradientTransform` per weight shape (key ``"{in}x{out}"``).
        edit_lrs: ``η_l`` per edited module, in ``config.modules`` order.
    """

    def __init__(self, config: MENDNetConfig) -> None:
        super().__init__()
        self.config = config
        self._mode: list[tuple[str, int]] = []
        counts: dict[str, int] = {}
        for i in range(len(config.modules)):
            key = config.shape_key(i)
            self._mode.append((key, counts.get(key, 0)))
            counts[key] = counts.get(key, 0) + 1
        self.transforms = nn.ModuleDict(
            {
                key: GradientTransform(*[int(v) for v in key.split("x")], config, n_modes=n)
                for key, n in counts.items()
            }
        )
        self.edit_lrs = nn.Parameter(torch.full((len(config.modules),), config.edit_lr))

    @property
    def trained(self) -> bool:
        """Whether every transform has its normalisation statistics (an untrained net normalises by RMS)."""
        return all(t.stats_u.ready and t.stats_d.ready for t in self.transforms.values())

    def transform(self, index: int) -> tuple[GradientTransform, int]:
        key, mode = self._mode[index]
        return self.transforms[key], mode

    @torch.no_grad()
    def update_stats(self, index: int, u: torch.Tensor, d: torch.Tensor) -> None:
        """Add one module's token rows ``u (n, in)``, ``d (n, out)`` to its shape's statistics."""
        t, _ = self.transform(index)
        t.stats_u.update(u)
        t.stats_d.update(d)

    def factors(self, index: int, u: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The update of module ``index`` from its token rows: ``(A, B)`` with ``ΔW = B·A``,
        ``A = ũ (n, in)``, ``B = -η δ̃ᵀ (out, n)`` (differentiable w.r.t. the network and ``η``)."""
        t, mode = self.transform(index)
        u_t, d_t = t(u, d, mode)
        return u_t, -(self.edit_lrs[index] * d_t).T


# ---------------------------------------------------------------------------------- base model identity
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "use_cache",
        "_attn_implementation_autoset",
    }
)


def _stable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _stable(v) for k, v in sorted(value.items()) if str(k) not in _VOLATILE_CONFIG_KEYS}
    if isinstance(value, (list, tuple)):
        return [_stable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def base_identity(model: nn.Module, modules: Sequence[str]) -> dict[str, Any]:
    """The identity of the base model a hypernetwork is trained for: its name, model type, a hash of its
    config (without volatile keys such as the path or the transformers version) and a hash of the edited
    modules' names, shapes, dtypes and weight values.

    Args:
        model: the plain transformers model (not PEFT-wrapped: the edited weights are read as they are).
        modules: the edited module names (relative to ``model``).
    """
    from odedit_hf.editing.rollback import hash_tensors

    config = model.config
    named = []
    for name in modules:
        module = model.get_submodule(name)
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        named.append((name, base.weight))
    config_hash = hashlib.sha256(json.dumps(_stable(config.to_dict()), sort_keys=True).encode()).hexdigest()
    return {
        "name_or_path": str(getattr(config, "_name_or_path", "") or ""),
        "model_type": str(getattr(config, "model_type", "")),
        "config_hash": config_hash[:32],
        "weights_hash": hash_tensors(named),
    }


def check_identity(saved: Mapping[str, Any], model: nn.Module, modules: Sequence[str], *, where: str) -> None:
    """Raise ``ValueError`` if ``model`` is not the base model the artefact at ``where`` was trained for.

    The config hash and the edited weights' hash must both match; the name may differ (a copied folder).
    """
    try:
        current = base_identity(model, modules)
    except AttributeError as exc:  # a module of the artefact is missing from this model
        raise ValueError(
            f"MEND artefact {where}: it was trained for {saved.get('name_or_path')!r} "
            f"({saved.get('model_type')}); this model has no module it edits ({exc}). Train a MEND "
            "hypernetwork for this model: odedit-hf train-editor --method mend --model M --data D --out DIR"
        ) from None
    problems = []
    if current["config_hash"] != saved.get("config_hash"):
        problems.append("its config differs")
    if current["weights_hash"] != saved.get("weights_hash"):
        problems.append("the weights of the edited modules differ (another checkpoint, or another dtype)")
    if problems:
        raise ValueError(
            f"MEND artefact {where} was trained for another base model: {saved.get('name_or_path')!r} "
            f"({saved.get('model_type')}), but this model is {current['name_or_path']!r} "
            f"({current['model_type']}) and {' and '.join(problems)}. A MEND hypernetwork only fits the model "
            "it was trained on: train one for this model with odedit-hf train-editor --method mend --model M "
            "--data D --out DIR"
        )
    if current["name_or_path"] != saved.get("name_or_path"):
        logger.info(
            "MEND artefact %s: trained for %r, loaded for %r (same config and weights)",
            where,
            saved.get("name_or_path"),
            current["name_or_path"],
        )


# ---------------------------------------------------------------------------------- artefact files
def save_net(
    net: MENDNet,
    folder: str,
    *,
    identity: Mapping[str, Any],
    training_args: Mapping[str, Any] | None = None,
    history: Sequence[Mapping[str, Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write the artefact files into ``folder`` (which must exist): ``model.safetensors`` (the network,
    float32), ``mend_config.json`` (format, network config, base identity, extra notes),
    ``training_args.json`` and ``training_history.json`` when given. Each file is written atomically."""
    from safetensors.torch import save_file

    from odedit_hf.evaluation import write_json_atomic

    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    from odedit_hf.editing.saving import default_mode

    tmp = os.path.join(folder, f".{ARTEFACT_WEIGHTS}.tmp")
    save_file(state, tmp, metadata={"format": "pt"})
    os.chmod(tmp, default_mode())
    os.replace(tmp, os.path.join(folder, ARTEFACT_WEIGHTS))
    write_json_atomic(
        os.path.join(folder, ARTEFACT_CONFIG),
        {
            "format": ARTEFACT_FORMAT,
            "version": ARTEFACT_VERSION,
            "net": asdict(net.config),
            "base_model": dict(identity),
            **({"extra": dict(extra)} if extra else {}),
        },
    )
    if training_args is not None:
        write_json_atomic(os.path.join(folder, "training_args.json"), dict(training_args))
    if history is not None:
        write_json_atomic(os.path.join(folder, "training_history.json"), list(history))


def read_artefact_config(folder: str) -> dict[str, Any]:
    """``mend_config.json`` of the artefact at ``folder``.

    Raises:
        ValueError: no such folder, no or a damaged config, or not a MEND artefact.
    """
    path = os.path.join(folder, ARTEFACT_CONFIG)
    if not os.path.isdir(folder):
        raise ValueError(
            f"MEND editor_weights {folder!r}: no such folder; give the --out folder of "
            "'odedit-hf train-editor --method mend'"
        )
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(
            f"MEND editor_weights {folder!r} holds no {ARTEFACT_CONFIG}; it is not a MEND artefact (train one "
            "with 'odedit-hf train-editor --method mend')"
        ) from None
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"MEND editor_weights {folder!r}: {ARTEFACT_CONFIG} is not readable JSON ({exc})"
        ) from None
    if not isinstance(data, dict) or data.get("format") != ARTEFACT_FORMAT:
        raise ValueError(f"MEND editor_weights {folder!r}: {ARTEFACT_CONFIG} is not a MEND artefact config")
    if int(data.get("version", 0)) > ARTEFACT_VERSION:
        raise ValueError(
            f"MEND editor_weights {folder!r}: artefact version {data.get('version')} is newer than this "
            f"odedit-hf reads ({ARTEFACT_VERSION}); upgrade odedit-hf"
        )
    return data


def load_net(folder: str, model: nn.Module | None = None) -> MENDNet:
    """The :class:`MENDNet` of the artefact at ``folder``; with ``model``, check first that it is the base
    model the artefact was trained for (:func:`check_identity`).

    Raises:
        ValueError: not a MEND artefact, another base model, or damaged weights.
    """
    from safetensors.torch import load_file

    data = read_artefact_config(folder)
    config = MENDNetConfig(**data["net"])
    if model is not None:
        check_identity(data.get("base_model", {}), model, config.modules, where=repr(folder))
    net = MENDNet(config)
    try:
        state = load_file(os.path.join(folder, ARTEFACT_WEIGHTS))
    except (OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"MEND editor_weights {folder!r}: cannot read {ARTEFACT_WEIGHTS} ({exc})") from None
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(
            f"MEND editor_weights {folder!r}: {ARTEFACT_WEIGHTS} does not match {ARTEFACT_CONFIG} ({exc}); the "
            "artefact is damaged, train it again"
        ) from None
    for name, tensor in net.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"MEND editor_weights {folder!r}: {name} holds NaN/inf; the artefact is damaged")
    return net

"""The λ-network of ODEdit's primal–dual scheme, and the count-sketch of the edit parameters.

λ = φ(MLP(input)) with a 3-layer MLP whose output ``out`` is mapped to λ by the parametrisation φ
(``lambda_param``); the input is derived from the edit parameters θ:

- ``params``: θ flattened (as the paper). The first layer holds ``hidden × |θ|`` weights, so its
  memory grows with the edit (the paper reports BLIP-2 going from 28 to 47 GB).
- ``sketch``: a count-sketch ``S θ`` to ``k`` numbers (each coordinate of θ is added, with a random
  sign, to one of ``k`` buckets). Bucket and sign of coordinate ``j`` come from an integer hash of
  ``(seed, j)`` computed on the fly, chunk by chunk: the ``k × |θ|`` projection is never built or
  saved, a step costs O(|θ|) (a dense Gaussian projection would cost O(k·|θ|) and random numbers to
  match), and ``E‖Sθ‖² = ‖θ‖²`` (a JL-type sketch). For small edits the hash's output (12 bytes per
  coordinate: bucket int64, sign float32) is memoised process-wide, at most ``SKETCH_MEMO_BYTES`` in all,
  so the per-edit loop does not rehash the same coordinates at every step; larger edits are rehashed
  chunk by chunk in the forward and again in the backward (memory O(chunk)). The network's input is
  ``sqrt(k/|θ|)·Sθ``: each coordinate then has the scale of one edit parameter, as in ``params`` mode.
- ``fixed``: no network; λ is the constant ``lambda_init`` (ablation).

The output layer starts at zero weight, so λ starts at ``lambda_init`` whatever θ is. Parametrisations
(``lambda_param``), each with the *dual coordinate* ψ its dual step ascends:

- ``"softplus"``: λ = Softplus(out), the output bias set so that λ starts at ``lambda_init``; ψ = λ. This
  is the original one. Its dual gradient is ``P · σ(out)``, ≈ ``P · λ`` on Softplus's flat end, so the
  step changes λ by ≈ ``lr · P · λ²``: from ``lambda_init`` 1e-3 at P = 10, λ moves 1e-3 → 1.0037e-3 in
  3 steps (in effect a fixed λ), while from 0.1 at P = 100 it reaches the clamp of 10 in 3 steps.
- ``"log"``: λ = ``lambda_init · exp(out)`` (out = 0 at the start), clamped in log space to
  ``lambda_max``; ψ = out = log(λ / ``lambda_init``). The dual step is mirror (exponentiated-gradient)
  ascent: ``Δ log λ ≈ lr · (P − ε)``, the same relative move whatever λ is.
- ``"scaled_softplus"``: λ = ``lambda_init · Softplus(out) / log 2`` (out = 0 at the start);
  ψ = λ / ``lambda_init``: ``Δλ / lambda_init ≈ 0.5 · lr · (P − ε)`` at the start (σ(0)² / log² 2). λ can fall to 0, but
  like any Softplus it has a flat end there: far below ``lambda_init`` it rises again only slowly.

The dual objective is ``ψ · (P − ε)`` with ``ε = dual_slack`` (0: the original ``λ · P``, which can only
raise λ since P ≥ 0; ε > 0 lets λ fall while the penalty is below ε). The network records the signal
``∂loss/∂λ`` that reaches λ in the primal backward (a tensor hook: ``P`` for ``loss = R + λP``, summed
over gradient-accumulation backwards, multiplied by the loss scale under mixed precision) and the input
of its last forward; :meth:`LambdaNetwork.dual_backward` then fills the network's gradients with
``(P − ε) · ∂ψ/∂φ`` at that input. For ``softplus`` and ε = 0 this is exactly the gradient the primal
backward leaves in the network (``P · ∂λ/∂φ``). At the clamps (``lambda_max``, ``lambda_min``) the gradient
of ψ is kept only when it points back inside, so a clamped λ can come back (projected ascent). ``"log"``
needs the lower clamp (default ``lambda_init / 1000``): its dual gradient does not fade as λ falls, and the
ascent on a 3-layer network compounds, so an unbounded fall runs the network's weights to inf/NaN (the
two Softplus forms fade on their flat end instead).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import torch
from torch import nn

__all__ = [
    "LAMBDA_PARAMS",
    "SKETCH_MEMO_BYTES",
    "LambdaNetwork",
    "count_sketch",
    "lambda_network_num_parameters",
]

#: Parametrisations of λ by the network output (see the module docstring).
LAMBDA_PARAMS: tuple[str, ...] = ("softplus", "log", "scaled_softplus")

_CHUNK = 1 << 20  # coordinates hashed at once: 1M × (8 B index + 4 B sign) ≈ 12 MB of temporaries
#: Most bytes the process-wide memo of hashed (bucket, sign) tables may hold; one tensor's table is
#: memoised only if it takes at most a quarter of it. 0 turns the memo off.
SKETCH_MEMO_BYTES = 8 << 20
_MEMO_BYTES_PER_COORDINATE = 12  # int64 bucket + float32 sign
_memo: OrderedDict[tuple[int, int, int, str], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
_MIX1 = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64
_MIX2 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX3 = -7723592293110705685  # 0x94D049BB133111EB


def _hash(index: torch.Tensor, seed: int) -> torch.Tensor:
    """A splitmix64-style integer hash of ``index`` (int64, wrapping arithmetic; same on CPU and CUDA)."""
    x = index * _MIX1 + (seed * 2 + 1)
    x = x ^ (x >> 31)
    x = x * _MIX2
    x = x ^ (x >> 29)
    x = x * _MIX3
    return x ^ (x >> 32)


def _buckets_signs(
    start: int, stop: int, k: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    h = _hash(torch.arange(start, stop, device=device, dtype=torch.int64), seed)
    bucket = torch.remainder(h, k)
    sign = ((h >> 40) & 1).to(torch.float32) * 2.0 - 1.0
    return bucket, sign


def _memo_bytes() -> int:
    return sum(b.numel() * b.element_size() + s.numel() * s.element_size() for b, s in _memo.values())


def _tables(
    n: int, k: int, seed: int, device: torch.device
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """``(start, stop, bucket, sign)`` covering coordinates ``0..n-1``: the memoised table when it fits
    the memo, else freshly hashed chunks (bucket int64, sign float32 ±1)."""
    key = (n, k, seed, str(device))
    hit = _memo.get(key)
    if hit is None and 0 < n * _MEMO_BYTES_PER_COORDINATE <= SKETCH_MEMO_BYTES // 4:
        # the memo holds at most a few MB of tables: one hash call, no chunking needed
        hit = _memo[key] = _buckets_signs(0, n, k, seed, device)
        while len(_memo) > 1 and _memo_bytes() > SKETCH_MEMO_BYTES:
            _memo.popitem(last=False)  # least recently used first
    if hit is not None:
        _memo.move_to_end(key)
        yield 0, n, hit[0], hit[1]
        return
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        yield (start, stop, *_buckets_signs(start, stop, k, seed, device))


class _CountSketch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, flat: torch.Tensor, k: int, seed: int) -> torch.Tensor:  # noqa: ANN001
        out = torch.zeros(k, dtype=torch.float32, device=flat.device)
        for start, stop, bucket, sign in _tables(flat.numel(), k, seed, flat.device):
            out.scatter_add_(0, bucket, flat[start:stop].float() * sign)
        ctx.k, ctx.seed, ctx.n, ctx.dtype = k, seed, flat.numel(), flat.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # noqa: ANN001
        grad = torch.empty(ctx.n, dtype=ctx.dtype, device=grad_out.device)
        for start, stop, bucket, sign in _tables(ctx.n, ctx.k, ctx.seed, grad_out.device):
            grad[start:stop] = (torch.index_select(grad_out, 0, bucket) * sign).to(ctx.dtype)
        return grad, None, None


def count_sketch(params: Sequence[torch.Tensor], k: int, seed: int) -> torch.Tensor:
    """``S θ``: the count-sketch of the concatenated, flattened ``params`` to ``k`` float32 numbers.

    Differentiable w.r.t. every parameter; the projection is regenerated from ``seed`` on the fly.
    """
    if k < 1:
        raise ValueError(f"count_sketch: k must be >= 1, got {k}")
    if not params:
        raise ValueError("count_sketch: no parameters to sketch")
    outs = []
    offset = 0
    for p in params:
        flat = p.reshape(-1)
        # each tensor hashes its own coordinates with a seed offset, so the sketch of the concatenation is the
        # sum of per-tensor sketches (no |θ|-sized concatenated copy is made)
        outs.append(_CountSketch.apply(flat, k, seed + 1_000_003 * offset))
        offset += 1
    return torch.stack(outs).sum(0)


def _softplus_inverse(y: float) -> float:
    return y + math.log(-math.expm1(-y)) if y < 20 else y


class LambdaNetwork(nn.Module):
    """λ = φ(W3 ReLU(W2 ReLU(W1 u + b1) + b2) + b3), with ``u`` derived from the edit parameters.

    Args:
        mode: ``"params"`` | ``"sketch"`` | ``"fixed"`` (see the module docstring).
        num_edit_parameters: ``|θ|``, the number of edit parameters (the input size in ``params`` mode).
        hidden_size: width of the two hidden layers.
        sketch_dim: ``k`` in ``sketch`` mode.
        seed: seeds the sketch hash (and the initial weights unless ``init_seed`` is given).
        init_seed: seeds the network's initial weights (a local generator: the global RNG is not touched).
        lambda_init: λ at initialisation (and always, in ``fixed`` mode).
        lambda_max: clamp λ from above (``None``: free).
        lambda_min: clamp λ from below (``None``: ``lambda_init / 1000`` for ``"log"``, none otherwise).
        lambda_param: φ, ``"softplus"`` | ``"log"`` | ``"scaled_softplus"`` (see the module docstring).
        dual_slack: ε of the dual objective ``ψ · (P − ε)`` (0: λ can only rise).
    """

    def __init__(
        self,
        mode: str,
        num_edit_parameters: int,
        *,
        hidden_size: int = 64,
        sketch_dim: int = 128,
        seed: int = 0,
        lambda_init: float = 1.0,
        lambda_max: float | None = None,
        lambda_min: float | None = None,
        init_seed: int | None = None,
        lambda_param: str = "softplus",
        dual_slack: float = 0.0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("params", "sketch", "fixed"):
            raise ValueError(f"LambdaNetwork: mode must be 'params', 'sketch' or 'fixed', got {mode!r}")
        if num_edit_parameters < 1:
            raise ValueError(f"LambdaNetwork: num_edit_parameters must be >= 1, got {num_edit_parameters}")
        if lambda_init < 0:
            raise ValueError(f"LambdaNetwork: lambda_init must be >= 0, got {lambda_init}")
        if lambda_param not in LAMBDA_PARAMS:
            raise ValueError(
                f"LambdaNetwork: lambda_param must be one of {LAMBDA_PARAMS}, got {lambda_param!r}"
            )
        if lambda_param != "softplus" and mode != "fixed" and not lambda_init > 0:
            raise ValueError(
                f"LambdaNetwork: lambda_param={lambda_param!r} scales lambda_init, which must be > 0 (got "
                f"{lambda_init}); use lambda_param='softplus' or irm_penalty=False for a zero penalty"
            )
        if lambda_max is not None and lambda_max < lambda_init:
            raise ValueError(f"LambdaNetwork: lambda_max={lambda_max} is below lambda_init={lambda_init}")
        if lambda_min is None and lambda_param == "log":
            lambda_min = lambda_init / 1000.0
        if lambda_min is not None and not 0 <= lambda_min <= lambda_init:
            raise ValueError(
                f"LambdaNetwork: lambda_min={lambda_min} must be between 0 and lambda_init={lambda_init}"
            )
        if not dual_slack >= 0:
            raise ValueError(f"LambdaNetwork: dual_slack must be >= 0, got {dual_slack}")
        self.mode = mode
        self.num_edit_parameters = int(num_edit_parameters)
        self.sketch_dim = int(sketch_dim)
        self.seed = int(seed)
        self.init_seed = self.seed if init_seed is None else int(init_seed)
        self.lambda_init = float(lambda_init)
        self.lambda_max = lambda_max
        self.lambda_min = lambda_min
        self.lambda_param = lambda_param
        self.dual_slack = float(dual_slack)
        self._dual_input: torch.Tensor | None = None
        self._dual_signal: torch.Tensor | None = None
        if mode == "fixed":
            self.net = None
            return
        in_features = self.num_edit_parameters if mode == "params" else self.sketch_dim
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden_size, device=device),
            nn.ReLU(),
            nn.Linear(hidden_size, hidden_size, device=device),
            nn.ReLU(),
            nn.Linear(hidden_size, 1, device=device),
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise (deterministically from ``init_seed``): λ = ``lambda_init`` again."""
        self.clear_dual_record()
        if self.net is None:
            return
        gen = torch.Generator(device="cpu").manual_seed(self.init_seed)
        for layer in (self.net[0], self.net[2]):
            bound = 1.0 / math.sqrt(layer.in_features)
            # generated on the CPU in row blocks, so that a huge first layer (params mode) needs no second copy
            rows = max(1, (1 << 24) // max(layer.in_features, 1))
            for start in range(0, layer.out_features, rows):
                block = torch.rand(min(rows, layer.out_features - start), layer.in_features, generator=gen)
                layer.weight[start : start + block.shape[0]].copy_(block.mul_(2 * bound).sub_(bound))
            layer.bias.copy_(torch.rand(layer.out_features, generator=gen).mul_(2 * bound).sub_(bound))
        last = self.net[4]
        last.weight.zero_()
        if self.lambda_param == "softplus":
            last.bias.fill_(_softplus_inverse(max(self.lambda_init, 1e-6)))
        else:
            last.bias.zero_()  # out = 0: lambda_init * exp(0), lambda_init * softplus(0) / log 2

    def features(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """The network input derived from the edit parameters (float32, 1-D)."""
        if self.mode == "params":
            flat = torch.cat([p.reshape(-1).float() for p in params])
            if flat.numel() != self.num_edit_parameters:
                raise ValueError(
                    f"LambdaNetwork: built for {self.num_edit_parameters} edit parameters, got {flat.numel()}; "
                    "rebuild it for this adapter"
                )
            return flat
        # Sθ keeps ‖θ‖ but spreads it over k coordinates, each ~sqrt(|θ|/k) times an edit parameter; scaled
        # back, every input coordinate has the scale of one edit parameter, as in `params` mode, so the two
        # networks (same fan-in-scaled init) see θ move at the same rate. Unscaled, the sketch network was
        # sqrt(|θ|/k) ≈ 23x more sensitive on the tiny world and sequential edits took 13 steps instead of 5.
        scale = math.sqrt(self.sketch_dim / self.num_edit_parameters)
        return count_sketch(params, self.sketch_dim, self.seed) * scale

    def _out_of(self, lam: float | None) -> float | None:
        """The network output giving λ = ``lam`` (``None`` for no clamp, ``-inf`` for λ = 0)."""
        if lam is None:
            return None
        if self.lambda_param == "softplus":
            return _softplus_inverse(lam) if lam > 0 else -math.inf
        ratio = lam / self.lambda_init
        if self.lambda_param == "log":
            return math.log(ratio) if ratio > 0 else -math.inf
        return _softplus_inverse(ratio * math.log(2.0)) if ratio > 0 else -math.inf

    def _lambda(self, out: torch.Tensor) -> torch.Tensor:
        if self.lambda_param == "log":
            lo, hi = self._out_of(self.lambda_min), self._out_of(self.lambda_max)
            if lo is not None or hi is not None:
                out = out.clamp(min=lo, max=hi)
            return self.lambda_init * torch.exp(out)
        if self.lambda_param == "softplus":
            lam = nn.functional.softplus(out)
        else:
            lam = self.lambda_init * nn.functional.softplus(out) / math.log(2.0)
        if self.lambda_max is not None or self.lambda_min:
            lam = lam.clamp(min=self.lambda_min or None, max=self.lambda_max)
        return lam

    def _psi(self, out: torch.Tensor) -> torch.Tensor:
        """The dual coordinate ψ of ``out`` (unclamped)."""
        if self.lambda_param == "softplus":
            return nn.functional.softplus(out)
        if self.lambda_param == "log":
            return out
        return nn.functional.softplus(out) / math.log(2.0)

    def forward(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """λ as a 0-dim tensor (differentiable w.r.t. the network and the edit parameters).

        With gradients enabled, the input is kept and ``∂loss/∂λ`` of the coming backward(s) is recorded for
        :meth:`dual_backward`.
        """
        if self.net is None:
            device = params[0].device if params else None
            return torch.tensor(self.lambda_init, device=device)
        u = self.features(params).to(self.net[0].weight.dtype)
        lam = self._lambda(self.net(u).reshape(()))
        if torch.is_grad_enabled() and lam.requires_grad:
            self._dual_input = u.detach()
            lam.register_hook(self._record_signal)
        return lam

    def _record_signal(self, grad: torch.Tensor) -> None:
        grad = grad.detach().float().reshape(())
        self._dual_signal = grad if self._dual_signal is None else self._dual_signal + grad

    def clear_dual_record(self, *, keep_input: bool = False) -> None:
        """Forget the recorded ``∂loss/∂λ`` and, unless ``keep_input``, the input of the last forward.

        ``keep_input=True`` after an extra autograd pass through λ (e.g. a diagnostic gradient) that must not
        count as the primal signal.
        """
        if not keep_input:
            self._dual_input = None
        self._dual_signal = None

    @property
    def dual_signal(self) -> float | None:
        """``∂loss/∂λ`` recorded since the last dual step (``None``: no backward reached λ)."""
        return None if self._dual_signal is None else float(self._dual_signal)

    def dual_backward(
        self, *, penalty: float | torch.Tensor | None = None, loss_scale: float = 1.0
    ) -> float | None:
        """Fill the network's gradients with those of the dual objective ``ψ · (P − ε)`` and forget the record.

        Gradients already in the network (the primal backward's ``P · ∂λ/∂φ``) are replaced.

        Args:
            penalty: ``P``; default the recorded ``∂loss/∂λ`` divided by ``loss_scale``.
            loss_scale: the factor the loss was multiplied by before the backward (mixed-precision scaler).

        Returns:
            The ``P`` used, or ``None`` when there is nothing to ascend on (no record, or a non-finite ``P``:
            the gradients are then cleared and the caller should skip the optimiser step).
        """
        if self.net is None:
            return None
        signal, u = self._dual_signal, self._dual_input
        self.clear_dual_record()
        for p in self.parameters():
            p.grad = None
        if penalty is None:
            if signal is None:
                return None
            if not loss_scale > 0:
                raise ValueError(f"LambdaNetwork.dual_backward: loss_scale must be > 0, got {loss_scale}")
            penalty = signal / loss_scale
        value = float(penalty)
        if not math.isfinite(value) or u is None:
            return None
        drive = value - self.dual_slack
        with torch.enable_grad():
            out = self.net(u).reshape(())
            lo, hi = self._out_of(self.lambda_min), self._out_of(self.lambda_max)
            at_top = hi is not None and float(out.detach()) >= hi and drive > 0
            at_bottom = lo is not None and float(out.detach()) <= lo and drive < 0
            if at_top or at_bottom:
                return value  # clamped and pushed further out: no gradient (as the forward's clamp)
            (self._psi(out) * drive).backward()
        return value

    def memory_bytes(self) -> int:
        """Bytes held by the network's parameters (excluding optimiser state and gradients)."""
        return sum(p.numel() * p.element_size() for p in self.parameters())


def lambda_network_num_parameters(
    mode: str, num_edit_parameters: int, hidden_size: int, sketch_dim: int
) -> int:
    """Number of λ-network parameters for a given edit size, without building it (for memory estimates)."""
    if mode == "fixed":
        return 0
    in_features = num_edit_parameters if mode == "params" else sketch_dim
    return in_features * hidden_size + hidden_size + hidden_size * hidden_size + hidden_size + hidden_size + 1

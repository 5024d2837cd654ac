"""The λ-network of ODEdit's primal–dual scheme, and the count-sketch of the edit parameters.

λ = Softplus(MLP(input)) with a 3-layer MLP; the input is derived from the edit parameters θ:

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

The output layer starts at zero weight and a bias with Softplus(bias) = ``lambda_init``, so λ starts at
``lambda_init`` whatever θ is. The dual step ascends the network's parameters on ``R + λ·P``: its
gradient is ``P · ∂λ/∂φ`` and, as ``P ≥ 0``, raises λ while the penalty is positive.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import torch
from torch import nn

__all__ = ["SKETCH_MEMO_BYTES", "LambdaNetwork", "count_sketch", "lambda_network_num_parameters"]

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
    """λ = Softplus(W3 ReLU(W2 ReLU(W1 u + b1) + b2) + b3), with ``u`` derived from the edit parameters.

    Args:
        mode: ``"params"`` | ``"sketch"`` | ``"fixed"`` (see the module docstring).
        num_edit_parameters: ``|θ|``, the number of edit parameters (the input size in ``params`` mode).
        hidden_size: width of the two hidden layers.
        sketch_dim: ``k`` in ``sketch`` mode.
        seed: seeds the sketch hash (and the initial weights unless ``init_seed`` is given).
        init_seed: seeds the network's initial weights (a local generator: the global RNG is not touched).
        lambda_init: λ at initialisation (and always, in ``fixed`` mode).
        lambda_max: clamp λ from above (``None``: free).
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
        init_seed: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("params", "sketch", "fixed"):
            raise ValueError(f"LambdaNetwork: mode must be 'params', 'sketch' or 'fixed', got {mode!r}")
        if num_edit_parameters < 1:
            raise ValueError(f"LambdaNetwork: num_edit_parameters must be >= 1, got {num_edit_parameters}")
        if lambda_init < 0:
            raise ValueError(f"LambdaNetwork: lambda_init must be >= 0, got {lambda_init}")
        self.mode = mode
        self.num_edit_parameters = int(num_edit_parameters)
        self.sketch_dim = int(sketch_dim)
        self.seed = int(seed)
        self.init_seed = self.seed if init_seed is None else int(init_seed)
        self.lambda_init = float(lambda_init)
        self.lambda_max = lambda_max
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
            nn.Softplus(),
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise (deterministically from ``init_seed``): λ = ``lambda_init`` again."""
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
        last.bias.fill_(_softplus_inverse(max(self.lambda_init, 1e-6)))

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

    def forward(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """λ as a 0-dim tensor (differentiable w.r.t. the network and the edit parameters)."""
        if self.net is None:
            device = params[0].device if params else None
            return torch.tensor(self.lambda_init, device=device)
        u = self.features(params).to(self.net[0].weight.dtype)
        lam = self.net(u).reshape(())
        if self.lambda_max is not None:
            lam = lam.clamp(max=self.lambda_max)
        return lam

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

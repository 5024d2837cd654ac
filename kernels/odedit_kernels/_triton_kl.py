"""Triton kernels and launchers of :mod:`odedit_kernels.kl` (imported lazily: needs ``triton``).

One program per row streams the vocabulary in BLOCK_V chunks with an online softmax (running max
and rescaled sums), so no rows×V probability tensor exists. Bytes moved per row, logits in dtype
of size s:

    KL  forward : read pre + post once (2·V·s)    eager torch: log_softmax ×2, exp ×2, products — ≥ 10 passes
    KL  backward: read pre + post once, write d_post (and d_pre if asked): 3·V·s (4·V·s)
    NLL forward : read logits once (V·s);  backward: read once, write once (2·V·s)

The forward keeps per row the few fp32 statistics the backward needs (log-sum-exps and
expectations), so the backward combines the grad_out of both outputs (loss and ω-derivative) in
its single pass. Logits equal to −inf (masked vocabulary) get probability 0 and contribute 0: every
product with a probability is guarded, and the running max is kept finite for the exponent.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from odedit_kernels._backend import interpreter_enabled, new_buffer

logger = logging.getLogger(__name__)

# Per-row fp32 statistics saved by the KL forward for its backward.
_KL_STATS = 5  # lse_pre, lse_post, E_p[z], E_p0[z], E_p0[a − z]
_NLL_STATS = 2  # lse, E_p[z]


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _online_update(m, s, x):
    """New running max, rescale factor of the old sums, and exp(x − max) for one block."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all −inf so far: keep exponents finite
    alpha = tl.exp(m - m_safe)
    e = tl.exp(x - m_safe)
    return m_new, s * alpha + tl.sum(e, axis=0), alpha, e


@triton.jit
def _kl_fwd_kernel(
    pre_ptr, post_ptr, kl_ptr, om_ptr, stats_ptr, V, inner, so_pre, si_pre, so_post, si_post,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    pre_row = pre_ptr + (row // inner) * so_pre + (row % inner) * si_pre
    post_row = post_ptr + (row // inner) * so_post + (row % inner) * si_post
    zero = tl.sum(tl.zeros((1,), dtype=tl.float32), axis=0)  # fp32 scalar, loop-carried
    m_a = zero + float("-inf")
    s_a = zero
    u = zero  # Σ e^{a−m_a} (a − z)   → E_p0[a − z]
    w = zero  # Σ e^{a−m_a} z         → E_p0[z]
    m_z = zero + float("-inf")
    s_z = zero
    t = zero  # Σ e^{z−m_z} z         → E_p[z]
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        a = tl.load(pre_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        z = tl.load(post_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_a, s_a, alpha, ea = _online_update(m_a, s_a, a)
        live_a = ea > 0.0
        u = u * alpha + tl.sum(tl.where(live_a, ea * (a - z), 0.0), axis=0)
        w = w * alpha + tl.sum(tl.where(live_a, ea * z, 0.0), axis=0)
        m_z, s_z, beta, ez = _online_update(m_z, s_z, z)
        t = t * beta + tl.sum(tl.where(ez > 0.0, ez * z, 0.0), axis=0)
    e0_amz = u / s_a
    e0_z = w / s_a
    ep_z = t / s_z
    # KL = E_p0[a − z] − (lse_a − lse_z); log(s_a/s_z) rather than log s_a − log s_z keeps small KLs
    # accurate when pre ≈ post.
    kl = e0_amz - (m_a - m_z) - tl.log(s_a / s_z)
    tl.store(kl_ptr + row, kl)
    tl.store(om_ptr + row, ep_z - e0_z)
    st = stats_ptr + row * 5
    tl.store(st + 0, m_a + tl.log(s_a))
    tl.store(st + 1, m_z + tl.log(s_z))
    tl.store(st + 2, ep_z)
    tl.store(st + 3, e0_z)
    tl.store(st + 4, e0_amz)


@triton.jit
def _kl_bwd_kernel(
    pre_ptr, post_ptr, stats_ptr, g_kl_ptr, g_om_ptr, d_pre_ptr, d_post_ptr,
    V, inner, so_pre, si_pre, so_post, si_post,
    NEED_PRE: tl.constexpr, NEED_POST: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    pre_row = pre_ptr + (row // inner) * so_pre + (row % inner) * si_pre
    post_row = post_ptr + (row // inner) * so_post + (row % inner) * si_post
    st = stats_ptr + row * 5
    lse_a = tl.load(st + 0)
    lse_z = tl.load(st + 1)
    ep_z = tl.load(st + 2)
    e0_z = tl.load(st + 3)
    e0_amz = tl.load(st + 4)
    g1 = tl.load(g_kl_ptr + row)
    g2 = tl.load(g_om_ptr + row)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        a = tl.load(pre_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        z = tl.load(post_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        p0 = tl.exp(a - lse_a)
        if NEED_POST:
            p = tl.exp(z - lse_z)
            # d/dz_j: g1 (p_j − p0_j) + g2 (p_j (1 + z_j − E_p z) − p0_j)
            dz = tl.where(p > 0.0, p * (g1 + g2 * (1.0 + z - ep_z)), 0.0) - (g1 + g2) * p0
            tl.store(d_post_ptr + row * V + cols, dz.to(d_post_ptr.dtype.element_ty), mask=mask)
        if NEED_PRE:
            # d/da_j: g1 p0_j ((a_j − z_j) − E_p0[a − z]) − g2 p0_j (z_j − E_p0 z)
            da = tl.where(p0 > 0.0, p0 * (g1 * ((a - z) - e0_amz) - g2 * (z - e0_z)), 0.0)
            tl.store(d_pre_ptr + row * V + cols, da.to(d_pre_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _nll_fwd_kernel(
    z_ptr, target_ptr, nll_ptr, om_ptr, stats_ptr, V, inner, so_z, si_z, ignore_index, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(target_ptr + row).to(tl.int64)
    st = stats_ptr + row * 2
    if y == ignore_index:  # skipped rows (labels = −100) cost no pass over the vocabulary
        tl.store(nll_ptr + row, 0.0)
        tl.store(om_ptr + row, 0.0)
        tl.store(st + 0, 0.0)
        tl.store(st + 1, 0.0)
        return
    z_row = z_ptr + (row // inner) * so_z + (row % inner) * si_z
    zero = tl.sum(tl.zeros((1,), dtype=tl.float32), axis=0)
    m = zero + float("-inf")
    s = zero
    t = zero  # Σ e^{z−m} z → E_p[z]
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m, s, alpha, e = _online_update(m, s, z)
        t = t * alpha + tl.sum(tl.where(e > 0.0, e * z, 0.0), axis=0)
    z_y = tl.load(z_row + y).to(tl.float32)
    lse = m + tl.log(s)
    ep_z = t / s
    tl.store(nll_ptr + row, lse - z_y)
    tl.store(om_ptr + row, ep_z - z_y)
    tl.store(st + 0, lse)
    tl.store(st + 1, ep_z)


@triton.jit
def _nll_bwd_kernel(
    z_ptr, target_ptr, stats_ptr, g_nll_ptr, g_om_ptr, dz_ptr, V, inner, so_z, si_z, ignore_index,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(target_ptr + row).to(tl.int64)
    dz_row = dz_ptr + row * V
    if y == ignore_index:
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            tl.store(
                dz_row + cols,
                tl.zeros((BLOCK_V,), dtype=tl.float32).to(dz_ptr.dtype.element_ty),
                mask=cols < V,
            )
        return
    z_row = z_ptr + (row // inner) * so_z + (row % inner) * si_z
    lse = tl.load(stats_ptr + row * 2)
    ep_z = tl.load(stats_ptr + row * 2 + 1)
    g1 = tl.load(g_nll_ptr + row)
    g2 = tl.load(g_om_ptr + row)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        p = tl.exp(z - lse)
        # d/dz_j: g1 (p_j − δ_jy) + g2 (p_j (1 + z_j − E_p z) − δ_jy)
        dz = tl.where(p > 0.0, p * (g1 + g2 * (1.0 + z - ep_z)), 0.0) - tl.where(cols == y, g1 + g2, 0.0)
        tl.store(dz_row + cols, dz.to(dz_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------


def _config(device: torch.device, vocab: int) -> dict[str, int]:
    """BLOCK_V and warps. Interpreter: one big block (each program instance costs milliseconds).

    GPU values are starting points, not tuned: no GPU was lent while this was written.
    """
    if device.type != "cuda" or interpreter_enabled():
        return {"BLOCK_V": 1024, "num_warps": 4}
    block = min(4096, triton.next_power_of_2(vocab))
    return {"BLOCK_V": block, "num_warps": 8 if block >= 2048 else 4}


def _layout(t: torch.Tensor) -> tuple[int, int, int]:
    """(inner, outer stride, inner stride) of a (R, V) or (B, T, V) tensor with unit vocabulary stride.

    Row r of the flattened leading dims sits at (r // inner)·outer + (r % inner)·inner_stride, so a
    slice such as ``logits[:, :-1]`` is read in place instead of being copied (B·T·V elements).
    """
    if t.dim() == 2:
        return max(t.shape[0], 1), 0, t.stride(0)
    return max(t.shape[1], 1), t.stride(0), t.stride(1)


def _row_vector(g: torch.Tensor, rows: int) -> torch.Tensor:
    # grad_out of a .mean() arrives as an expanded (stride 0) view: make it a plain fp32 vector.
    return g.reshape(rows).to(torch.float32).contiguous()


def _rows_vocab(t: torch.Tensor) -> tuple[int, int]:
    return t.numel() // t.shape[-1], t.shape[-1]


def kl_forward(pre: torch.Tensor, post: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(R, V) or (B, T, V) logits with unit vocabulary stride → (kl, domega, stats), fp32 (rows,), (rows,), (rows, 5)."""
    rows, vocab = _rows_vocab(post)
    kl = new_buffer((rows,), dtype=torch.float32, device=post.device)
    om = new_buffer((rows,), dtype=torch.float32, device=post.device)
    stats = new_buffer((rows, _KL_STATS), dtype=torch.float32, device=post.device)
    cfg = _config(post.device, vocab)
    inner, so_pre, si_pre = _layout(pre)
    _, so_post, si_post = _layout(post)
    _kl_fwd_kernel[(rows,)](
        pre, post, kl, om, stats, vocab, inner, so_pre, si_pre, so_post, si_post,
        BLOCK_V=cfg["BLOCK_V"], num_warps=cfg["num_warps"],
    )  # fmt: skip
    return kl, om, stats


def kl_backward(
    pre: torch.Tensor,
    post: torch.Tensor,
    stats: torch.Tensor,
    grad_kl: torch.Tensor,
    grad_omega: torch.Tensor,
    *,
    need_pre: bool,
    need_post: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients w.r.t. pre and post (contiguous, the inputs' shapes and dtypes) of g_kl·KL + g_ω·∂KL/∂ω, in one pass."""
    rows, vocab = _rows_vocab(post)
    if not (need_pre or need_post):
        return None, None
    d_pre = new_buffer(tuple(pre.shape), dtype=pre.dtype, device=pre.device) if need_pre else None
    d_post = new_buffer(tuple(post.shape), dtype=post.dtype, device=post.device) if need_post else None
    cfg = _config(post.device, vocab)
    inner, so_pre, si_pre = _layout(pre)
    _, so_post, si_post = _layout(post)
    _kl_bwd_kernel[(rows,)](
        pre, post, stats, _row_vector(grad_kl, rows), _row_vector(grad_omega, rows),
        d_pre if need_pre else post, d_post if need_post else post,  # placeholders are never written
        vocab, inner, so_pre, si_pre, so_post, si_post, NEED_PRE=need_pre, NEED_POST=need_post,
        BLOCK_V=cfg["BLOCK_V"], num_warps=cfg["num_warps"],
    )  # fmt: skip
    return d_pre, d_post


def nll_forward(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(R, V) or (B, T, V) logits, contiguous (rows,) ids → (nll, domega, stats), fp32 (rows,), (rows,), (rows, 2)."""
    rows, vocab = _rows_vocab(logits)
    nll = new_buffer((rows,), dtype=torch.float32, device=logits.device)
    om = new_buffer((rows,), dtype=torch.float32, device=logits.device)
    stats = new_buffer((rows, _NLL_STATS), dtype=torch.float32, device=logits.device)
    cfg = _config(logits.device, vocab)
    inner, so_z, si_z = _layout(logits)
    _nll_fwd_kernel[(rows,)](
        logits, target, nll, om, stats, vocab, inner, so_z, si_z, ignore_index,
        BLOCK_V=cfg["BLOCK_V"], num_warps=cfg["num_warps"],
    )  # fmt: skip
    return nll, om, stats


def nll_backward(
    logits: torch.Tensor,
    target: torch.Tensor,
    stats: torch.Tensor,
    grad_nll: torch.Tensor,
    grad_omega: torch.Tensor,
    ignore_index: int,
) -> torch.Tensor:
    """Gradient w.r.t. logits (contiguous, their shape and dtype) of g_nll·NLL + g_ω·∂NLL/∂ω, in one pass."""
    rows, vocab = _rows_vocab(logits)
    d_logits = new_buffer(tuple(logits.shape), dtype=logits.dtype, device=logits.device)
    cfg = _config(logits.device, vocab)
    inner, so_z, si_z = _layout(logits)
    _nll_bwd_kernel[(rows,)](
        logits, target, stats, _row_vector(grad_nll, rows), _row_vector(grad_omega, rows), d_logits,
        vocab, inner, so_z, si_z, ignore_index, BLOCK_V=cfg["BLOCK_V"], num_warps=cfg["num_warps"],
    )  # fmt: skip
    return d_logits

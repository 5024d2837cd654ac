"""Compile every Triton kernel for an H100 (sm_90) on a machine without a GPU: Triton → TTGIR → PTX →
cubin with the ptxas shipped in the triton wheel. Catches what the interpreter cannot: tl.dot shape and
dtype rules, layouts, shared-memory use of the GPU block sizes. Run by test_kernels_compile.py in a
subprocess, because the interpreter (TRITON_INTERPRET=1) must be off when triton is imported.

Usage: python tests/kernels/_compile_sm90.py  (prints one line per kernel, exits 1 on any failure)
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from odedit_kernels import _triton_kl as K  # noqa: E402
from odedit_kernels import _triton_mmd as M  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
CUDA = torch.device("cuda")  # only read by the config helpers; no GPU is touched
TY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _compile(fn, signature: dict, constexprs: dict, label: str, **options) -> bool:
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    try:
        kernel = triton.compile(ASTSource(fn, sig, constexprs), target=TARGET, options=options)
    except Exception as err:  # report every failure, then exit non-zero
        print(f"FAIL {label}: {type(err).__name__}: {str(err)[:800]}")
        return False
    print(f"ok   {label}: {kernel.metadata.shared} B shared, {kernel.metadata.num_warps} warps")
    return True


def mmd_kernels(dtype: torch.dtype) -> list[bool]:
    t = TY[dtype]
    cfg = M._config(CUDA, dtype, 4096)
    opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    blocks = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
    prec = M._dot_precision(dtype)
    fwd_sig = {
        "a_ptr": f"*{t}", "b_ptr": f"*{t}", "na_ptr": "*fp32", "nb_ptr": "*fp32", "coef_ptr": "*fp32",
        "part_ptr": "*fp32", "n_a": "i32", "n_b": "i32", "d": "i32", "stride_a": "i32", "stride_b": "i32",
        "weight": "fp32", "part_offset": "i32",
    }  # fmt: skip
    bwd_sig = {
        "a_ptr": f"*{t}", "b1_ptr": f"*{t}", "b2_ptr": f"*{t}", "na_ptr": "*fp32", "nb1_ptr": "*fp32",
        "nb2_ptr": "*fp32", "coef_ptr": "*fp32", "dw_ptr": "*fp32", "gout_ptr": "*fp32", "acc_ptr": "*fp32",
        "r_ptr": "*fp32", "grad_ptr": f"*{t}", "n_a": "i32", "n_b1": "i32", "n_b2": "i32", "d": "i32",
        "stride_a": "i32", "stride_b1": "i32", "stride_b2": "i32", "c1": "fp32", "c2": "fp32", "inv_scale": "fp32",
    }  # fmt: skip
    results = []
    for same, unbiased in ((True, True), (False, False)):
        const = {"SAME": same, "UNBIASED": unbiased, "NS": 5, **blocks, "DOT_PRECISION": prec}
        results.append(_compile(M._mmd_fwd_kernel, fwd_sig, const, f"mmd_fwd {t} same={same}", **opts))
    for final in (True, False):
        const = {"NS": 5, "FINAL": final, **blocks, "BLOCK_D": cfg["BLOCK_D"], "DOT_PRECISION": prec}
        results.append(_compile(M._mmd_bwd_kernel, bwd_sig, const, f"mmd_bwd {t} final={final}", **opts))
    sq_sig = {"a_ptr": f"*{t}", "out_ptr": "*fp32", "n": "i32", "d": "i32", "stride_a": "i32"}
    results.append(
        _compile(M._sqnorm_kernel, sq_sig, {"BLOCK_R": 16, "BLOCK_D": cfg["BLOCK_D"]}, f"sqnorm {t}")
    )
    return results


def kl_kernels(dtype: torch.dtype, vocab: int) -> list[bool]:
    t = TY[dtype]
    cfg = K._config(CUDA, vocab)
    opts = {"num_warps": cfg["num_warps"]}
    const = {"BLOCK_V": cfg["BLOCK_V"]}
    rows = {"V": "i32", "inner": "i32"}
    kl_strides = {"so_pre": "i32", "si_pre": "i32", "so_post": "i32", "si_post": "i32"}
    z_strides = {"so_z": "i32", "si_z": "i32"}
    results = [
        _compile(
            K._kl_fwd_kernel,
            {
                "pre_ptr": f"*{t}",
                "post_ptr": f"*{t}",
                "kl_ptr": "*fp32",
                "om_ptr": "*fp32",
                "stats_ptr": "*fp32",
                **rows,
                **kl_strides,
            },
            const,
            f"kl_fwd {t}",
            **opts,
        ),
        _compile(
            K._kl_bwd_kernel,
            {
                "pre_ptr": f"*{t}",
                "post_ptr": f"*{t}",
                "stats_ptr": "*fp32",
                "g_kl_ptr": "*fp32",
                "g_om_ptr": "*fp32",
                "d_pre_ptr": f"*{t}",
                "d_post_ptr": f"*{t}",
                **rows,
                **kl_strides,
            },
            {"NEED_PRE": True, "NEED_POST": True, **const},
            f"kl_bwd {t}",
            **opts,
        ),
        _compile(
            K._nll_fwd_kernel,
            {
                "z_ptr": f"*{t}",
                "target_ptr": "*i64",
                "nll_ptr": "*fp32",
                "om_ptr": "*fp32",
                "stats_ptr": "*fp32",
                **rows,
                **z_strides,
                "ignore_index": "i32",
            },
            const,
            f"nll_fwd {t}",
            **opts,
        ),
        _compile(
            K._nll_bwd_kernel,
            {
                "z_ptr": f"*{t}",
                "target_ptr": "*i64",
                "stats_ptr": "*fp32",
                "g_nll_ptr": "*fp32",
                "g_om_ptr": "*fp32",
                "dz_ptr": f"*{t}",
                **rows,
                **z_strides,
                "ignore_index": "i32",
            },
            const,
            f"nll_bwd {t}",
            **opts,
        ),
    ]
    return results


def main() -> int:
    results = mmd_kernels(torch.bfloat16) + mmd_kernels(torch.float32) + kl_kernels(torch.bfloat16, 151936)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""``odedit-hf bench kernels``: the kernel microbenchmarks (measuring code in :mod:`odedit_kernels.bench`).

The options are defined here, without importing torch, so that ``odedit-hf --help`` stays fast;
``python -m benchmarks.kernel_bench`` reuses :func:`add_kernel_arguments`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

OPS = ("mmd", "kl", "nll")


def add_kernel_arguments(parser: argparse.ArgumentParser, *, default_out: str) -> argparse.ArgumentParser:
    """Options of the kernel benchmark (shared with ``python -m benchmarks.kernel_bench``)."""
    parser.add_argument(
        "--device", choices=("auto", "cuda", "cpu"), default="auto", help="default: CUDA if present"
    )
    parser.add_argument(
        "--ops", nargs="+", choices=OPS, default=list(OPS), help="ops to benchmark (default: all)"
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--compile",
        dest="compile_",
        action="store_true",
        default=None,
        help="include torch.compile (default: on CUDA only; ~35 s per op to compile on a small CPU)",
    )
    group.add_argument("--no-compile", dest="compile_", action="store_false", help="skip torch.compile")
    parser.add_argument("--quick", action="store_true", help="smaller CPU shapes, one shape per op on CUDA")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls per measurement")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per measurement")
    parser.add_argument(
        "--out", default=default_out, help=f"directory (or file stem) for CSV/JSON (default {default_out})"
    )
    return parser


def add_parser(subparsers, name: str, help: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help, description="Run microbenchmarks.")
    targets = parser.add_subparsers(dest="bench_target", metavar="TARGET", required=True)
    kernels = targets.add_parser(
        "kernels",
        help="Triton kernels vs eager torch and torch.compile (table + CSV/JSON)",
        description="Time rbf_mmd, kl_with_omega and nll_with_omega against eager torch and torch.compile; "
        "without a GPU, check the Triton kernels under the interpreter and time the references at small shapes.",
    )
    add_kernel_arguments(kernels, default_out=os.path.join("benchmarks", "out"))
    return parser


def prepare_triton_interpreter() -> None:
    # Triton reads TRITON_INTERPRET when it is first imported: without a GPU, switch the interpreter on
    # before the kernels load so that their correctness can still be checked.
    if shutil.which("nvidia-smi") is None:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def run(args: argparse.Namespace) -> int:
    prepare_triton_interpreter()
    from odedit_kernels.bench import run_from_args

    try:
        table, paths = run_from_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table)
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return 0

"""Kernel microbenchmarks: ``python -m benchmarks.kernel_bench [--device cpu|cuda] [--compile] [--out DIR]``.

Prints a table (impl | op | shape | mode | ms p50 (p20–p80) | TFLOP/s or GB/s | peak MB | speedup)
headed by device, versions and commit, and writes CSV + JSON rows to benchmarks/out/ (gitignored) or
``--out``. The measuring code lives in :mod:`odedit_kernels.bench` and the options in
:mod:`odedit_hf.cli.bench`, shared with ``odedit-hf bench kernels``. Without a GPU the Triton kernels
are checked (not timed) under the interpreter, switched on here before triton is imported.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from odedit_hf.cli.bench import add_kernel_arguments, run

DEFAULT_OUT = Path(__file__).resolve().parent / "out"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.kernel_bench", description=__doc__.splitlines()[0]
    )
    add_kernel_arguments(parser, default_out=str(DEFAULT_OUT))
    parser.add_argument("-v", "--verbose", action="store_true", help="log each measurement")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

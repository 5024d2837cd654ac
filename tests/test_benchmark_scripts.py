"""``python benchmarks/X.py`` puts benchmarks/ first on sys.path: no script there may be named like an
importable top-level package, or it shadows it for everything the script imports (a benchmarks/kernels.py
once replaced Hugging Face's ``kernels``, which transformers imports when it is installed)."""

from __future__ import annotations

import importlib.metadata
import pathlib

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
# top-level names that transformers, peft, accelerate or datasets import when present, installed here or not
OPTIONAL_IMPORTS = {"kernels", "liger_kernel", "bitsandbytes", "deepspeed", "flash_attn", "gguf", "triton"}


def test_no_benchmark_script_shadows_a_package():
    stems = {p.stem for p in BENCHMARKS.glob("*.py")} - {"__init__"}
    installed = set(importlib.metadata.packages_distributions())
    assert stems & (installed | OPTIONAL_IMPORTS) == set()
    assert "kernel_bench" in stems  # the kernel microbenchmark, renamed from kernels.py

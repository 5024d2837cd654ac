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


def test_edit_benchmark_method_args_reach_composite_runs_and_typos_are_refused():
    """``--method-arg odedit.X=V`` applies to every ``odedit+*`` run (it once matched only a run named
    exactly ``odedit`` and was dropped without a word); a key no run reads stops the script."""
    import pytest
    from benchmarks.edit import _check_overrides, _method_options

    from odedit_hf.editing import get_method

    overrides = {"odedit": {"hard_negatives": True}, "ft": {"lr": 0.01}, "odedit+lora": {"rank": 4}}
    assert _method_options("odedit+ftl", overrides) == {
        "odedit": {"hard_negatives": True},
        "ftl": {"lr": 0.01},
    }
    assert _method_options("ftl", overrides) == {"ftl": {"lr": 0.01}}
    lora = get_method("odedit+lora", **_method_options("odedit+lora", overrides)).resolved_config()
    assert lora["options"]["hard_negatives"] is True and lora["editor"]["options"]["rank"] == 4
    _check_overrides(overrides, ["odedit+ftl", "odedit+lora"])
    with pytest.raises(SystemExit, match="no run uses the method 'grace'"):
        _check_overrides({"grace": {"steps": 3}}, ["odedit+ftl", "lora"])

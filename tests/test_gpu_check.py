"""benchmarks/gpu_check.py: the CPU dry run writes one JSON with every part, its status and its numbers,
plus the tables; the budget and exit-status rules hold without a GPU."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
PARTS = {"environment", "kernel_tests", "kernel_bench", "cost_ratio"}


def _run(out: Path, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # the script must set it itself, before triton is imported
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--skip-install", "--out-dir", str(out), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
        check=False,
    )


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = _run(out, "--dry-run")
    assert (out / "gpu_check.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    return proc, report, (out / "gpu_check.md").read_text()


def test_dry_run_passes_every_part(dry_run):
    proc, report, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert report["mode"] == "dry-run" and report["exit_status"] == 0
    assert set(report["parts"]) == PARTS
    statuses = {name: part["status"] for name, part in report["parts"].items()}
    assert statuses == dict.fromkeys(PARTS, "pass"), {n: p.get("reason") for n, p in report["parts"].items()}
    assert report["total_s"] < report["time_budget_s"]


def test_environment_records_versions_commit_and_nothing_missing(dry_run):
    env = dry_run[1]["parts"]["environment"]
    assert env["missing"] == [] and env["install"] == "not needed"
    assert env["commit"] and env["source_hash"] and env["date"].endswith("UTC")
    for name in ("torch", "triton", "transformers", "peft", "odedit_kernels", "odedit_hf.editing"):
        assert "version" in env["imports"][name], env["imports"][name]
    assert env["env"]["TRITON_INTERPRET"] == "1"


def test_kernel_tests_count_outcomes_per_dtype(dry_run):
    part = dry_run[1]["parts"]["kernel_tests"]
    by_dtype = part["by_dtype"]
    # fp32 Triton-vs-reference cases run in the interpreter; the fp16/bf16 ones are skipped off-GPU
    assert by_dtype["float32"].get("passed", 0) >= 12 and not by_dtype["float32"].get("failed")
    assert by_dtype["float16"] == {"skipped": 2} and by_dtype["bfloat16"] == {"skipped": 2}
    assert part["failures"] == [] and part["seconds"] > 0


def test_kernel_bench_rows_gated_and_timed(dry_run):
    part = dry_run[1]["parts"]["kernel_bench"]
    rows = {(r["impl"], r["op"], r["shape"], r["mode"]) for r in part["rows"]}
    for impl in ("triton", "torch", "torch.compile[eager]"):
        for op, shape in (("mmd", "64x64x32"), ("kl", "64x512")):
            for mode in ("fwd", "fwd+bwd"):
                assert (impl, op, shape, mode) in rows, (impl, op, shape, mode)
    for r in part["rows"]:
        assert r["correct"] and r["max_rel_err"] <= r["tol"], r
        if r["impl"] == "triton":  # the interpreter is checked, not timed
            assert r.get("ms_p50") is None and r["max_rel_err"] > 0
        else:
            assert r["ms_p50"] > 0 and r["throughput"] > 0 and r["speedup_vs_eager"] > 0
    assert part["errors"] == [] and part["skipped"] == []


def test_cost_ratio_times_equal_steps_and_gives_both_ratios(dry_run):
    part = dry_run[1]["parts"]["cost_ratio"]
    assert part["errors"] == {}
    assert set(part["ratios"]) == {
        "odedit+ft / ft",
        "odedit+lora / lora",
        "odedit+ft (torch kernels) / ft",
        "odedit+ft (torch kernels) / odedit+ft",
    }
    assert all(math.isfinite(v) and v > 0 for v in part["ratios"].values())
    methods = {r["method"]: r for r in part["rows"]}
    assert set(methods) == {"ft", "odedit+ft", "lora", "odedit+lora", "odedit+ft (torch kernels)"}
    for r in methods.values():
        assert r["steps"] == [part["config"]["steps"]] and r["edits"] == part["config"]["n_requests"]
        assert r["s_per_edit_median"] > 0 and r["trainable_params"] > 0
    assert part["model"]["class"] == "LlavaForConditionalGeneration" and part["model"]["dtype"] == "bfloat16"
    # the fallback builder (for transformers releases without tiny_backbone's PIL CLIP image processor)
    # gives the very model and batches of tiny_backbone
    assert part["fallback_check"] == {"identical_batches": True, "identical_parameters": True}


def test_markdown_holds_the_tables(dry_run):
    md = dry_run[2]
    assert md.startswith("# GPU check — CPU dry run")
    for heading in ("| part | status |", "## Kernel tests", "## Kernel benchmarks", "## ODEdit cost ratio"):
        assert heading in md
    assert "odedit+ft / ft" in md and "| torch.compile[eager] | kl | 64x512 |" in md


def test_spent_budget_skips_parts_with_a_reason(tmp_path):
    proc = _run(tmp_path, "--dry-run", "--time-budget-s", "5", timeout=60)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert proc.returncode == 0
    for name in ("kernel_tests", "kernel_bench", "cost_ratio"):
        part = report["parts"][name]
        assert part["status"] == "skipped" and "time budget spent" in part["reason"], part


def _has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10, check=False).returncode == 0


def test_gpu_mode_without_a_gpu_is_an_error_and_runs_nothing(tmp_path):
    if _has_gpu():
        pytest.skip("a GPU is present: the GPU mode would run the full check")
    proc = _run(tmp_path, timeout=120)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert proc.returncode == 2 and report["parts"]["environment"]["status"] == "error"
    assert "no CUDA device" in report["parts"]["environment"]["reason"]
    assert all(
        report["parts"][n]["status"] == "skipped" for n in ("kernel_tests", "kernel_bench", "cost_ratio")
    )


def test_exit_status_rules():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    ok = {"a": {"status": "pass"}, "b": {"status": "skipped"}, "c": {"status": "timeout"}}
    assert gpu_check.exit_status(ok) == 0
    assert gpu_check.exit_status({**ok, "d": {"status": "error"}}) == 2
    assert gpu_check.exit_status({**ok, "d": {"status": "error"}, "e": {"status": "fail"}}) == 1

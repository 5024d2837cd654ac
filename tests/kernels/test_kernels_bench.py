"""The benchmark harness runs end to end on CPU at a tiny setting and writes its CSV/JSON rows."""

from __future__ import annotations

import json

import pytest

from odedit_kernels.bench import format_table, run_benchmarks, write_report


def test_cpu_smoke_run_writes_table_and_rows(tmp_path):
    report = run_benchmarks(device="cpu", ops=["nll"], quick=True, warmup=0, reps=2, compile_=False)
    assert {r.mode for r in report.rows} == {"fwd", "fwd+bwd"}
    assert all(r.impl == "torch" and r.ms_p50 is not None and r.ms_p50 > 0 for r in report.rows)
    table = format_table(report)
    assert table.startswith("device: CPU") and "| impl | op | shape |" in table and "commit" in table
    from odedit_kernels._backend import interpreter_enabled, triton_available

    if triton_available() and interpreter_enabled():  # the kernels were checked under the interpreter
        assert any("nll 4×1023 fp32 fwd+bwd: pass" in n for n in report.notes), report.notes
    else:  # and say so when they could not be (a GPU machine runs without TRITON_INTERPRET)
        assert any("interpreter correctness: not run" in n for n in report.notes), report.notes
    csv_path, json_path = write_report(report, tmp_path)
    payload = json.loads(json_path.read_text())
    assert len(payload["rows"]) == len(report.rows) and payload["env"]["torch"]
    assert csv_path.read_text().count("\n") == len(report.rows) + 1


def test_without_the_interpreter_the_cpu_run_says_the_check_did_not_run(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    report = run_benchmarks(device="cpu", ops=["nll"], quick=True, warmup=0, reps=1, compile_=False)
    assert any("interpreter correctness: not run" in n for n in report.notes), report.notes
    assert not any(": pass" in n or ": FAIL" in n for n in report.notes)


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="unknown ops"):
        run_benchmarks(device="cpu", ops=["softmax"])
    with pytest.raises(ValueError, match="device must be"):
        run_benchmarks(device="tpu")

"""pytest plugin of ``benchmarks/gpu_check.py``: the outcome and the dtype of every kernel test.

Loaded with ``-p benchmarks.gpu_pytest_plugin`` (from the repository root); after every test and at the
end of the session it writes ``{"exitstatus", "tests": {nodeid: {"dtype", "outcome", "duration_s",
"message"}}}`` to the file named by ``$GPU_CHECK_PYTEST_JSON`` (``exitstatus`` is None until the end,
so a run killed at its time limit still leaves the outcomes so far). A test's dtype is the ``torch.dtype`` among its parameters, else
``float32`` when its name says ``fp32``/``float32``, else ``"any"`` (reference checks in float64,
input validation, and the fp32 Triton tests whose names do not say so).
"""

from __future__ import annotations

import json
import os
from typing import Any

ENV = "GPU_CHECK_PYTEST_JSON"
_DTYPES = ("float16", "bfloat16", "float32", "float64")
_records: dict[str, dict[str, Any]] = {}


def _dtype_of(item: Any) -> str:
    params = getattr(getattr(item, "callspec", None), "params", {}) or {}
    for value in params.values():
        text = str(value).removeprefix("torch.")
        if str(value).startswith("torch.") and text in _DTYPES:
            return text
    name = item.name.lower()
    if "fp32" in name or "float32" in name:
        return "float32"
    return "any"


def pytest_collection_finish(session: Any) -> None:
    for item in session.items:  # after -m/-k deselection
        _records[item.nodeid] = {
            "dtype": _dtype_of(item),
            "outcome": "not run",
            "duration_s": 0.0,
            "message": "",
        }


def pytest_runtest_logreport(report: Any) -> None:
    rec = _records.setdefault(
        report.nodeid, {"dtype": "any", "outcome": "not run", "duration_s": 0.0, "message": ""}
    )
    rec["duration_s"] += float(getattr(report, "duration", 0.0) or 0.0)
    if rec["outcome"] in ("failed", "error"):
        return
    if report.failed:
        rec["outcome"] = "failed" if report.when == "call" else "error"
        rec["message"] = str(report.longrepr)[-1500:]
    elif report.skipped:
        rec["outcome"] = "skipped"
        longrepr = report.longrepr
        rec["message"] = str(longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else longrepr)
    elif report.when == "call":
        rec["outcome"] = "passed"
    if report.when == "teardown":
        _write(None)


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    _write(int(exitstatus))


def _write(exitstatus: int | None) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump({"exitstatus": exitstatus, "tests": _records}, handle, indent=1)
    os.replace(tmp, path)

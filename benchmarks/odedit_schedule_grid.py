"""ODEdit schedule ablation (issue 12): {penalty from step 0, warm-up + budget} x {adaptive, fixed λ} x λ_init.

One process runs every cell on the same requests, one after the other, and records per cell the
metrics, the steps per edit, the edits that used their whole budget and the λ trajectory of every edit
(λ at its first primal–dual step and at its last forward; median |log(λ_end / λ_start)|), read from
``ODEditMethod.last_edit_trace``::

    OMP_NUM_THREADS=1 python -m benchmarks.odedit_schedule_grid --protocol single --n 100 --editors ft lora \
        --lambda-inits 0.001 0.1 --json benchmarks/out/grid/single.json
    python -m benchmarks.odedit_schedule_grid --protocol sequential --n 50 --editors ft \
        --cells ft fs-fixed-0.1 wu-adaptive-0.1      # only the named cells

Cells: ``<editor>`` (the plain editor), ``fs-off`` / ``wu-off`` (IRM-TV off, each schedule), ``wu-nll``
(R_rel alone under the warm-up schedule: the plain editor's loss with the schedule's extra steps),
``fs-adaptive-<λ>`` (the original: penalty from step 0, Softplus λ, no slack), ``fs-fixed-<λ>``
(``lambda_mode="fixed"``), ``wu-adaptive-<λ>`` (``schedule="warmup"``, log-λ, slack = ``stop_penalty``),
``wu-fixed-<λ>``. ``--extra '{"lambda_lr": 1.0}'`` is added to every ODEdit cell's options.
Prints a markdown table headed by the machine, versions and commit, and writes JSON rows. Run it from the
repository root with ``python -m`` (it imports ``benchmarks.odedit``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Any

from benchmarks.odedit import METRICS, _header

SCHEDULE_OPTIONS: dict[str, dict[str, Any]] = {
    "fs": {"schedule": "from_start"},
    "wu": {"schedule": "warmup"},
}
#: the adaptive λ of each schedule: the original Softplus without slack (from step 0), log-λ with the slack
#: at the stop level of the primal-dual phase (warm-up; the only one whose λ can fall)
ADAPTIVE_OPTIONS: dict[str, dict[str, Any]] = {
    "fs": {"lambda_param": "softplus", "dual_slack": 0.0},
    "wu": {"lambda_param": "log", "dual_slack": 0.5},
}


def cell_options(cell: str, editors: list[str]) -> tuple[str, dict[str, Any]] | None:
    """(kind, ODEdit options) of a cell name; ``("plain", {})`` for an editor; None for an unknown name."""
    if cell in editors:
        return "plain", {}
    parts = cell.split("-")
    if parts[0] not in SCHEDULE_OPTIONS:
        return None
    options = dict(SCHEDULE_OPTIONS[parts[0]])
    if parts[1:] == ["off"]:
        return "odedit", {**options, "irm_penalty": False}
    if parts[1:] == ["nll"]:  # the editor's own loss under the schedule: its stop rule and step count alone
        return "odedit", {**options, "irm_penalty": False, "loc_risk": False, "gen_risk": False}
    if len(parts) != 3 or parts[1] not in ("adaptive", "fixed"):
        return None
    options["lambda_init"] = float(parts[2])
    if parts[1] == "fixed":
        options["lambda_mode"] = "fixed"
    else:
        options.update(ADAPTIVE_OPTIONS[parts[0]])
    return "odedit", options


def default_cells(editors: list[str], lambda_inits: list[float]) -> list[str]:
    cells = ["fs-off", "wu-off"]
    for schedule in ("fs", "wu"):
        for mode in ("adaptive", "fixed"):
            cells += [f"{schedule}-{mode}-{lam:g}" for lam in lambda_inits]
    return cells


def _lambda_summary(traces: list[dict[str, Any]]) -> dict[str, Any]:
    starts = [t["lambda_start"] for t in traces if t.get("lambda_start") is not None]
    ends = [t["lambda_end"] for t in traces if t.get("lambda_end") is not None]
    ratios = [abs(t["log_lambda_ratio"]) for t in traces if t.get("log_lambda_ratio") is not None]
    signed = [t["log_lambda_ratio"] for t in traces if t.get("log_lambda_ratio") is not None]
    return {
        "lambda_start_median": statistics.median(starts) if starts else None,
        "lambda_end_median": statistics.median(ends) if ends else None,
        "lambda_end_max": max(ends) if ends else None,
        "abs_log_lambda_ratio_median": statistics.median(ratios) if ratios else None,
        "log_lambda_ratio_median": statistics.median(signed) if signed else None,
        "lambda_up_fraction": sum(r > 0 for r in signed) / len(signed) if signed else None,
        "warmup_steps_mean": statistics.mean(t["warmup_steps"] for t in traces) if traces else None,
        "penalty_steps_mean": statistics.mean(t["penalty_steps"] for t in traces) if traces else None,
        "dual_steps_mean": statistics.mean(t["dual_steps"] for t in traces) if traces else None,
    }


def run_cell(
    args: argparse.Namespace,
    make_backbone: Any,
    requests: list[Any],
    editor: str,
    cell: str,
    kind: str,
    options: dict[str, Any],
    seed: int,
) -> dict[str, Any]:
    import torch

    from odedit_hf.editing import get_method
    from odedit_hf.evaluation import run_protocol
    from odedit_hf.evaluation.results import aggregate
    from odedit_hf.methods.odedit.method import ODEditMethod

    torch.manual_seed(seed)
    backbone = make_backbone()
    if kind == "plain":
        method = get_method(editor)
    else:
        method = ODEditMethod(get_method(editor), objective={**options, **args.extra})
    traces: list[dict[str, Any]] = []
    if kind != "plain":
        inner = method.edit

        def edit(*a: Any, **k: Any) -> Any:
            stats = inner(*a, **k)
            traces.append(dict(method.last_edit_trace))
            return stats

        method.edit = edit  # type: ignore[method-assign]
    start = time.perf_counter()
    run = run_protocol(args.protocol, method, backbone, requests, seed=seed)
    agg = aggregate(run.results, "final" if args.protocol == "sequential" else "post")
    row = {
        "cell": cell if kind == "odedit" else editor,
        "editor": editor,
        "protocol": args.protocol,
        "n": len(requests),
        "world_seed": args.world_seed,
        "seed": seed,
        "options": {**options, **args.extra} if kind == "odedit" else {},
        "method_config": method.resolved_config(),
        "scores": {k: v for k, v in agg.items() if k in METRICS},
        "steps_mean": statistics.mean(r.steps for r in run.results),
        "edits_not_stopped_by_rule": sum(not stopped for stopped in run.stopped_early),
        "time_per_edit_s": statistics.mean(r.wall_time_s for r in run.results),
        "run_s": time.perf_counter() - start,
        **_lambda_summary(traces),
        "traces": traces,
    }
    return row


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e3):
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value)


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        "| editor | cell | seed | rel | T-Gen | M-Gen | T-Loc | M-Loc | steps/edit | penalty steps | "
        "λ start | λ end (median) | λ end (max) | median abs log(λ_end/λ_start) | λ up | s/edit |"
    )
    print("|" + "---|" * 16)
    for r in rows:
        s = r["scores"]
        print(
            f"| {r['editor']} | {r['cell']} | {r['world_seed']}/{r['seed']} | "
            + " | ".join(_fmt(s.get(k)) for k in METRICS)
            + f" | {r['steps_mean']:.2f} | {_fmt(r.get('penalty_steps_mean'), 2)} | {_fmt(r.get('lambda_start_median'))} | "
            f"{_fmt(r.get('lambda_end_median'))} | {_fmt(r.get('lambda_end_max'))} | "
            f"{_fmt(r.get('abs_log_lambda_ratio_median'))} | {_fmt(r.get('lambda_up_fraction'), 2)} | "
            f"{r['time_per_edit_s']:.3f} |"
        )


def main(argv: list[str] | None = None) -> int:
    from benchmarks.odedit import _world

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", help="world folder (default: build/load the cached one)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--protocol", default="single", choices=("single", "sequential"))
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--editors", nargs="+", default=["ft", "lora"])
    p.add_argument("--lambda-inits", type=float, nargs="+", default=[0.001, 0.1])
    p.add_argument("--cells", nargs="+", help="only these cells (default: the whole grid and the editors)")
    p.add_argument("--extra", type=json.loads, default={}, help="options added to every ODEdit cell (JSON)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the rows here (one JSON list)")
    args = p.parse_args(argv)
    cells = args.cells or [*args.editors, *default_cells(args.editors, args.lambda_inits)]
    for cell in cells:
        if cell_options(cell, args.editors) is None:
            p.error(f"unknown cell {cell!r} (see the module docstring)")
    make_backbone, requests = _world(args)
    requests = requests[: args.n]
    print(_header())
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        for editor in args.editors:
            for cell in cells:
                kind, options = cell_options(cell, args.editors)  # type: ignore[misc]
                if kind == "plain" and cell != editor:
                    continue
                row = run_cell(args, make_backbone, requests, editor, cell, kind, options, seed)
                rows.append(row)
                brief = {k: round(v, 3) for k, v in row["scores"].items()}
                ratio = row.get("abs_log_lambda_ratio_median")
                print(
                    f"# {editor} {row['cell']} seed {seed}: {json.dumps(brief)} steps {row['steps_mean']:.2f} "
                    f"|log λ ratio| {ratio if ratio is None else round(ratio, 3)} ({row['run_s']:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
                if args.json:  # rewrite after every cell: a killed run keeps what it measured
                    with open(args.json + ".tmp", "w") as f:
                        json.dump(
                            rows,
                            f,
                            default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o),
                        )
                    os.replace(args.json + ".tmp", args.json)
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

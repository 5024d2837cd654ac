"""End-to-end edit benchmark: methods x protocols on the embedded world (or any model + MMEdit file).

Prints one table headed by device, versions and commit — method | protocol | T | rel | T-gen | M-gen |
T-loc ans/ee | M-loc ans/ee | edit s p50 (p20–p80) | peak MB | rollback checks — and writes the rows
as JSON and CSV, plus each run's full results file. When the data carries the optional probes (the
embedded world from version 4 does), a second table gives them per run: portability acc/EM, hard-negative
T-loc and M-loc ans/ee, knowledge-unit generality/consistency (``—`` where the data has no such probe).

Examples::

    # the issue-4 bars: 100 single edits with FT-L and LoRA, sequential T = 10, 50, 100 with FT-L
    python -m benchmarks.edit --world tiny --runs ft:single:100 lora:single:100 \\
        ft:sequential:10 ft:sequential:50 ft:sequential:100 --out-dir benchmarks/out/edit

    python -m benchmarks.edit --model ./my-llava --data edits.json --runs ft:single:20

A run is ``METHOD:PROTOCOL:N`` (``N`` edits, the first ``N`` records; for ``sequential`` that is T)
and optionally ``:K`` for the batch size of ``batch``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

COLUMNS = (
    "method",
    "protocol",
    "n",
    "reliability",
    "t_generality",
    "m_generality",
    "t_locality",
    "t_locality_easyedit",
    "m_locality",
    "m_locality_easyedit",
    "portability",
    "portability_em",
    "hard_t_locality",
    "hard_t_locality_easyedit",
    "hard_m_locality",
    "hard_m_locality_easyedit",
    "unit_generality",
    "unit_consistency",
    "edit_s_p50",
    "edit_s_p20",
    "edit_s_p80",
    "peak_mb",
    "rollback_checks",
    "run_s",
)


#: The optional probe columns (absent, ``None``, where the data has no such probe).
PROBE_COLUMNS = COLUMNS[COLUMNS.index("portability") : COLUMNS.index("unit_consistency") + 1]


@dataclasses.dataclass(frozen=True)
class RunSpec:
    method: str
    protocol: str
    n: int
    batch_size: int | None = None

    @classmethod
    def parse(cls, text: str) -> RunSpec:
        parts = text.split(":")
        if len(parts) not in (3, 4) or parts[1] not in ("single", "sequential", "batch"):
            raise argparse.ArgumentTypeError(f"expected METHOD:PROTOCOL:N[:K], got {text!r}")
        try:
            n = int(parts[2])
            k = int(parts[3]) if len(parts) == 4 else None
        except ValueError:
            raise argparse.ArgumentTypeError(f"N and K must be integers in {text!r}") from None
        if parts[1] == "batch" and k is None:
            k = 10
        return cls(parts[0], parts[1], n, k)

    @property
    def label(self) -> str:
        return f"{self.method}:{self.protocol}:{self.n}" + (
            f":{self.batch_size}" if self.protocol == "batch" else ""
        )


def environment(device: str) -> dict[str, str]:
    import peft
    import torch
    import transformers

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5, check=False
        ).stdout.strip()
    except OSError:
        commit, dirty = "unknown", ""
    name = platform.processor() or platform.machine()
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{device} ({name}), {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "commit": (commit or "unknown") + ("+dirty" if dirty else ""),
    }


def row_of(spec: RunSpec, report: dict[str, Any]) -> dict[str, Any]:
    scores = report["aggregates"]["final"] or report["aggregates"]["post"]
    times = [e["wall_time_s"] for e in report["edits"]]
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return {
        "method": report["method"],
        "protocol": spec.protocol + (f"(k={spec.batch_size})" if spec.protocol == "batch" else ""),
        "n": report["n_edits"],
        **{k: scores[k] for k in COLUMNS[3:10]},
        **{k: scores.get(k) for k in PROBE_COLUMNS},  # None: the data has no such probe
        "edit_s_p50": statistics.median(times),
        "edit_s_p20": q[1],
        "edit_s_p80": q[7],
        "peak_mb": report["timing"]["peak_memory_mb_max"],
        "rollback_checks": report["rollback"]["checks"],
        "run_s": report["timing"]["run_wall_time_s"],
    }


def format_rows(env: dict[str, str], rows: list[dict[str, Any]]) -> str:
    head = [
        "# odedit-hf edit benchmark",
        f"# device: {env['device']}",
        f"# torch {env['torch']} | transformers {env['transformers']} | peft {env['peft']} | "
        f"python {env['python']} | commit {env['commit']} | {env['date']}",
        "# scores: sequential rows are on the final model; locality = answer / easyedit",
    ]
    cols = [
        "method",
        "protocol",
        "n",
        "rel",
        "T-gen",
        "M-gen",
        "T-loc ans/ee",
        "M-loc ans/ee",
        "edit s p50 (p20–p80)",
        "peak MB",
        "rollback",
    ]
    table = [cols]
    for r in rows:
        table.append(
            [
                r["method"],
                r["protocol"],
                str(r["n"]),
                f"{r['reliability']:.3f}",
                f"{r['t_generality']:.3f}",
                f"{r['m_generality']:.3f}",
                f"{r['t_locality']:.3f}/{r['t_locality_easyedit']:.3f}",
                f"{r['m_locality']:.3f}/{r['m_locality_easyedit']:.3f}",
                f"{r['edit_s_p50']:.3f} ({r['edit_s_p20']:.3f}–{r['edit_s_p80']:.3f})",
                f"{r['peak_mb']:.0f}",
                f"{r['rollback_checks']} ok",
            ]
        )
    lines = _layout(table)
    if any(r[k] is not None for r in rows for k in PROBE_COLUMNS):

        def pair(r: dict[str, Any], a: str, b: str) -> str:
            return "—" if r[a] is None else f"{r[a]:.3f}/{r[b]:.3f}"

        probes = [
            ["method", "protocol", "n", "Port acc/EM", "hT-loc ans/ee", "hM-loc ans/ee", "unit gen/cons"]
        ]
        for r in rows:
            probes.append(
                [
                    r["method"],
                    r["protocol"],
                    str(r["n"]),
                    pair(r, "portability", "portability_em"),
                    pair(r, "hard_t_locality", "hard_t_locality_easyedit"),
                    pair(r, "hard_m_locality", "hard_m_locality_easyedit"),
                    pair(r, "unit_generality", "unit_consistency"),
                ]
            )
        lines += [
            "",
            "# probes: portability = the edit's consequences (by name, one hop); hT/hM-loc = a look-alike "
            "entity; unit = all rephrases and renderings (mean acc / all exactly right)",
            *_layout(probes),
        ]
    return "\n".join(head + lines)


def _layout(table: list[list[str]]) -> list[str]:
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(line, widths)) for line in table]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return lines


def resolve_inputs(args: argparse.Namespace) -> tuple[str, str, str, str | None]:
    """(model_dir, mmedit_file, image_root, rephrase_image_root)."""
    from odedit_hf.cli.edit import resolve_data

    if args.world:
        from odedit_hf.cli.demo import world_inputs

        return world_inputs(args.world, seed=args.world_seed, cache_dir=args.cache_dir, task=args.task)
    if not (args.model and args.data):
        raise SystemExit("give --world PRESET, or --model and --data")
    path, root, rephrase = resolve_data(args.data, args.image_root, None)
    return args.model, path, root, rephrase


def _components(method: str) -> list[str]:
    """Canonical names of a method's parts (``"odedit+ft"`` -> ``["odedit", "ftl"]``; a lone wrapper name
    such as ``"odedit"`` is allowed here, as the name of a ``--method-arg`` namespace)."""
    from odedit_hf.editing.registry import method_class

    return [method_class(p.strip()).name for p in method.split("+")]


def _method_options(method: str, overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``get_method`` keyword arguments of one run: ``--method-arg RUN_METHOD.KEY=V`` (flat, split by the
    method) and ``--method-arg PART.KEY=V`` for each part of a composite name (``odedit.alpha=0.2`` applies
    to every ``odedit+*`` run, ``ftl.lr=...`` to ``ftl`` and ``odedit+ftl`` alike)."""
    kwargs: dict[str, Any] = dict(overrides.get(method, {}))
    parts = _components(method)
    for key, values in overrides.items():
        if key == method or "+" in key:
            continue
        part = _components(key)[0]
        if part in parts:
            kwargs.setdefault(part, {}).update(values)
    return kwargs


def _check_overrides(overrides: dict[str, dict[str, Any]], methods: list[str]) -> None:
    """An override that no run would read is a typo: refuse it before anything loads."""
    parts = {p for m in methods for p in _components(m)}
    for key in overrides:
        known = key in methods or ("+" not in key and _components(key)[0] in parts)
        if not known:
            raise SystemExit(
                f"--method-arg {key}.*: no run uses the method {key!r} (runs: {', '.join(methods)}); "
                "name a run's method or one part of it (e.g. odedit.alpha=0.2 for odedit+ftl runs)"
            )


def parse_method_args(items: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """``--method-arg METHOD.KEY=VALUE`` items as ``{METHOD: {KEY: value}}`` (JSON values, else the text),
    checked against the runs' ``methods`` (a key no run reads is refused)."""
    overrides: dict[str, dict[str, Any]] = {}
    for item in items:
        key, _, raw = item.partition("=")
        method, _, name = key.partition(".")
        try:
            overrides.setdefault(method, {})[name] = json.loads(raw)
        except json.JSONDecodeError:
            overrides.setdefault(method, {})[name] = raw
    _check_overrides(overrides, methods)
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", help="embedded world preset (micro, tiny); built and cached on first use")
    parser.add_argument("--world-seed", type=int, default=0)
    parser.add_argument("--cache-dir", help="world cache folder (default: the world's own default)")
    parser.add_argument("--task", default="vqa", choices=("vqa", "caption"), help="world task (default vqa)")
    parser.add_argument("--model")
    parser.add_argument("--data")
    parser.add_argument("--image-root")
    parser.add_argument("--runs", nargs="+", type=RunSpec.parse, default=[RunSpec.parse("ft:single:100")])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--method-arg", action="append", default=[], metavar="METHOD.KEY=VALUE", help="e.g. ft.lr=0.005"
    )
    parser.add_argument("--out-dir", default="benchmarks/out/edit")
    args = parser.parse_args(argv)

    import torch

    from odedit_hf.cli.edit import load_backbone
    from odedit_hf.data import load_mmedit
    from odedit_hf.editing import get_method
    from odedit_hf.evaluation import build_report, run_protocol, write_json_atomic

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    overrides = parse_method_args(args.method_arg, [spec.method for spec in args.runs])
    model_dir, data_file, image_root, rephrase_root = resolve_inputs(args)
    most = max(spec.n for spec in args.runs)
    requests = list(load_mmedit(data_file, image_root, rephrase_root, limit=most))
    env = environment(device)
    os.makedirs(args.out_dir, exist_ok=True)
    rows = []
    # one load: every protocol hands the model back unchanged (its base-weight hash is checked)
    backbone = load_backbone(model_dir, device=torch.device(device))
    for spec in args.runs:
        if spec.n > len(requests):
            print(f"{spec.label}: only {len(requests)} records available", file=sys.stderr)
        method = get_method(spec.method, **_method_options(spec.method, overrides))
        start = time.perf_counter()
        run = run_protocol(
            spec.protocol, method, backbone, requests[: spec.n], seed=args.seed, batch_size=spec.batch_size
        )
        report = build_report(
            run,
            config={
                "model": model_dir,
                "data": data_file,
                "run": spec.label,
                "method": method.resolved_config(),
            },
            device=device,
        )
        write_json_atomic(os.path.join(args.out_dir, spec.label.replace(":", "_") + ".json"), report)
        rows.append(row_of(spec, report))
        print(f"{spec.label}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    text = format_rows(env, rows)
    print(text)
    write_json_atomic(os.path.join(args.out_dir, "rows.json"), {"environment": env, "rows": rows})
    with open(os.path.join(args.out_dir, "rows.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(args.out_dir, "table.txt"), "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

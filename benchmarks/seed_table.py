"""One table over world seeds from ``benchmarks.edit`` results folders.

Each ``--dir SEED=FOLDER`` is a ``benchmarks.edit --out-dir`` (its per-run ``METHOD_PROTOCOL_N.json``
results files). For every method and protocol found, prints the mean over the seeds that have it and the
per-seed values of each column (rel, T-gen, M-gen, T-loc ans/ee, M-loc ans/ee, portability, hard M-loc,
steps, s/edit p50, peak MB), sequential rows scored on the final model.

Example::

    python -m benchmarks.seed_table --dir 0=benchmarks/out/seeds/A-seed0 --dir 1=benchmarks/out/seeds/A-seed1 \\
        --dir 2=benchmarks/out/seeds/A-seed2
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
from typing import Any

COLUMNS = (
    ("rel", "reliability"),
    ("T-gen", "t_generality"),
    ("M-gen", "m_generality"),
    ("T-loc", "t_locality"),
    ("T-loc ee", "t_locality_easyedit"),
    ("M-loc", "m_locality"),
    ("M-loc ee", "m_locality_easyedit"),
    ("Port", "portability"),
    ("hM-loc", "hard_m_locality"),
)


def load_runs(folder: str) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(method, protocol): values}`` of one results folder."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        if os.path.basename(path) in ("rows.json",):
            continue
        with open(path, encoding="utf-8") as fh:
            report = json.load(fh)
        if "aggregates" not in report:
            continue
        scores = report["aggregates"]["final"] or report["aggregates"]["post"]
        edits = report["edits"]
        values = {label: scores.get(key) for label, key in COLUMNS}
        values["steps"] = statistics.mean(e["steps"] for e in edits)
        values["s/edit"] = statistics.median(e["wall_time_s"] for e in edits)
        values["peak MB"] = report["timing"]["peak_memory_mb_max"]
        values["n"] = report["n_edits"]
        runs[(report["method"], report["protocol"])] = values
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", action="append", required=True, metavar="SEED=FOLDER")
    args = parser.parse_args(argv)
    seeds: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    for item in args.dir:
        seed, _, folder = item.partition("=")
        for key, values in load_runs(folder).items():
            seeds.setdefault(seed, {})[key] = values
    keys = sorted({k for runs in seeds.values() for k in runs}, key=lambda k: (k[1], k[0]))
    labels = [label for label, _ in COLUMNS] + ["steps", "s/edit", "peak MB"]
    print("| method | protocol | seeds | " + " | ".join(labels) + " |")
    print("|---|---|---|" + "---|" * len(labels))
    for key in keys:
        have = [s for s in seeds if key in seeds[s]]
        cells = []
        for label in labels:
            vals = [seeds[s][key][label] for s in have if seeds[s][key][label] is not None]
            if not vals:
                cells.append("—")
                continue
            fmt = "{:.0f}" if label == "peak MB" else "{:.1f}" if label == "steps" else "{:.3f}"
            mean = fmt.format(statistics.mean(vals))
            per = "/".join(fmt.format(v) for v in vals)
            cells.append(f"{mean} ({per})" if len(vals) > 1 else mean)
        print(f"| {key[0]} | {key[1]} | {','.join(have)} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

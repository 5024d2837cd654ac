"""Measure the embedded world build: wall time per phase and the pre-edit accuracies.

Usage (quiet machine; the bars are tiny <= 300 s, micro <= 90 s):

    time .venv/bin/python benchmarks/world.py --preset tiny --seed 0     # 2 torch threads by default
    time .venv/bin/python benchmarks/world.py --preset micro --seed 0

Each run builds from scratch into a temporary folder (force), prints a table and writes a JSON row to
benchmarks/out/world-{preset}-seed{seed}.json. It also exports the data files twice more (seed, and
seed + 1) and reports whether the same seed gave byte-identical files and another seed different ones.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import sys
import tempfile
import time


def _tree(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", choices=("micro", "tiny"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: build_world's, 2 capped at the CPUs)",
    )
    args = parser.parse_args(argv)

    import torch
    import transformers

    from odedit_hf.cli.world import format_table
    from odedit_hf.data.world import WORLD_VERSION, build_world, export_world, generate_world
    from odedit_hf.data.world.spec import CONTENT_VERSION

    with tempfile.TemporaryDirectory(prefix="odedit-hf-world-bench-") as tmp:
        start = time.perf_counter()
        world = build_world(
            args.preset,
            args.seed,
            out=os.path.join(tmp, "w"),
            force=True,
            progress=False,
            threads=args.threads,
        )
        wall = time.perf_counter() - start
        print(
            f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, world version {WORLD_VERSION} (content {CONTENT_VERSION}), threads {world.info['threads']}"
        )
        print(format_table(world))
        print(
            "phases (s):",
            {k: round(v, 1) for k, v in world.info["timings"].items()},
            f"total wall {wall:.1f}",
        )

        export_world(generate_world(args.preset, args.seed), os.path.join(tmp, "again"))
        export_world(generate_world(args.preset, args.seed + 1), os.path.join(tmp, "other"))
        files = _tree(world.data_dir)
        _, mismatch, errors = filecmp.cmpfiles(
            world.data_dir, os.path.join(tmp, "again"), files, shallow=False
        )
        same = not mismatch and not errors and files == _tree(os.path.join(tmp, "again"))
        _, differ, _ = filecmp.cmpfiles(world.data_dir, os.path.join(tmp, "other"), files, shallow=False)
        print(
            f"same seed byte-identical: {same} ({len(files)} files); other seed differs in {len(differ)} files"
        )
        row = {
            "preset": args.preset,
            "seed": args.seed,
            "threads": world.info["threads"],
            "wall_s": wall,
            "timings": world.info["timings"],
            "train_steps": world.info["train_steps"],
            "accuracies": world.accuracies,
            "byte_identical": same,
        }
    os.makedirs(os.path.join("benchmarks", "out"), exist_ok=True)
    with open(os.path.join("benchmarks", "out", f"world-{args.preset}-seed{args.seed}.json"), "w") as fh:
        json.dump(row, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

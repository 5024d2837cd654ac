"""Long sequential runs: T edits (default 1000) on one adapter, with the process's resident memory and the
time of every edit tracked, to show that nothing grows beyond the adapter's own state.

The tiny world has 180 VQA records (eval + train) and 180 caption records; a run of T edits cycles through
the VQA ones (repeated targets allowed, as the issue allows) and renumbers them ``case_id`` 0..T-1. The
sequential protocol also keeps, per edit, the pre-edit top-k ids it scores locality against at the end
(``LocalityReference``: a few KiB per edit), which the table reports as the protocol's own growth.

Examples::

    python -m benchmarks.long_run --methods ftl odedit+ftl --n 1000 --out-dir benchmarks/out/long
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import sys
import time
from typing import Any


def rss_mb() -> float:
    """Current resident set size in MiB (``/proc/self/statm``; the peak from getrusage where it is missing)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


POOLS = {
    "vqa": ("vqa_eval", "vqa_train"),
    "vqa+caption": ("vqa_eval", "vqa_train", "caption_eval", "caption_train"),
}


def cycled_requests(world: Any, n: int, pool_name: str = "vqa") -> list[Any]:
    """``n`` requests cycled through the pool's records (in file order), renumbered ``case_id`` 0..n-1.

    ``vqa``: the 180 VQA records (eval + train); ``vqa+caption``: those and the 180 caption records, so up
    to 360 edits of distinct facts before any record repeats.
    """
    from odedit_hf.data import load_mmedit

    pool = []
    for attr in POOLS[pool_name]:
        pool.extend(load_mmedit(getattr(world, attr), world.image_root, world.rephrase_image_root))
    if n > len(pool):
        print(f"note: {n} edits cycle through {len(pool)} records (targets repeat)", file=sys.stderr)
    return [dataclasses.replace(pool[i % len(pool)], case_id=i) for i in range(n)]


def memory_counters(peft_model: Any) -> dict[str, int]:
    """A memory editor's own counters where it keeps them (WISE: edits, shards stored, merges)."""
    for module in peft_model.modules():
        counts = getattr(module, "wise_counts", None)
        if counts is not None and len(counts):
            c = next(iter(counts.values())).tolist()
            memories = next(iter(module.wise_memories.values()))
            return {"edits": c[0], "shards": c[1], "merges": c[2], "stored_memories": int(memories.shape[0])}
    return {}


def adapter_bytes(peft_model: Any, adapter_name: str = "default") -> int:
    """Bytes of the adapter's state: the parameters and buffers peft keys by the adapter's name."""
    total = 0
    for name, t in (*peft_model.named_parameters(), *peft_model.named_buffers()):
        if adapter_name in name.split("."):
            total += t.numel() * t.element_size()
    return total


def run_one(
    method_name: str,
    world: Any,
    n: int,
    checkpoints: list[int],
    seed: int,
    options: dict[str, Any] | None = None,
    pool: str = "vqa",
) -> dict[str, Any]:
    import gc

    from odedit_hf.editing import get_method
    from odedit_hf.evaluation import aggregate, run_protocol

    backbone = world.load_backbone()
    requests = cycled_requests(world, n, pool)
    method = get_method(method_name, **(options or {}))
    holder: dict[str, Any] = {}
    edit = method.edit

    def edit_and_remember(peft_model: Any, *args: Any, **kwargs: Any) -> Any:
        holder["model"] = peft_model  # the counters are read from the adapter at the checkpoints
        return edit(peft_model, *args, **kwargs)

    object.__setattr__(method, "edit", edit_and_remember)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    last = [start]

    def on_edit(index: int, result: Any) -> None:
        now = time.perf_counter()
        if index + 1 in checkpoints:
            gc.collect()
            rows.append(
                {
                    "edit": index + 1,
                    "rss_mb": rss_mb(),
                    "edit_s": result.wall_time_s,
                    "since_last_checkpoint_s": now - last[0],
                    "reliability_post": result.post.reliability,
                    **(memory_counters(holder["model"]) if "model" in holder else {}),
                }
            )
            last[0] = now

    def on_adapter(peft_model: Any) -> None:
        holder["adapter_bytes"] = adapter_bytes(peft_model)
        holder["model"] = peft_model

    run = run_protocol(
        "sequential", method, backbone, requests, seed=seed, on_edit=on_edit, on_adapter=on_adapter
    )
    times = sorted(r.wall_time_s for r in run.results)
    return {
        "method": method_name,
        "n": n,
        "rows": rows,
        "edit_s_median": times[len(times) // 2],
        "edit_s_p90": times[int(0.9 * (len(times) - 1))],
        "run_s": time.perf_counter() - start,
        "adapter_bytes_final": holder.get("adapter_bytes"),
        "pool": pool,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final": aggregate(run.results, "final"),
        "post": aggregate(run.results, "post"),
        "config": method.resolved_config(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["ftl", "odedit+ftl"])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--world", default="tiny")
    parser.add_argument("--world-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out-dir", default="benchmarks/out/long")
    parser.add_argument("--pool", default="vqa", choices=sorted(POOLS), help="records cycled (default vqa)")
    parser.add_argument(
        "--method-arg",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="e.g. wise.save_freq=100",
    )
    parser.add_argument("--tag", default="", help="suffix of the JSON file's name")
    args = parser.parse_args(argv)
    from benchmarks.edit import _method_options, parse_method_args

    overrides = parse_method_args(args.method_arg, args.methods)
    import torch
    import transformers

    from odedit_hf.data.world import build_world

    if args.threads:
        torch.set_num_threads(args.threads)
    world = build_world(args.world, seed=args.world_seed, progress=False)
    step = 50 if args.n <= 500 else 250
    checkpoints = sorted({1, 10, 100, *range(step, args.n + 1, step), args.n})
    results = [
        run_one(m, world, args.n, checkpoints, args.seed, _method_options(m, overrides), args.pool)
        for m in args.methods
    ]
    env = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "world": f"{args.world}-seed{args.world_seed}-v{world.world_version}",
        "protocol": "sequential",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"long_run{'-' + args.tag if args.tag else ''}.json")
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump({"environment": env, "runs": results}, fh, indent=1)
    os.replace(path + ".tmp", path)
    print(" | ".join(f"{k}: {v}" for k, v in env.items()))
    print("| method | edit | RSS MiB | edit s | s since previous row | rel (post) | shards | merges |")
    print("|---|---|---|---|---|---|---|---|")
    for res in results:
        for row in res["rows"]:
            print(
                f"| {res['method']} | {row['edit']} | {row['rss_mb']:.1f} | {row['edit_s']:.3f} | "
                f"{row['since_last_checkpoint_s']:.1f} | {row['reliability_post']:.2f} | "
                f"{row.get('shards', '—')} | {row.get('merges', '—')} |"
            )
    for res in results:
        first100 = next((r["rss_mb"] for r in res["rows"] if r["edit"] == 100), None)
        last = res["rows"][-1]["rss_mb"]
        growth = f"{(last / first100 - 1) * 100:+.1f} %" if first100 else "n/a"
        print(
            f"{res['method']}: edit s median {res['edit_s_median']:.3f} (p90 {res['edit_s_p90']:.3f}), run "
            f"{res['run_s']:.0f} s, RSS after edit {res['rows'][-1]['edit']} vs 100: {growth}; adapter "
            f"{(res['adapter_bytes_final'] or 0) / 2**20:.2f} MiB; final rel {res['final']['reliability']:.3f} "
            f"M-Loc {res['final']['m_locality']:.3f}"
        )
        f = res["final"]
        print(
            f"  final: rel {f['reliability']:.3f} T-gen {f['t_generality']:.3f} M-gen {f['m_generality']:.3f} "
            f"T-loc {f['t_locality']:.3f}/{f['t_locality_easyedit']:.3f} "
            f"M-loc {f['m_locality']:.3f}/{f['m_locality_easyedit']:.3f}; peak RSS {res['peak_rss_mb']:.0f} MiB"
        )
    print(f"json: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

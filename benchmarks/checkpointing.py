"""Gradient checkpointing during edits: peak memory and time per edit with and without it.

Each configuration runs in its own process (the peak resident memory of a process is what the CPU can
measure), editing SmolLM2-135M (``odedit-hf models get smollm2``) or any causal LM with records of a ZsRE
file through ``run_protocol``; the edits must come out identical with and without checkpointing, which the
script checks (per-edit scores, steps, final loss).

Example::

    OMP_NUM_THREADS=1 python -m benchmarks.checkpointing --data zsre.json --layers 0 --n 5 --batch 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time


def child(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from odedit_hf.data import load_text_edits
    from odedit_hf.data.facts import load_fact_prompts
    from odedit_hf.editing import get_method
    from odedit_hf.editing.memory import estimate_edit_memory
    from odedit_hf.evaluation import run_protocol
    from odedit_hf.models import get_model

    model_dir = args.model or get_model("smollm2")
    backbone = load_fact_prompts(model_dir, "raw").backbone
    requests = list(load_text_edits(args.data))[: args.n * args.batch]
    method = get_method(args.method, **({"layers": [args.layers]} if args.layers is not None else {}))
    estimate = estimate_edit_memory(
        method, backbone, requests, batch_size=args.batch, gradient_checkpointing=args.ckpt
    )
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    protocol = "batch" if args.batch > 1 else "single"
    run = run_protocol(
        protocol,
        method,
        backbone,
        requests,
        seed=0,
        batch_size=args.batch if args.batch > 1 else None,
        gradient_checkpointing=args.ckpt,
    )
    times = sorted(r.wall_time_s for r in run.results)
    return {
        "checkpointing": args.ckpt,
        "protocol": protocol,
        "edits": len(run.results),
        "edit_s_median": times[len(times) // 2],
        "run_s": time.perf_counter() - start,
        "peak_rss_mb_before_edits": rss_before,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "estimated_activation_mb": estimate.activations / 2**20,
        "rows": [json.dumps([vars(r.post), r.steps, r.final_loss], sort_keys=True) for r in run.results],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a ZsRE file (e.g. the fact set's, from text_edit.py)")
    parser.add_argument("--model", help="model folder (default: SmolLM2-135M from odedit-hf models get)")
    parser.add_argument("--method", default="ftl")
    parser.add_argument("--layers", type=int, help="the edited decoder layer (default: the backbone's)")
    parser.add_argument("--n", type=int, default=5, help="edits (optimisations)")
    parser.add_argument("--batch", type=int, default=1, help="requests per edit (>1: the batch protocol)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    results = []
    for ckpt in (False, True):
        cmd = [sys.executable, "-m", "benchmarks.checkpointing", "--child", *(argv or sys.argv[1:])]
        if ckpt:
            cmd.append("--ckpt")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    import torch
    import transformers

    print(
        f"machine {platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch thread(s); python "
        f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; method {args.method}, layer {args.layers}, "
        f"{results[0]['protocol']} protocol, {args.n} edits of {args.batch} request(s)"
    )
    print("| checkpointing | edit s p50 | run s | peak RSS MiB (before edits) | estimated activations MiB |")
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {'on' if r['checkpointing'] else 'off'} | {r['edit_s_median']:.3f} | {r['run_s']:.1f} | "
            f"{r['peak_rss_mb']:.0f} ({r['peak_rss_mb_before_edits']:.0f}) | {r['estimated_activation_mb']:.1f} |"
        )
    same = results[0]["rows"] == results[1]["rows"]
    print(f"per-edit rows identical with and without checkpointing: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())

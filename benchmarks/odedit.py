"""ODEdit end-to-end benchmark: ODEdit+X vs X on the embedded world, ablations, cost, λ-network memory.

Usage (the world folder comes from ``odedit-hf world``; without ``--world`` the script builds/loads the
cached tiny world through ``odedit_hf.data.world``)::

    OMP_NUM_THREADS=2 python benchmarks/odedit.py --protocol single --n 100 --seeds 0 1 2 \
        --methods ft odedit+ft lora odedit+lora --json benchmarks/odedit_single.json
    python benchmarks/odedit.py --protocol sequential --n 50 --seeds 0 1 2 --methods ft odedit+ft
    python benchmarks/odedit.py --memory-only          # λ-network memory: tiny model and BLIP-2 OPT-2.7B
    OMP_NUM_THREADS=1 python benchmarks/odedit.py --interleaved --n 50 --rounds 3   # time ratios, one process

A method is ``<editor>`` or ``odedit+<editor>``; ``--objective '{"beta": 0.1}'`` sets ODEdit
hyperparameters (ablations), ``--editor-args '{"steps": 40}'`` the editor's. Prints markdown tables
(mean ± std over seeds) headed by the device, versions and commit, and writes JSON rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

METRICS = ("reliability", "t_generality", "m_generality", "t_locality", "m_locality")


def _header() -> str:
    import peft
    import torch
    import transformers

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except OSError:
        commit = "?"
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or 'cpu'})"
    )
    return (
        f"device: {device}, threads {torch.get_num_threads()} | torch {torch.__version__}, transformers "
        f"{transformers.__version__}, peft {peft.__version__} | commit {commit}"
    )


def _world(args: argparse.Namespace) -> tuple[Any, list[Any]]:
    """(backbone factory, E-VQA eval requests) of the embedded world (``--world`` folder, else the cache)."""
    from odedit_hf.cli.edit import load_backbone
    from odedit_hf.data import load_mmedit
    from odedit_hf.data.world import build_world

    world = build_world(preset=args.preset, seed=args.world_seed, out=args.world, progress=False)
    dataset = load_mmedit(world.vqa_eval, world.image_root, world.rephrase_image_root, limit=args.n)
    requests = list(dataset)

    def make_backbone() -> Any:
        return load_backbone(world.model_dir, trust_remote_code=False, dtype="auto", device=args.device)

    return make_backbone, requests


def _method(name: str, editor_args: dict[str, Any], objective: dict[str, Any]) -> Any:
    from odedit_hf.editing import get_method
    from odedit_hf.methods.odedit.method import ODEditMethod

    if name.startswith("odedit+"):
        return ODEditMethod(get_method(name.split("+", 1)[1], **editor_args), objective=objective)
    return get_method(name, **editor_args)


def run_quality(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    from odedit_hf.evaluation import run_protocol
    from odedit_hf.evaluation.results import aggregate

    make_backbone, requests = _world(args)
    requests = requests[: args.n]
    rows = []
    for seed in args.seeds:
        for name in args.methods:
            torch.manual_seed(seed)
            backbone = make_backbone()
            method = _method(name, args.editor_args, args.objective if name.startswith("odedit+") else {})
            start = time.perf_counter()
            run = run_protocol(
                args.protocol, method, backbone, requests, seed=seed, batch_size=args.batch_size
            )
            which = "final" if args.protocol == "sequential" else "post"
            agg = aggregate(run.results, which)
            row = {
                "method": name,
                "seed": seed,
                "protocol": args.protocol,
                "n": len(requests),
                "objective": args.objective if name.startswith("odedit+") else {},
                "editor_args": args.editor_args,
                "method_config": method.resolved_config(),
                "scores": agg,
                "time_per_edit_s": statistics.mean(r.wall_time_s for r in run.results),
                "peak_memory_mb": max(r.peak_memory_mb for r in run.results),
                "steps_mean": statistics.mean(r.steps for r in run.results),
                "run_s": time.perf_counter() - start,
            }
            rows.append(row)
            print(
                f"# done {name} seed {seed}: {json.dumps({k: round(v, 4) for k, v in agg.items() if k in METRICS})}",
                file=sys.stderr,
            )
    return rows


def _pm(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def print_quality(rows: list[dict[str, Any]]) -> None:
    keys = [k for k in rows[0]["scores"] if k in METRICS or k.endswith("_easyedit")]
    print("| method | " + " | ".join(keys) + " | s/edit | steps | peak MB |")
    print("|" + "---|" * (len(keys) + 4))
    base_time: dict[str, float] = {}
    for name in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == name]
        cells = [_pm([r["scores"][k] for r in sel]) for k in keys]
        t = statistics.mean(r["time_per_edit_s"] for r in sel)
        base_time.setdefault(name.split("+")[-1], t) if "+" not in name else None
        ratio = ""
        if "+" in name and name.split("+")[-1] in base_time:
            ratio = f" ({t / base_time[name.split('+')[-1]]:.2f}x)"
        steps = statistics.mean(r["steps_mean"] for r in sel)
        mem = max(r["peak_memory_mb"] for r in sel)
        print(f"| {name} | " + " | ".join(cells) + f" | {t:.3f}{ratio} | {steps:.1f} | {mem:.0f} |")


def memory_table(args: argparse.Namespace) -> None:
    """λ-network memory, params vs sketch: measured on the tiny world model, computed for BLIP-2 OPT-2.7B."""
    from odedit_hf.methods.odedit.lambda_net import lambda_network_num_parameters

    hidden, sketch = args.lambda_hidden_size, args.sketch_dim
    rows = []
    try:
        from peft import get_peft_model

        make_backbone, _ = _world(args)
        for name in ("ft", "lora"):
            backbone = make_backbone()
            method = _method(f"odedit+{name}", args.editor_args if name == "ft" else {}, {})
            model = get_peft_model(backbone.model, method.peft_config(backbone))
            n = sum(p.numel() for p in model.parameters() if p.requires_grad)
            rows.append((f"tiny world, {name} ({n:,} edit params)", n))
    except Exception as err:  # noqa: BLE001 - the world may be missing; the computed rows still print
        print(f"# tiny world model unavailable ({type(err).__name__}: {err})", file=sys.stderr)
    # BLIP-2 OPT-2.7B: hidden 2560, ffn 10240; FT-L edits fc2 (registry default), or whole FFNs
    fc2 = 10240 * 2560 + 2560
    fc1 = 2560 * 10240 + 10240
    rows.append(("BLIP-2 OPT-2.7B, 3 layers fc2 (FT-L default)", 3 * fc2))
    rows.append(("BLIP-2 OPT-2.7B, 3 layers fc1+fc2", 3 * (fc1 + fc2)))
    rows.append(("BLIP-2 OPT-2.7B, 3 layers fc2, LoRA r=8", 3 * 8 * (10240 + 2560)))
    print(
        f"λ-network: 3 linear layers, hidden {hidden}, sketch k = {sketch}; fp32 weights; training adds one gradient (the dual step is plain SGD ascent: no optimiser state)"
    )
    print("| edit | params-mode λ-net | sketch-mode λ-net | params mode, weights + gradient |")
    print("|---|---|---|---|")
    for label, n in rows:
        p = lambda_network_num_parameters("params", n, hidden, sketch) * 4
        s = lambda_network_num_parameters("sketch", n, hidden, sketch) * 4
        print(f"| {label} | {_bytes(p)} | {_bytes(s)} | {_bytes(2 * p)} |")


def _cost_requests(tmp: str, n: int) -> tuple[Any, list[Any]]:
    """A tiny random LLaVA and ``n`` synthetic requests (cost does not depend on what the model knows)."""
    from odedit_hf.data import EditRequest
    from odedit_hf.testing import tiny_backbone, tiny_image

    words = ["cube", "ball", "tree", "house", "car", "bird", "fish", "lamp"]
    colours = ["red", "blue", "green", "yellow", "black", "white", "pink", "gray"]
    texts = [f"what color is the {w}" for w in words] + [f"which colour has the {w}" for w in words] + colours
    texts += ["what is the capital of france", "paris", "what animal is this", "cat"]
    paths = []
    for i in range(3 * n):
        paths.append(os.path.join(tmp, f"img{i}.png"))
        tiny_image(100 + i).save(paths[-1])
    requests = [
        EditRequest(
            case_id=i,
            task="vqa",
            source="synthetic",
            src=f"what color is the {words[i % 8]}",
            pred="red",
            alt=colours[(i + 3) % 8],
            image=paths[i],
            rephrase=f"which colour has the {words[i % 8]}",
            image_rephrase=paths[n + i],
            loc="what is the capital of france",
            loc_ans="paris",
            m_loc=paths[2 * n + i],
            m_loc_q="what animal is this",
            m_loc_a="cat",
        )
        for i in range(n)
    ]
    return (lambda: tiny_backbone("llava", texts=texts)), requests


def cost_worker(args: argparse.Namespace) -> None:
    """One method in its own process: time per edit (edits only, equal steps) and the process's peak RSS."""
    import resource
    import tempfile

    import torch
    from peft import get_peft_model

    with tempfile.TemporaryDirectory() as tmp:
        if args.world is None and not args.cost_world:
            make_backbone, requests = _cost_requests(tmp, args.n)
        else:
            make_backbone, requests = _world(args)
            requests = requests[: args.n]
        editor_args = {"stop_loss": None, **args.editor_args}
        method = _method(args.cost_worker, editor_args, args.objective if "+" in args.cost_worker else {})
        backbone = make_backbone()
        model = get_peft_model(backbone.model, method.peft_config(backbone))
        method.edit(model, backbone, requests[:1])  # warm-up
        times = []
        for request in requests:
            start = time.perf_counter()
            method.edit(model, backbone, [request])
            times.append(time.perf_counter() - start)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            json.dumps(
                {
                    "method": args.cost_worker,
                    "s_per_edit_median": statistics.median(times),
                    "s_per_edit_mean": statistics.mean(times),
                    "peak_rss_mb": peak_mb,
                    "threads": torch.get_num_threads(),
                    "n": len(requests),
                }
            )
        )


def run_cost(args: argparse.Namespace) -> None:
    rows = []
    for name in args.methods:
        cmd = [
            sys.executable,
            __file__,
            "--cost-worker",
            name,
            "--n",
            str(args.n),
            "--objective",
            json.dumps(args.objective),
            "--editor-args",
            json.dumps(args.editor_args),
        ]
        if args.world:
            cmd += ["--world", args.world]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"cost: {args.n} edits each, equal steps (stop_loss off), editor args {args.editor_args}, objective {args.objective}"
    )
    print("| method | s/edit (median) | vs base editor | peak RSS MB |")
    print("|---|---|---|---|")
    base = {r["method"]: r for r in rows if "+" not in r["method"]}
    for r in rows:
        ref = base.get(r["method"].split("+")[-1])
        ratio = (
            f"{r['s_per_edit_median'] / ref['s_per_edit_median']:.2f}x"
            if ref and "+" in r["method"]
            else "1.00x"
        )
        print(f"| {r['method']} | {r['s_per_edit_median']:.3f} | {ratio} | {r['peak_rss_mb']:.0f} |")


def run_interleaved(args: argparse.Namespace) -> None:
    """Time per edit of every method in ONE process, edits interleaved round-robin on the same requests.

    Each method has its own model copy; a round edits request i with every method in turn, so a load
    change on this shared machine hits all methods alike and the ratios stay comparable. Editors run
    with their defaults (early stop included, as in the quality runs) unless ``--editor-args`` says
    otherwise. With ``--phases`` the time inside ODEdit's main phases is summed too.
    """
    import collections
    import functools

    import torch
    from peft import get_peft_model

    make_backbone, requests = _world(args)
    requests = requests[: args.n]
    setups = {}
    for name in args.methods:
        torch.manual_seed(0)
        method = _method(name, args.editor_args, args.objective if name.startswith("odedit+") else {})
        backbone = make_backbone()
        backbone.model.eval()
        model = get_peft_model(backbone.model, method.peft_config(backbone))
        snapshot = method.snapshot(model, model.active_adapter)
        snapshot.restore()
        method.edit(model, backbone, requests[:1])  # warm-up
        setups[name] = (method, backbone, model, snapshot)
    phases: dict[tuple[str, str], float] = collections.defaultdict(float)
    current: list[Any] = [None, False]  # the method editing now; whether a timed phase is running
    if args.phases:
        import odedit_hf.editing.editor as editing_methods
        import odedit_hf.methods.odedit.lambda_net as lambda_net
        import odedit_hf.methods.odedit.objective as objective_module
        from odedit_hf.backbones import Backbone

        def timed(owner: Any, attr: str, label: str) -> None:
            inner = getattr(owner, attr)

            @functools.wraps(inner)
            def wrapper(*a: Any, **k: Any) -> Any:
                if current[1]:  # nested in another timed phase: counted there
                    return inner(*a, **k)
                current[1] = True
                start = time.perf_counter()
                try:
                    return inner(*a, **k)
                finally:
                    phases[(current[0], label)] += time.perf_counter() - start
                    current[1] = False

            setattr(owner, attr, wrapper)

        timed(objective_module, "run_groups", "forward")  # imported into the objective module
        timed(editing_methods, "target_nll", "forward")
        timed(Backbone, "build_batch", "build the batch (tokenise, load images)")
        timed(torch.Tensor, "backward", "backward")
        timed(lambda_net.LambdaNetwork, "forward", "lambda-network forward (sketch)")
        for name in (
            "reliability_risk_rows",
            "locality_risk",
            "generality_risk",
            "gen_pairs",
            "irm_tv_penalty",
        ):
            timed(objective_module, name, "risk terms")
        for cls in (torch.optim.Adam, torch.optim.SGD):
            timed(cls, "zero_grad", "optimiser steps")
            timed(cls, "step", "optimiser steps")
    times: dict[str, list[float]] = {name: [] for name in args.methods}
    edits = collections.Counter()
    for _ in range(args.rounds):
        for request in requests:
            for name, (method, backbone, model, snapshot) in setups.items():
                current[0] = name
                snapshot.restore()
                start = time.perf_counter()
                method.edit(model, backbone, [request])
                times[name].append(time.perf_counter() - start)
                edits[name] += 1
    print(
        f"interleaved cost: {len(requests)} requests x {args.rounds} rounds per method, one process, "
        f"editor args {args.editor_args or 'defaults'}, objective {args.objective or 'defaults'}"
    )
    print("| method | s/edit (median) | s/edit (mean) | vs base editor (median) |")
    print("|---|---|---|---|")
    for name, values in times.items():
        base = times.get(name.split("+")[-1])
        ratio = f"{statistics.median(values) / statistics.median(base):.2f}x" if base and "+" in name else ""
        print(f"| {name} | {statistics.median(values):.4f} | {statistics.mean(values):.4f} | {ratio} |")
    if args.phases:
        labels = sorted(
            {label for _, label in phases}, key=lambda lb: -max(phases[(n, lb)] for n in args.methods)
        )
        print("\nms per edit inside each phase (the rest: Python glue, adapter snapshot, λ-network set-up):")
        print("| phase | " + " | ".join(args.methods) + " |")
        print("|---|" + "---|" * len(args.methods))
        for label in labels:
            cells = [f"{phases[(n, label)] * 1000 / edits[n]:.2f}" for n in args.methods]
            print(f"| {label} | " + " | ".join(cells) + " |")
        cells = [f"{statistics.mean(times[n]) * 1000:.2f}" for n in args.methods]
        print("| whole edit (mean) | " + " | ".join(cells) + " |")


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", help="world folder from `odedit-hf world` (default: build/load the cached one)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--protocol", default="single", choices=("single", "sequential", "batch"))
    p.add_argument("--batch-size", type=int)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=["ft", "odedit+ft", "lora", "odedit+lora"])
    p.add_argument("--objective", type=json.loads, default={}, help="ODEdit hyperparameters (JSON)")
    p.add_argument("--editor-args", type=json.loads, default={}, help="editor hyperparameters (JSON)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--memory-only", action="store_true")
    p.add_argument("--cost", action="store_true", help="time per edit and peak RSS, one process per method")
    p.add_argument(
        "--cost-world", action="store_true", help="measure cost on the world model, not a tiny random LLaVA"
    )
    p.add_argument(
        "--interleaved",
        action="store_true",
        help="time per edit of all methods in one process, edits interleaved (robust ratios on a shared CPU)",
    )
    p.add_argument("--rounds", type=int, default=3, help="--interleaved: passes over the requests")
    p.add_argument("--phases", action="store_true", help="--interleaved: also time ODEdit's main phases")
    p.add_argument("--cost-worker", help=argparse.SUPPRESS)
    p.add_argument("--lambda-hidden-size", type=int, default=64)
    p.add_argument("--sketch-dim", type=int, default=128)
    args = p.parse_args(argv)
    import odedit_hf  # noqa: F401

    if args.cost_worker:
        cost_worker(args)
        return 0
    print(_header())
    if args.cost:
        run_cost(args)
        return 0
    if args.interleaved:
        run_interleaved(args)
        return 0
    if args.memory_only:
        memory_table(args)
        return 0
    rows = run_quality(args)
    print(
        f"\nprotocol {args.protocol}, n = {args.n}, seeds {args.seeds}, objective {args.objective}, editor {args.editor_args}"
    )
    print_quality(rows)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(rows, fh, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

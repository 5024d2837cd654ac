"""``odedit-hf demo``: build the embedded world (cached), edit N of its facts, print the metric table.

Works on a fresh machine with no network and no GPU: the world (images, MMEdit files and a tiny LLaVA
pretrained on its facts) is generated and trained locally the first time, then reused from the cache.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from odedit_hf.cli.edit import CLIError, add_edit_arguments

#: This command takes the generated ``--<method>.<option>`` arguments (see ``odedit_hf.cli.options``).
ACCEPTS_METHOD_OPTIONS = True


def add_parser(subparsers: Any, name: str = "demo", help: str | None = None) -> argparse.ArgumentParser:
    from odedit_hf.cli.options import add_methods_help

    parser = subparsers.add_parser(name, help=help, description=__doc__.split("\n\n")[0], add_help=False)
    add_methods_help(parser)
    parser.add_argument(
        "--preset", default="tiny", help="world preset: micro (seconds) or tiny (minutes); default tiny"
    )
    parser.add_argument("--world-seed", type=int, default=0, help="seed of the world (default 0)")
    parser.add_argument(
        "--cache-dir", help="cache root of worlds (default: $ODEDIT_HF_CACHE or ~/.cache/odedit_hf/worlds)"
    )
    parser.add_argument(
        "--world-dir", help="use (or build) the world in this exact folder instead of the cache"
    )
    parser.add_argument("--task", default="vqa", choices=("vqa", "caption"), help="which MMEdit file to edit")
    parser.add_argument("--out", help="also write the results file here (JSON)")
    add_edit_arguments(parser, with_data=False, n_default=20)
    return parser


def world_inputs(
    preset: str,
    *,
    seed: int = 0,
    cache_dir: str | None = None,
    task: str = "vqa",
    progress: bool = True,
    world_dir_: str | None = None,
) -> tuple[str, str, str, str | None]:
    """Build (or reuse from the cache) the world; return ``(model_dir, eval_file, image_root, rephrase_image_root)``.

    ``world_dir_`` names the world's own folder (built there if it holds none); otherwise the folder
    is ``{preset}-seed{seed}-v{version}`` under ``cache_dir`` (default: the world cache root).
    """
    from odedit_hf.data.world import build_world, world_dir

    if task not in ("vqa", "caption"):
        raise CLIError(f"world task must be 'vqa' or 'caption', got {task!r}")
    if world_dir_ is not None:
        out = os.path.abspath(world_dir_)
    else:
        out = None if cache_dir is None else world_dir(preset, seed, cache_root=os.path.abspath(cache_dir))
    world = build_world(preset, seed, out=out, progress=progress)
    eval_file = world.vqa_eval if task == "vqa" else world.caption_eval
    return world.model_dir, eval_file, world.image_root, world.rephrase_image_root


def run(args: argparse.Namespace) -> int:
    from odedit_hf.cli.edit import (
        build_method,
        check_output_file,
        load_backbone,
        memory_check,
        parse_device_map,
        parse_max_memory,
        placement,
        quiet_known_warnings,
        resolve_device,
        run_edits,
    )
    from odedit_hf.data import load_mmedit
    from odedit_hf.evaluation import format_table, write_json_atomic

    try:
        with quiet_known_warnings():
            method = build_method(args)
            if args.out:
                check_output_file(args.out)  # before the world builds: a bad --out must not cost a build
            device = resolve_device(args.device)
            print(f"building the {args.preset!r} world (cached after the first run) ...", file=sys.stderr)
            start = time.perf_counter()
            model_dir, eval_file, image_root, rephrase_root = world_inputs(
                args.preset,
                seed=args.world_seed,
                cache_dir=args.cache_dir,
                task=args.task,
                progress=not args.no_progress,
                world_dir_=args.world_dir,
            )
            print(f"world ready in {time.perf_counter() - start:.1f} s: model {model_dir}", file=sys.stderr)
            requests = list(load_mmedit(eval_file, image_root, rephrase_root, limit=args.n))
            device_map = parse_device_map(args.device_map)
            backbone = load_backbone(
                model_dir,
                dtype=args.dtype,
                device=device,
                progress=not args.no_progress,
                device_map=device_map,
                max_memory=parse_max_memory(args.max_memory, device_map),
            )
            memory = memory_check(args, method, backbone, requests)
            config = {
                "world": args.preset,
                "world_seed": args.world_seed,
                "model": model_dir,
                "model_class": type(backbone.model).__name__,
                "data": eval_file,
                "method": method.resolved_config(),
                "device_map": placement(backbone.model) if args.device_map else None,
                "memory_estimate": memory,
            }
            report = run_edits(args, method, backbone, requests, config=config)
    except (CLIError, ValueError, FileNotFoundError) as exc:
        print(f"odedit-hf demo: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(report))
    if args.out:
        print(f"\nresults: {write_json_atomic(args.out, report)}")
    return 0

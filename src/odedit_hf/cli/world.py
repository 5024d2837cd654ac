"""``odedit-hf world build``: build (or load from the cache) the embedded world and print its accuracies."""

from __future__ import annotations

import argparse
import sys

ROWS = (
    ("trained", "trained facts (image + training template)"),
    ("heldout_paraphrase", "held-out paraphrase templates"),
    ("unseen_rendering", "unseen renderings"),
    ("text_only", "text-only facts"),
    ("text_heldout", "text-only facts, held-out templates"),
    ("perception", "perception (colour/shape/pattern), unseen renderings"),
    ("counterfactual_vqa", "counterfactual targets (alt), VQA, pre-edit"),
    ("counterfactual_caption", "counterfactual targets (alt), captions, pre-edit"),
)


def add_parser(subparsers, name: str = "world", help: str | None = None) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help, description=help)
    sub = parser.add_subparsers(dest="world_command", metavar="ACTION")
    build = sub.add_parser("build", help="build the world (cached) and print the pre-edit accuracies")
    build.add_argument(
        "--preset", default="tiny", choices=("micro", "tiny"), help="world size (default: tiny)"
    )
    build.add_argument("--seed", type=int, default=0, help="world seed (default: 0)")
    build.add_argument(
        "--out",
        default=None,
        help="world folder (default: $ODEDIT_HF_CACHE or ~/.cache/odedit_hf/worlds/...)",
    )
    build.add_argument("--force", action="store_true", help="rebuild even if the folder holds the world")
    build.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads while building (default: 2, or the CPU count if lower; 1 on a busy machine)",
    )
    build.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(_world_parser=parser)
    return parser


def format_table(world) -> str:
    lines = [
        f"world {world.preset} seed {world.seed} (version {world.world_version}) at {world.root}",
        f"  model: {world.model_dir}",
        f"  data:  {world.data_dir}",
        (
            f"  loaded from the cache (its build took {world.build_seconds:.1f} s)"
            if world.from_cache
            else f"  built in {world.build_seconds:.1f} s"
        ),
        "",
        f"{'set':<56} {'token acc':>9} {'exact':>7}",
        "-" * 74,
    ]
    for key, label in ROWS:
        if key in world.accuracies:
            lines.append(
                f"{label:<56} {world.accuracies[key]:>9.3f} {world.accuracies.get(key + '_em', float('nan')):>7.3f}"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "world_command", None) != "build":
        args._world_parser.print_help()
        return 2
    from odedit_hf.data.world import build_world

    try:
        world = build_world(
            preset=args.preset,
            seed=args.seed,
            out=args.out,
            force=args.force,
            progress=not args.no_progress,
            threads=args.threads,
        )
    except ValueError as err:
        print(f"odedit-hf world build: error: {err}", file=sys.stderr)
        return 2
    print(format_table(world))
    return 0

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

    push = sub.add_parser(
        "push",
        help="publish the world's records and images as a Hub dataset (parquet, images as Image features)",
        description="Publish a world's data as a `datasets` dataset: configs evqa and eic (splits train, eval) "
        "and images; `datasets.load_dataset(REPO_ID, 'evqa')` reads it, `odedit-hf world pull` restores the "
        "world folder. The token and endpoint are huggingface_hub's (HF_TOKEN, HF_ENDPOINT).",
    )
    push.add_argument("repo_id", metavar="REPO_ID", help="the Hub dataset repo, e.g. user/odedit-world-tiny")
    _world_source(push)
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument(
        "--stage",
        metavar="DIR",
        default=None,
        help="only write what would be uploaded into DIR (a new or empty folder); nothing is pushed",
    )

    pull = sub.add_parser(
        "pull",
        help="rebuild a world data folder from a pushed world dataset (repo id or staged folder)",
        description="Download a world dataset pushed with `odedit-hf world push` and write the world data "
        "folder (records byte for byte as pushed, images/, world.json) that `odedit-hf edit --data` reads.",
    )
    pull.add_argument("source", metavar="REPO_ID_OR_DIR", help="the Hub dataset repo id, or a staged folder")
    pull.add_argument("out", metavar="OUT_DIR", help="a new or empty folder to write the world data into")
    pull.add_argument("--revision", default=None, help="the repo revision (default: main)")
    parser.set_defaults(_world_parser=parser)
    return parser


def _world_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="a world data folder (the 'data' folder of a built world); default: the cached world of --preset/--seed",
    )
    parser.add_argument(
        "--preset", default="tiny", choices=("micro", "tiny"), help="world size (default: tiny)"
    )
    parser.add_argument("--seed", type=int, default=0, help="world seed (default: 0)")


def _data_dir(args: argparse.Namespace) -> str:
    """The world data folder named by --data-dir, else the cached world of --preset/--seed (never built here)."""
    import os

    if args.data_dir:
        return args.data_dir
    from odedit_hf.data.world.cache import read_info, world_dir

    root = world_dir(args.preset, args.seed)
    if read_info(root) is None:
        raise ValueError(
            f"no built world {args.preset} seed {args.seed} in {root}; build it first "
            f"(odedit-hf world build --preset {args.preset} --seed {args.seed}) or pass --data-dir"
        )
    return os.path.join(root, "data")


def _push(args: argparse.Namespace) -> int:
    from odedit_hf.sharing.world_dataset import push_world_dataset, stage_world_dataset

    data_dir = _data_dir(args)
    if args.stage:
        stage_world_dataset(data_dir, args.stage)
        print(f"staged the world dataset of {data_dir} in {args.stage} (nothing pushed)")
        return 0
    url = push_world_dataset(data_dir, args.repo_id, private=args.private)
    print(f"pushed the world dataset of {data_dir} to {args.repo_id}: {url}")
    return 0


def _pull(args: argparse.Namespace) -> int:
    from odedit_hf.sharing.world_dataset import pull_world_dataset

    out = pull_world_dataset(args.source, args.out, revision=args.revision)
    print(f"wrote the world data from {args.source} to {out}; edit with --data {out}/evqa_eval.json")
    return 0


def _machine_line(info: dict) -> str:
    # a model copied from an older world version was trained where that world was built
    machine = (info["model_from"].get("machine") if "model_from" in info else info.get("machine")) or {}
    if not machine:
        return "an unrecorded machine"
    env = " ".join(f"{k}={v}" for k, v in sorted(machine.get("env", {}).items()))
    return f"{machine.get('cpu')}, kernels {machine.get('cpu_capability')}, torch {machine.get('torch')}" + (
        f", {env}" if env else ""
    )


def format_table(world) -> str:
    lines = [
        f"world {world.preset} seed {world.seed} (version {world.world_version}) at {world.root}",
        f"  model: {world.model_dir}",
        *(
            [f"  model sha256: {world.info['model_sha256']} (trained on {_machine_line(world.info)})"]
            if world.info.get("model_sha256")
            else []
        ),
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
    command = getattr(args, "world_command", None)
    if command in ("push", "pull"):
        try:
            return _push(args) if command == "push" else _pull(args)
        except ValueError as err:
            print(f"odedit-hf world {command}: error: {err}", file=sys.stderr)
            return 2
    if command != "build":
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

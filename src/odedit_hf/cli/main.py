"""Entry point of the ``odedit-hf`` command.

Each subcommand lives in its own module under ``odedit_hf.cli`` and exposes two functions:
``add_parser(subparsers) -> argparse.ArgumentParser`` and ``run(args) -> int``. Modules are
imported lazily, only when their subcommand runs (``--help`` imports just their parsers), so that
``odedit-hf --help`` stays fast and torch is not imported for it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from odedit_hf import __version__

# subcommand name -> (module under odedit_hf.cli, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "build the embedded world (cached), edit facts, print the metric table"),
    "world": ("world", "build the embedded synthetic world and its tiny pretrained model"),
    "edit": ("edit", "edit facts with a method and measure the edits under a protocol"),
    "train-editor": ("train_editor", "train an editor before editing (MEND), write its artefact"),
    "eval": ("eval", "score an existing adapter on a data file, without editing"),
    "generate": ("generate", "the greedy answer of a model (and an adapter) to a prompt and image"),
    "push": ("push", "push an edited adapter to the Hub with a model card made from its results"),
    "export": ("export", "export an edit as a plain artefact: a merged model, or a stock PEFT adapter"),
    "report": ("report", "an HTML page with figures from one or more results files"),
    "methods": ("methods", "list the editing methods with their options and defaults"),
    "models": ("models", "fetch real pretrained models (e.g. SmolLM2-135M) into the cache"),
    "bench": ("bench", "run kernel microbenchmarks"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="odedit-hf",
        description="Edit facts inside multimodal LLMs and measure the edits honestly.",
    )
    parser.add_argument("--version", action="version", version=f"odedit-hf {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(f"odedit_hf.cli.{module_name}")
        except ModuleNotFoundError as err:
            if err.name != f"odedit_hf.cli.{module_name}":
                raise
            continue  # subcommand not built yet
        module.add_parser(sub, name=name, help=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # method options (--<method>.<option> VALUE) are generated per method: the commands that take them
    # (ACCEPTS_METHOD_OPTIONS) parse what argparse leaves over, once --method is known
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        parser.print_help()
        return 0
    command_module = importlib.import_module(f"odedit_hf.cli.{SUBCOMMANDS[args.command][0]}")
    if extra and not getattr(command_module, "ACCEPTS_METHOD_OPTIONS", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.method_options = extra
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    module_name = SUBCOMMANDS[args.command][0]
    module = importlib.import_module(f"odedit_hf.cli.{module_name}")
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def close_process_group() -> None:
    """Destroy the process group that a launcher's run (torchrun, accelerate launch) set up, while the
    interpreter is still whole. Left to the exit-time destructors, gloo's worker threads can abort a
    process that has already done its work (SIGABRT, ``terminate called without an active exception``;
    pytorch/pytorch#190489). Nothing to do outside a launcher."""
    dist = sys.modules.get("torch.distributed")  # never import torch for this
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def entry(argv: Sequence[str] | None = None) -> int:
    """The ``odedit-hf`` command and ``python -m odedit_hf.cli.main``: :func:`main`, then the process group
    closed once the command has returned (not after an exception, when another process may still be
    waiting in a collective). In-process callers of :func:`main` keep their group."""
    code = main(argv)
    close_process_group()
    return code


if __name__ == "__main__":
    sys.exit(entry())

"""``odedit-hf push ADAPTER_DIR REPO_ID``: push an edited adapter to the Hub with a generated model card.

The card is built from the run's results file (``odedit_results.json`` in the adapter folder, which
``odedit-hf edit --save-adapter`` writes, or ``--results``): front matter (``library_name: peft``,
``base_model``, tags), the method and its resolved config, the edited facts, the metric table, and
the lines that load the adapter. The endpoint and token are huggingface_hub's (``HF_ENDPOINT``,
``HF_TOKEN`` or ``hf auth login``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_parser(subparsers: Any, name: str = "push", help: str | None = None) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "adapter", metavar="ADAPTER_DIR", help="the adapter folder (odedit-hf edit --save-adapter)"
    )
    parser.add_argument(
        "repo_id", metavar="REPO_ID", help="the Hub repo, e.g. user/my-edit (created if needed)"
    )
    parser.add_argument(
        "--results",
        metavar="RESULTS.json",
        help="results file of the run that made the adapter (default: ADAPTER_DIR/odedit_results.json)",
    )
    parser.add_argument(
        "--base-model",
        metavar="HUB_ID",
        help="the base model's Hub id for the card and adapter_config.json (default: the run's --model "
        "when it was a Hub id)",
    )
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login)")
    parser.add_argument("--message", help="commit message")
    parser.add_argument(
        "--dry-run",
        metavar="DIR",
        help="write what would be uploaded (card included) to DIR instead of pushing",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    from odedit_hf.sharing.hub import check_repo_id, push_adapter, stage_adapter

    try:
        check_repo_id(args.repo_id)
        results = None
        if args.results:
            try:
                with open(args.results, encoding="utf-8") as fh:
                    results = json.load(fh)
            except (OSError, json.JSONDecodeError) as exc:
                raise ValueError(f"--results {args.results!r} cannot be read as JSON ({exc})") from None
        if args.dry_run:
            out = stage_adapter(
                args.adapter, args.dry_run, results=results, base_model=args.base_model, repo_id=args.repo_id
            )
            print(f"staged (not pushed): {out}")
            return 0
        url = push_adapter(
            args.adapter,
            args.repo_id,
            results=results,
            base_model=args.base_model,
            private=args.private,
            token=args.token,
            commit_message=args.message,
        )
    except ValueError as exc:
        print(f"odedit-hf push: error: {exc}", file=sys.stderr)
        return 2
    print(f"pushed {args.adapter} to {args.repo_id}: {url}")
    return 0

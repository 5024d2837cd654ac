"""``odedit-hf report RESULTS.json [...] --out DIR``: an HTML page with figures from results files.

Writes ``DIR/index.html`` (self-contained: inline CSS, no script, nothing fetched) and its PNG figures
beside it: per-method metric bars with the spread over seeds, sequential curves (each metric of edit
T right after it and on the final model), and per-edit outcome strips. Needs matplotlib
(``pip install 'odedit-hf[extras]'``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(subparsers: Any, name: str = "report", help: str | None = None) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "results", nargs="+", metavar="RESULTS.json", help="results files (odedit-hf edit --out)"
    )
    parser.add_argument("--out", required=True, help="the report folder (index.html + PNGs)")
    parser.add_argument("--title", help="page title (default: the methods and protocols)")
    return parser


def run(args: argparse.Namespace) -> int:
    import os

    from odedit_hf.reporting import write_report

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"odedit-hf report: error: --out {args.out!r} is a file; give a folder", file=sys.stderr)
        return 2
    try:
        written = write_report(args.results, args.out, title=args.title)
    except (ValueError, ImportError) as exc:
        print(f"odedit-hf report: error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {written['html']}")
    for path in written["figures"].values():
        print(f"  figure: {path}")
    return 0

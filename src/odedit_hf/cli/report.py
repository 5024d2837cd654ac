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
    proj = parser.add_argument_group(
        "hidden-state projection (optional)",
        "with --projection-adapter, --model and --data: the last prompt token's hidden states of the edit, "
        "rephrase and locality prompts before and after the adapter's edits, on their two principal axes",
    )
    proj.add_argument(
        "--projection-adapter", metavar="DIR", help="a saved adapter (odedit-hf edit --save-adapter)"
    )
    proj.add_argument("--model", help="the base model the adapter was made for")
    proj.add_argument("--data", help="the records whose prompts are projected (the adapter's own edits)")
    proj.add_argument("--image-root", help="folder the records' image paths are relative to")
    proj.add_argument("--rephrase-image-root", help="folder image_rephrase paths are relative to")
    proj.add_argument(
        "--task", default="auto", choices=("auto", "vqa", "caption"), help="task of the records"
    )
    proj.add_argument("--n", type=int, default=16, help="project the first N records (default: 16)")
    proj.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    return parser


def _projection(args: argparse.Namespace) -> Any:
    """The projection named by the --projection-* options, or None."""
    if not args.projection_adapter:
        if args.model or args.data:
            raise ValueError("--model/--data are for the projection: add --projection-adapter DIR")
        return None
    if not (args.model and args.data):
        raise ValueError(
            "--projection-adapter needs --model (the base model) and --data (the edited records)"
        )
    from odedit_hf.cli.edit import load_backbone, load_requests, quiet_known_warnings, resolve_device
    from odedit_hf.cli.eval import adapter_method_name
    from odedit_hf.editing.loading import check_adapter_folder, load_adapter, resolve_adapter
    from odedit_hf.reporting.projection import hidden_state_projection

    args.skip_invalid = False
    with quiet_known_warnings():
        requests, _ = load_requests(args)
        backbone = load_backbone(args.model, dtype="auto", device=resolve_device(args.device), progress=False)
        folder = resolve_adapter(args.projection_adapter)
        method = adapter_method_name(folder, check_adapter_folder(folder))
        peft_model = load_adapter(backbone.model, folder)
        return hidden_state_projection(peft_model, backbone, list(requests), method=method)


def run(args: argparse.Namespace) -> int:
    import os

    from odedit_hf.reporting import write_report

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"odedit-hf report: error: --out {args.out!r} is a file; give a folder", file=sys.stderr)
        return 2
    from odedit_hf.cli.edit import CLIError

    try:
        projection = _projection(args)
        written = write_report(args.results, args.out, title=args.title, projection=projection)
    except (ValueError, ImportError, CLIError, FileNotFoundError) as exc:
        print(f"odedit-hf report: error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {written['html']}")
    for path in written["figures"].values():
        print(f"  figure: {path}")
    return 0

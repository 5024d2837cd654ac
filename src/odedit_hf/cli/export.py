"""``odedit-hf export ADAPTER --out DIR``: a plain artefact of an edit that loads without odedit-hf.

``--format merged`` (default) merges the adapter into the base model and saves a transformers model
folder (``from_pretrained`` loads it; works for every editor whose layers merge). ``--format
adapter`` writes a stock PEFT adapter where the maths allows: an adapter of a stock PEFT type as is,
and a wrapper method's adapter (e.g. ``odedit+lora``) as the editor's own adapter (its weights are
exactly the editor's); an adapter whose layers are odedit-hf's own (FT-L) has no stock equivalent.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_parser(subparsers: Any, name: str = "export", help: str | None = None) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help, description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter", metavar="ADAPTER", help="the adapter folder (or Hub repo id)")
    parser.add_argument("--out", required=True, help="the folder to write (new or empty)")
    parser.add_argument(
        "--format",
        default="merged",
        choices=("merged", "adapter"),
        help="merged: a transformers model with the edit merged in (default); adapter: a stock PEFT adapter",
    )
    parser.add_argument(
        "--model",
        help="the base model (folder or Hub id) for --format merged (default: the adapter config's "
        "base_model_name_or_path)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    parser.add_argument("--dtype", default="auto", choices=_DTYPES, help="model dtype for --format merged")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow model code from the checkpoint (off by default)",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    from odedit_hf.cli.edit import CLIError, load_backbone, quiet_known_warnings
    from odedit_hf.editing.loading import check_adapter_folder, resolve_adapter
    from odedit_hf.sharing.export import check_export_target, export_merged, export_plain_adapter

    try:
        with quiet_known_warnings():
            check_export_target(args.out, args.overwrite)
            folder = resolve_adapter(args.adapter)
            config = check_adapter_folder(folder)
            if args.format == "adapter":
                out = export_plain_adapter(folder, args.out, overwrite=args.overwrite)
                print(f"stock PEFT adapter ({config['peft_type']} -> loadable by peft alone): {out}")
                return 0
            model = args.model or config.get("base_model_name_or_path")
            if not model:
                raise CLIError("the adapter config names no base model; pass --model (folder or Hub id)")
            backbone = load_backbone(model, trust_remote_code=args.trust_remote_code, dtype=args.dtype)
            out = export_merged(
                backbone.model, folder, args.out, processor=backbone.processor, overwrite=args.overwrite
            )
    except (CLIError, ValueError) as exc:
        print(f"odedit-hf export: error: {exc}", file=sys.stderr)
        return 2
    print(f"merged model (loadable by transformers alone): {out}")
    return 0

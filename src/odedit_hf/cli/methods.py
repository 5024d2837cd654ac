"""``odedit-hf methods``: every editing method, what it is, and its options with their defaults.

The list is discovered from the method folders (``odedit_hf/editors/<name>/``, ``odedit_hf/methods/<name>/``);
the options are generated from each method's config dataclass, exactly as ``odedit-hf edit`` takes them.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any, name: str = "methods", help: str | None = None) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help, description=__doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?", help="show only this method (e.g. odedit, lora)")
    return parser


def run(args: argparse.Namespace) -> int:
    import sys

    from odedit_hf.cli.options import format_method_options
    from odedit_hf.editing import available_methods, method_class

    names = available_methods()
    if args.name:
        try:
            names = [method_class(args.name).name]
        except ValueError as exc:
            print(f"odedit-hf methods: error: {exc}", file=sys.stderr)
            return 2
    editors = [
        n for n in available_methods() if method_class(n).kind == "editor" and method_class(n).wrappable
    ]
    for name in names:
        cls = method_class(name)
        summary = (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        alias = f" (alias: {', '.join(cls.aliases)})" if cls.aliases else ""
        print(f"{name}{alias}")
        if cls.kind == "wrapper":
            print(f"  wrapper method: --method {name}+EDITOR, EDITOR one of {', '.join(editors)}")
        else:
            flags = [
                "wrappable" if cls.wrappable else "not wrappable",
                "trains at edit" if cls.trains_at_edit else "no training at edit",
                "batch edits" if cls.supports_batch else "one request per edit",
            ]
            print(f"  base editor ({', '.join(flags)})")
        if summary:
            print(f"  {summary}")
        print(format_method_options(name))
        print()
    return 0

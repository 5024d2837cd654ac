"""Command-line options generated from the methods' config dataclasses (no method is named here).

Every method (``odedit_hf.editing.available_methods()``) declares its hyperparameters as dataclass
fields (a base editor: the fields of its :class:`~odedit_hf.editing.Editor` dataclass; a wrapper: the
fields of its PEFT config beyond peft's bookkeeping). Each becomes ``--<method>.<field>`` (dashes or
underscores), typed from the field's annotation and documented from the class docstring's ``Args:``.
``--method-config FILE.json`` gives the same as ``{"<method>": {"<field>": value}}``.

An option of a method that is not part of ``--method`` is an error that names it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "MethodOption",
    "OptionError",
    "method_options",
    "parse_method_options",
    "read_method_config",
]


class OptionError(ValueError):
    """A bad method option (unknown, not part of the method, or a bad value)."""


@dataclasses.dataclass(frozen=True)
class MethodOption:
    """One generated option: ``--<method>.<field>``."""

    method: str
    field: str
    annotation: str
    default: Any
    help: str

    @property
    def flag(self) -> str:
        return f"--{self.method}.{self.field.replace('_', '-')}"

    def parse(self, text: str) -> Any:
        """The value of ``text`` under this option's annotation."""
        try:
            return _convert(self.annotation, text)
        except ValueError as exc:
            raise OptionError(f"{self.flag}: {exc}") from None


def _docstring_args(cls: type) -> dict[str, str]:
    """``{field: help}`` from the ``Args:`` sections of the class and its bases (HF / Google style)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        doc = klass.__doc__ or ""
        if "Args:" not in doc:
            continue
        section = doc.split("Args:", 1)[1]
        current: list[str] = []
        text: list[str] = []
        indent = None
        for line in section.splitlines():
            if not line.strip():
                continue
            lead = len(line) - len(line.lstrip())
            if indent is None:
                indent = lead
            if lead < indent:
                break
            match = (
                re.match(r"\s*([A-Za-z_][\w, ]*?)\s*(\((?:[^()]|\([^()]*\))*\))?:\s*(.*)$", line)
                if lead == indent
                else None
            )
            if match:
                for name in current:
                    out[name] = " ".join(text).strip()
                current = [n.strip() for n in match.group(1).split(",")]
                text = [match.group(3)]
            else:
                text.append(line.strip())
        for name in current:
            out[name] = " ".join(text).strip()
    return {k: v for k, v in out.items() if v}


def _field_type(annotation: Any) -> str:
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", repr(annotation))


def _convert(annotation: str, text: str) -> Any:
    ann = annotation.replace(" ", "")
    optional = "None" in ann.split("|") or ann.startswith("Optional[")
    core = "|".join(p for p in ann.split("|") if p != "None") or ann
    if optional and text.lower() in ("none", "null", "off"):
        return None
    seq = re.match(r"^(?:Sequence|list|tuple|set)\[(\w+)(?:,\.\.\.)?\]$", core)
    if seq:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise ValueError(f"expected a comma-separated list, got {text!r}")
        return [_convert(seq.group(1), t) for t in items]
    if core == "bool":
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if core == "int":
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
    if core == "float":
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
    if core == "str":
        return text
    try:  # anything else: JSON when it parses, else the text itself
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def method_options(name: str) -> list[MethodOption]:
    """The generated options of one method (its own fields; a wrapper's editor has its own)."""
    from odedit_hf.editing import method_class

    cls = method_class(name)
    if cls.kind == "wrapper":
        config_cls = cls.config_class
        names = config_cls.option_names()
        fields = [f for f in dataclasses.fields(config_cls) if f.name in names]
        docs = _docstring_args(config_cls)
    else:
        fields = [f for f in dataclasses.fields(cls) if f.init]
        docs = _docstring_args(cls)
    out = []
    for f in fields:
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        help_text = docs.get(f.name) or f.metadata.get("help", "")
        out.append(MethodOption(cls.name, f.name, _field_type(f.type), default, help_text))
    return out


def read_method_config(path: str) -> dict[str, dict[str, Any]]:
    """``{"<method>": {"<field>": value}}`` from a JSON file (``--method-config``)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise OptionError(f"--method-config {path!r}: no such file") from None
    except json.JSONDecodeError as exc:
        raise OptionError(f"--method-config {path!r}: not valid JSON ({exc})") from None
    if not isinstance(data, Mapping) or not all(isinstance(v, Mapping) for v in data.values()):
        raise OptionError(
            f"--method-config {path!r}: expected an object of objects, e.g. "
            '{"odedit": {"alpha": 0.1}, "lora": {"rank": 8}}'
        )
    return {str(k): dict(v) for k, v in data.items()}


def parse_method_options(
    method: str, argv: Sequence[str], *, config: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """Parse ``--<method>.<field> VALUE`` options of ``method`` (e.g. ``odedit+lora``) from ``argv``.

    Args:
        method: the (composite) method name.
        argv: the arguments left after the command's own options.
        config: options from ``--method-config`` (command-line options override them).

    Returns:
        ``{canonical method name: {field: value}}``, only what was given.

    Raises:
        OptionError: an argument that is no method option, an option of a method that ``method`` does
            not use (the message names it), an unknown field, or a bad value.
    """
    from odedit_hf.editing import available_methods, method_class, split_method_name

    parts = split_method_name(method)
    known = {p: {o.field: o for o in method_options(p)} for p in parts}
    aliases = {}
    for p in parts:
        for alias in method_class(p).aliases:
            aliases[alias] = p
    out: dict[str, dict[str, Any]] = {p: {} for p in parts}
    for name, values in (config or {}).items():
        owner = aliases.get(name, name)
        if owner not in known:
            raise OptionError(
                f"--method-config: options for {name!r}, which --method {method} does not use "
                f"(it is made of {', '.join(parts)})"
            )
        for key, value in values.items():
            field = key.replace("-", "_")
            if field not in known[owner]:
                raise OptionError(
                    f"--method-config: {owner!r} has no option {key!r}; its options: {', '.join(known[owner])}"
                )
            out[owner][field] = value
    i = 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg:
            raise OptionError(
                f"unrecognized argument {arg!r}; method options look like --<method>.<option> VALUE "
                "(see 'odedit-hf methods')"
            )
        key, eq, value = arg[2:].partition("=")
        owner_name, _, field_text = key.partition(".")
        field = field_text.replace("-", "_")
        owner = aliases.get(owner_name, owner_name)
        if owner not in known:
            if owner in available_methods() or owner_name in aliases:
                raise OptionError(
                    f"{arg.split('=')[0]} is an option of method {owner!r}, which --method {method} does not use "
                    f"(it is made of {', '.join(parts)}); drop it or change --method"
                )
            raise OptionError(f"{arg.split('=')[0]}: no method {owner_name!r}; see 'odedit-hf methods'")
        if field not in known[owner]:
            raise OptionError(
                f"{arg.split('=')[0]}: method {owner!r} has no option {field_text!r}; its options: "
                + ", ".join(o.flag for o in known[owner].values())
            )
        if not eq:
            if i + 1 >= len(argv):
                raise OptionError(f"{arg}: expected a value")
            value = argv[i + 1]
            i += 1
        out[owner][field] = known[owner][field].parse(value)
        i += 1
    return {k: v for k, v in out.items() if v}


def format_method_options(name: str) -> str:
    """One method's options as help text (flag, type, default, description)."""
    lines = []
    for o in method_options(name):
        default = "none" if o.default is None else o.default
        if isinstance(default, (list, tuple)):
            default = ",".join(str(d) for d in default)
        lines.append(f"  {o.flag} ({o.annotation}, default {default})")
        if o.help:
            lines.append(f"      {o.help}")
    return "\n".join(lines)


def add_methods_help(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` a ``-h/--help`` that also lists every method's generated options (imported only
    when help is asked for, so building the parser stays cheap)."""

    class _Help(argparse.Action):
        def __init__(
            self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any
        ) -> None:
            super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

        def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001 - argparse API
            from odedit_hf.editing import available_methods, method_class

            parser.print_help()
            print("\nmethod options (--<method>.<option> VALUE; only those of the chosen --method apply):")
            for name in available_methods():
                cls = method_class(name)
                extra = f" (alias {', '.join(cls.aliases)})" if cls.aliases else ""
                kind = "wrapper: use as " + name + "+EDITOR" if cls.kind == "wrapper" else "base editor"
                print(f"\n{name}{extra} [{kind}]")
                print(format_method_options(name))
            parser.exit()

    parser.add_argument(
        "-h", "--help", action=_Help, help="show this help (with every method's options) and exit"
    )

"""Finding methods by name: ``get_method("lora")``, ``get_method("odedit+lora")``.

Every method is a folder under ``odedit_hf/editors/`` or ``odedit_hf/methods/`` (found by
:func:`odedit_hf._registration.discover_method_packages`, never listed here) whose package exports
``METHOD``, an :class:`~odedit_hf.editing.Editor` subclass. A composite name ``wrapper+editor``
builds the wrapper around the editor.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .editor import Editor

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_METHOD",
    "available_methods",
    "build_method",
    "get_method",
    "method_class",
    "split_method_name",
]


#: The method the command line uses when none is given (plain FT-L, the simplest baseline).
DEFAULT_METHOD = "ftl"


def _packages() -> dict[str, str]:
    from odedit_hf._registration import discover_method_packages

    return discover_method_packages()


def available_methods() -> list[str]:
    """The method names (folder names), sorted; aliases are not listed (see :func:`method_class`)."""
    return list(_packages())


def _load(package: str) -> type[Editor]:
    module = importlib.import_module(package)
    cls = getattr(module, "METHOD", None)
    if cls is None:
        raise ValueError(f"method package {package} exports no METHOD (its Editor subclass)")
    return cls


def method_class(name: str) -> type[Editor]:
    """The :class:`~odedit_hf.editing.Editor` subclass of the method ``name`` (or one of its aliases).

    Raises:
        ValueError: no such method (the message lists the known names).
    """
    packages = _packages()
    if name in packages:
        return _load(packages[name])
    for package in packages.values():  # aliases live with their method: import until found
        cls = _load(package)
        if name in cls.aliases:
            return cls
    raise ValueError(f"unknown editing method {name!r}; choose one of {', '.join(packages)}")


def split_method_name(name: str) -> list[str]:
    """``"odedit+lora"`` -> ``["odedit", "lora"]`` (outermost first); checks every part is a method."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a method name must be a non-empty string, got {name!r}")
    parts = [p.strip() for p in name.split("+")]
    if any(not p for p in parts):
        raise ValueError(f"method {name!r}: empty part; write e.g. 'odedit+lora'")
    classes = [method_class(p) for p in parts]
    for outer, inner in zip(parts, parts[1:]):
        if method_class(outer).kind != "wrapper":
            raise ValueError(
                f"method {name!r}: {outer!r} is a base editor and cannot wrap {inner!r}; "
                f"only wrapper methods ({', '.join(n for n in available_methods() if method_class(n).kind == 'wrapper')}) wrap"
            )
    if classes[-1].kind == "wrapper":
        raise ValueError(
            f"method {name!r}: the wrapper {parts[-1]!r} needs a base editor, e.g. '{parts[-1]}+lora'"
        )
    return [classes[i].name for i in range(len(parts))]


def build_method(name: str, options: Mapping[str, Mapping[str, Any]] | None = None) -> Editor:
    """Build a method from its name and namespaced options: ``{"odedit": {...}, "lora": {...}}``.

    Raises:
        ValueError: unknown name, an option namespace that is not part of ``name``, or a bad option.
    """
    parts = split_method_name(name)
    options = dict(options or {})
    unknown = sorted(set(options) - set(parts))
    if unknown:
        raise ValueError(
            f"options for {', '.join(repr(u) for u in unknown)} given, but method {name!r} is made of "
            f"{', '.join(repr(p) for p in parts)}; drop them or change the method"
        )
    method: Editor | None = None
    for part in reversed(parts):
        cls = method_class(part)
        kwargs = dict(options.get(part, {}))
        try:
            method = cls(**kwargs) if method is None else cls(editor=method, **kwargs)
        except TypeError as exc:
            raise ValueError(f"method {part!r}: bad options {sorted(kwargs)}: {exc}") from exc
    return method


def get_method(name: str, **kwargs: Any) -> Editor:
    """Build the method ``name`` with hyperparameters ``kwargs``.

    For a base editor, ``kwargs`` are its fields (``get_method("lora", rank=4)``). For a wrapper,
    ``editor=`` names the base editor (or ``name`` is composite, ``"odedit+lora"``), and flat ``kwargs``
    are split between the wrapper and the editor by the wrapper's :meth:`split_options`
    (``get_method("odedit", editor="lora", lambda_init=0.01, rank=4)``); namespaced dicts work too
    (``get_method("odedit+lora", odedit={...}, lora={...})``).

    Raises:
        ValueError: unknown name, or a hyperparameter the method does not take.
    """
    editor = kwargs.pop("editor", None)
    parts = name.split("+") if isinstance(name, str) else [name]
    if editor is not None:
        if isinstance(editor, str):
            parts = [*parts, *editor.split("+")]
        else:
            outer = method_class(name)
            if outer.kind != "wrapper":
                raise ValueError(f"method {name!r} is a base editor; editor= applies only to wrapper methods")
            return outer(editor=editor, **kwargs)
    composite = "+".join(parts)
    canonical = split_method_name(composite)
    namespaced = {k: kwargs.pop(k) for k in list(kwargs) if k in canonical and isinstance(kwargs[k], Mapping)}
    if kwargs:
        if len(canonical) == 1:
            namespaced.setdefault(canonical[0], {}).update(kwargs)
        else:
            split = method_class(canonical[0]).split_options(kwargs, canonical[1:])
            for part, values in split.items():
                namespaced.setdefault(part, {}).update(values)
    return build_method(composite, namespaced)

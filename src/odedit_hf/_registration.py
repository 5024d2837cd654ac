"""Discovery of the method packages and their registration with peft, without importing peft at
``import odedit_hf``.

Methods are folders: every package under ``odedit_hf/editors/`` (base editors) and
``odedit_hf/methods/`` (wrapper methods) is one method, named after its folder; its ``__init__``
registers its PEFT type with peft and exports ``METHOD`` (the :class:`~odedit_hf.editing.Editor`
subclass). Nothing lists them centrally.

Importing peft costs seconds (it imports transformers) and ``odedit-hf --help`` must stay instant, so
``import odedit_hf`` only calls :func:`install_peft_import_hook`: if peft is already imported every
method package is imported at once, otherwise right after peft's own import finishes. Either way, by
the time a user can call ``get_peft_model`` or ``PeftModel.from_pretrained``, every odedit-hf PEFT
type (``FTL``, ``ODEDIT``, ...) is known to peft. A package that fails to import is logged and
skipped, so one broken method does not make every other adapter unloadable.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import pkgutil
import sys
import threading
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "METHOD_FOLDERS",
    "discover_method_packages",
    "import_method_packages",
    "install_peft_import_hook",
    "retry_pending",
]

#: The packages whose sub-packages are methods, and the kind of method each holds.
METHOD_FOLDERS: dict[str, str] = {"odedit_hf.editors": "editor", "odedit_hf.methods": "wrapper"}

_LOCK = threading.RLock()
# Method packages whose import met a module of ours that was itself still importing (the hook runs
# right after peft's import, which may have been triggered from inside one of our modules); retried
# by :func:`retry_pending` at the end of those modules.
_PENDING: set[str] = set()


def discover_method_packages() -> dict[str, str]:
    """``{method name: package}`` for every method folder, found without importing any of them."""
    found: dict[str, str] = {}
    for parent in METHOD_FOLDERS:
        try:
            spec = importlib.util.find_spec(parent)
        except ModuleNotFoundError:
            continue
        if spec is None or not spec.submodule_search_locations:
            continue
        for info in pkgutil.iter_modules(list(spec.submodule_search_locations)):
            if info.ispkg and not info.name.startswith("_"):
                found.setdefault(info.name, f"{parent}.{info.name}")
    return dict(sorted(found.items()))


def _ours_initialising() -> bool:
    """Whether a module of this package is in the middle of its own import."""
    return any(
        getattr(getattr(module, "__spec__", None), "_initializing", False)
        for name, module in list(sys.modules.items())
        if name == "odedit_hf" or name.startswith("odedit_hf.")
    )


def import_method_packages() -> list[str]:
    """Import every method package (each registers its PEFT type at import); returns those imported.

    A package whose import fails because one of our modules is itself still importing is retried by
    :func:`retry_pending` once that module has finished; any other failure is logged and skipped.
    """
    imported = []
    for package in discover_method_packages().values():
        try:
            importlib.import_module(package)
        except ImportError as err:
            if _ours_initialising():
                logger.debug("odedit-hf: %s deferred until the import under way finishes (%s)", package, err)
                sys.modules.pop(package, None)
                _PENDING.add(package)
                continue
            logger.warning(
                "odedit-hf: could not import method package %s (%s: %s)", package, type(err).__name__, err
            )
            continue
        except Exception as err:  # noqa: BLE001 - one broken method must not block the others
            logger.warning(
                "odedit-hf: could not import method package %s (%s: %s)", package, type(err).__name__, err
            )
            continue
        _PENDING.discard(package)
        imported.append(package)
    return imported


def retry_pending() -> None:
    """Import the method packages that :func:`import_method_packages` had to defer (called at the end of
    the shared modules that import peft at module level)."""
    with _LOCK:
        for package in sorted(_PENDING):
            try:
                importlib.import_module(package)
            except ImportError:
                if _ours_initialising():
                    sys.modules.pop(package, None)
                    continue
                raise
            _PENDING.discard(package)


class _RunAfterImportLoader(importlib.abc.Loader):
    """Wraps peft's loader: executes peft's ``__init__`` as usual, then imports the method packages."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec):  # noqa: ANN001 - importlib protocol
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:  # noqa: ANN001 - importlib protocol
        self._loader.exec_module(module)
        _remove_hook()
        import_method_packages()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _PeftImportHook(importlib.abc.MetaPathFinder):
    """A ``sys.meta_path`` finder that answers only for the top-level ``peft`` package."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 - importlib protocol
        if fullname != "peft":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RunAfterImportLoader(spec.loader)
        return spec


def _remove_hook() -> None:
    with _LOCK:
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _PeftImportHook)]


def install_peft_import_hook() -> None:
    """Register the methods now if peft is imported, else right after peft's import (idempotent, cheap)."""
    with _LOCK:
        peft = sys.modules.get("peft")
        if peft is not None and getattr(getattr(peft, "__spec__", None), "_initializing", False) is False:
            import_method_packages()
            return
        if peft is not None:
            return  # peft is importing right now (we are inside its import): its hook will run
        if not any(isinstance(f, _PeftImportHook) for f in sys.meta_path):
            sys.meta_path.insert(0, _PeftImportHook())

"""Registration of the ``ODEDIT`` PEFT type with peft, without importing peft at ``import odedit_hf``.

peft keeps its PEFT types in a closed ``enum``; a third-party method extends ``PeftType`` at run time
and then calls ``peft.utils.register_peft_method``. Importing peft costs seconds (it imports
transformers), and ``odedit-hf --help`` must stay instant, so ``import odedit_hf`` only calls
:func:`install_peft_import_hook`: if peft is already imported the registration runs at once,
otherwise it runs right after peft's own import finishes. Either way, by the time a user can call
``get_peft_model`` or ``PeftModel.from_pretrained``, ``ODEDIT`` is known to peft.

The registration also imports the editor packages under ``odedit_hf.editors`` (each registers its own
PEFT type at import, peft style), so that an ODEdit adapter whose nested editor is, say, FT-L loads
with nothing more than ``import odedit_hf``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import logging
import pkgutil
import sys
import threading
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "ODEDIT",
    "extend_peft_type",
    "import_editor_packages",
    "install_peft_import_hook",
    "register_odedit",
]

#: The PEFT type name of ODEdit (``PeftType.ODEDIT`` once registered).
ODEDIT = "ODEDIT"

_LOCK = threading.RLock()


def extend_peft_type(name: str) -> Any:
    """Add ``name`` to peft's ``PeftType`` enum (idempotent) and return the member.

    The one implementation lives in :mod:`odedit_hf.editors` (shared by every odedit-hf PEFT method).
    """
    from odedit_hf.editors import extend_peft_type as _extend

    with _LOCK:
        return _extend(name)


def import_editor_packages() -> list[str]:
    """Import every package under ``odedit_hf.editors``; each registers its PEFT type at import.

    Returns the names imported. A package that fails to import is logged and skipped, so that one
    broken editor does not make every other adapter unloadable.
    """
    try:
        editors = importlib.import_module("odedit_hf.editors")
    except ModuleNotFoundError:
        return []
    imported = []
    for info in pkgutil.iter_modules(getattr(editors, "__path__", [])):
        if not info.ispkg or info.name.startswith("_"):
            continue
        full = f"odedit_hf.editors.{info.name}"
        try:
            importlib.import_module(full)
        except Exception as err:  # noqa: BLE001 - one broken editor must not block the others
            logger.warning(
                "odedit-hf: could not import editor package %s (%s: %s)", full, type(err).__name__, err
            )
            continue
        imported.append(full)
    return imported


def register_odedit() -> bool:
    """Register ``ODEDIT`` with peft (idempotent): extend ``PeftType``, then ``register_peft_method``.

    Returns whether ``ODEDIT`` is registered on return. Called from several places (peft's import,
    the end of ``config.py`` and ``model.py``, ``ODEditConfig.__post_init__``) because whichever of
    our modules is imported first may be only half-initialised when peft finishes importing; a call
    that meets a half-initialised module returns ``False`` and a later call completes the work.
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    with _LOCK:
        peft_type = extend_peft_type(ODEDIT)
        if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
            return True
        try:
            from .config import ODEditConfig
            from .model import ODEditModel
        except ImportError as err:
            if "partially initialized" not in str(err):
                raise
            logger.debug("ODEDIT registration deferred: %s", err)
            return False
        import_editor_packages()
        if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:  # a nested call (from the imports above) did it
            return True
        register_peft_method(name=ODEDIT.lower(), config_cls=ODEditConfig, model_cls=ODEditModel)
        logger.debug("registered PEFT type %s", ODEDIT)
        return True


class _RunAfterImportLoader(importlib.abc.Loader):
    """Wraps peft's loader: executes peft's ``__init__`` as usual, then runs the registration."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec):  # noqa: ANN001 - importlib protocol
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:  # noqa: ANN001 - importlib protocol
        self._loader.exec_module(module)
        _remove_hook()
        try:
            register_odedit()
        except Exception:
            # Failing here would make `import peft` itself fail; say why and let peft work without ODEDIT.
            logger.warning("odedit-hf: registering the ODEDIT PEFT type failed", exc_info=True)

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
    """Register ``ODEDIT`` now if peft is imported, else right after peft's import (idempotent, cheap)."""
    with _LOCK:
        peft = sys.modules.get("peft")
        if peft is not None and getattr(getattr(peft, "__spec__", None), "_initializing", False) is False:
            register_odedit()
            return
        if peft is not None:
            return  # peft is importing right now (we are inside its import): its hook will run
        if not any(isinstance(f, _PeftImportHook) for f in sys.meta_path):
            sys.meta_path.insert(0, _PeftImportHook())

"""Where built worlds live on disk, and how a finished build is recognised.

A world is keyed by ``(WORLD_VERSION, preset, seed)``; its folder under the cache root (default
``$ODEDIT_HF_CACHE`` or ``~/.cache/odedit_hf/worlds``) is ``{preset}-seed{seed}-v{WORLD_VERSION}``. A
build writes into a temporary sibling folder and renames it into place when complete, so a folder
with ``world_info.json`` in it is always a whole world, and an interrupted build leaves nothing behind
that could be mistaken for one.
"""

from __future__ import annotations

import json
import os

from .spec import WORLD_VERSION

__all__ = ["INFO_FILE", "default_cache_root", "read_info", "world_dir"]

INFO_FILE = "world_info.json"


def default_cache_root() -> str:
    """``$ODEDIT_HF_CACHE`` if set, else ``~/.cache/odedit_hf/worlds``."""
    root = os.environ.get("ODEDIT_HF_CACHE")
    return os.path.abspath(os.path.expanduser(root or os.path.join("~", ".cache", "odedit_hf", "worlds")))


def world_dir(preset: str, seed: int, cache_root: str | None = None) -> str:
    """The cache folder of ``(WORLD_VERSION, preset, seed)``."""
    return os.path.join(cache_root or default_cache_root(), f"{preset}-seed{seed}-v{WORLD_VERSION}")


def read_info(root: str) -> dict | None:
    """The ``world_info.json`` of a complete world at ``root`` (``None`` when there is none)."""
    path = os.path.join(root, INFO_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        info = json.load(fh)
    if not isinstance(info, dict) or "world_version" not in info:
        raise ValueError(
            f"{path} is not an odedit-hf world_info.json; delete {root} or rebuild it (odedit-hf world build --force; force=True in Python)"
        )
    return info

"""Writing an adapter folder atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

__all__ = ["save_adapter"]


def save_adapter(peft_model: Any, directory: str | os.PathLike[str]) -> str:
    """Write the active adapter of ``peft_model`` to ``directory`` (``adapter_config.json`` +
    ``adapter_model.safetensors``), atomically: into a temporary sibling folder, then renamed.

    Returns:
        The absolute path written. An existing folder there is replaced.
    """
    target = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(target) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".adapter-", dir=parent)
    try:
        peft_model.save_pretrained(tmp, selected_adapters=[peft_model.active_adapter])
        # save_pretrained puts a non-default adapter in a subfolder named after it
        name = peft_model.active_adapter
        written = tmp if name == "default" else os.path.join(tmp, name)
        if os.path.isdir(target):
            old = tempfile.mkdtemp(prefix=".adapter-old-", dir=parent)
            os.replace(target, os.path.join(old, "x"))
            os.replace(written, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(written, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

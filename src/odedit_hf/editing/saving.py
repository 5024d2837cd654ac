"""Writing files and adapter folders atomically, with the permissions the user's umask asks for.

``tempfile`` creates files ``0600`` and folders ``0700`` whatever the umask: an atomic writer that
renames its temporary file into place would therefore publish a results file, an adapter or a world
cache that nobody else can read. Every writer here gives the temporary file the mode a plain
``open(path, "w")`` / ``os.makedirs`` would have given it (``0666`` / ``0777`` less the umask)
before the rename.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping
from typing import Any

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_FOLDER_FILES",
    "ADAPTER_WEIGHTS",
    "check_adapter_target",
    "current_umask",
    "default_mode",
    "save_adapter",
    "write_adapter_files",
    "write_bytes_atomic",
]

#: The files of a PEFT adapter folder.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

#: What an adapter folder written by odedit-hf may hold: ``overwrite`` replaces only such a folder.
ADAPTER_FOLDER_FILES = frozenset(
    {
        ADAPTER_CONFIG,
        ADAPTER_WEIGHTS,
        "README.md",
        "odedit_results.json",
        "edited_facts.json",
        ".gitattributes",
    }
)

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (read from ``/proc/self/status`` where it exists, else set and restored)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    with _UMASK_LOCK:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_mode(*, directory: bool = False) -> int:
    """The mode a new file (``0666``) or folder (``0777``) gets under the current umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def _fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable (best effort: not every platform opens folders)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> str:
    """Write ``data`` to ``path`` via a temporary file in the same folder, ``fsync`` and ``os.replace``.

    A reader never sees a half-written file, and a process killed mid-write leaves the old file (or
    none). The file gets the umask's mode, as ``open(path, "wb")`` would.

    Returns:
        The absolute path written.
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)
    return path


def _listing(folder: str, limit: int = 5) -> str:
    names = sorted(os.listdir(folder))
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} entries)" if len(names) > limit else "")


def _apply_default_modes(folder: str) -> None:
    """Give ``folder`` and everything in it the umask's modes (some writers use ``0600`` temporaries)."""
    os.chmod(folder, default_mode(directory=True))
    for root, dirs, names in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), default_mode(directory=True))
        for name in names:
            os.chmod(os.path.join(root, name), default_mode())


def check_adapter_target(directory: str | os.PathLike[str], *, overwrite: bool = False) -> str:
    """Check that an adapter may be saved to ``directory``; return its absolute path.

    Allowed: a path that does not exist yet (its nearest existing parent must be a folder), an empty
    folder, or -- with ``overwrite`` -- an adapter folder (``adapter_config.json`` and nothing but the
    files of :data:`ADAPTER_FOLDER_FILES`), which is then replaced. Any other non-empty folder is
    refused even with ``overwrite``: replacing it would delete files that are not ours.

    Raises:
        ValueError: what is in the way and what to do.
    """
    target = os.path.abspath(os.fspath(directory))
    if os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(f"cannot save the adapter to {target}: it is a file; give a folder path")
    ancestor = os.path.dirname(target)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ValueError(f"cannot save the adapter to {target}: {ancestor} is a file, not a folder")
    if os.path.isdir(target) and os.listdir(target):
        if not os.path.isfile(os.path.join(target, ADAPTER_CONFIG)):
            raise ValueError(
                f"cannot save the adapter to {target}: the folder is not empty and holds no adapter "
                f"({_listing(target)}); nothing in it was touched; give a new or empty folder"
            )
        foreign = sorted(set(os.listdir(target)) - ADAPTER_FOLDER_FILES)
        if foreign:
            raise ValueError(
                f"cannot save the adapter to {target}: besides an adapter it holds other files "
                f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}), which replacing the folder "
                "would delete; nothing in it was touched; move them away or give a new folder"
            )
        if not overwrite:
            raise ValueError(
                f"cannot save the adapter to {target}: it already holds an adapter ({_listing(target)}); "
                "pass overwrite=True (--overwrite on the command line) to replace it, or give a new folder"
            )
    return target


def save_adapter(
    peft_model: Any,
    directory: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    files: Mapping[str, bytes | str] | None = None,
) -> str:
    """Write the active adapter of ``peft_model`` to ``directory`` (``adapter_config.json`` +
    ``adapter_model.safetensors``, plus ``files``: name -> content, e.g. a model card), atomically:
    into a temporary sibling folder, then renamed into place.

    Args:
        peft_model: a ``PeftModel``.
        directory: the adapter folder; see :func:`check_adapter_target` for what may already be there.
        overwrite: replace an existing adapter folder (never a folder holding anything else).
        files: extra files written into the folder with the adapter (``str`` is written as UTF-8).

    Returns:
        The absolute path written.

    Raises:
        ValueError: the target is in the way (see :func:`check_adapter_target`).
    """
    target = check_adapter_target(directory, overwrite=overwrite)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".adapter-", dir=parent)
    try:
        os.chmod(tmp, default_mode(directory=True))
        peft_model.save_pretrained(tmp, selected_adapters=[peft_model.active_adapter])
        # save_pretrained puts a non-default adapter in a subfolder named after it
        name = peft_model.active_adapter
        written = tmp if name == "default" else os.path.join(tmp, name)
        for filename, content in (files or {}).items():
            write_bytes_atomic(
                os.path.join(written, filename), content.encode() if isinstance(content, str) else content
            )
        _apply_default_modes(written)
        if os.path.isdir(target):
            old = tempfile.mkdtemp(prefix=".adapter-old-", dir=parent)
            os.replace(target, os.path.join(old, "x"))
            os.replace(written, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(written, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(parent)
    return target


def write_adapter_files(directory: str | os.PathLike[str], files: Mapping[str, bytes | str]) -> list[str]:
    """Add files (a model card, the results, the edited facts) to an existing adapter folder, each atomically.

    Raises:
        ValueError: ``directory`` holds no adapter.
    """
    folder = os.path.abspath(os.fspath(directory))
    if not os.path.isfile(os.path.join(folder, ADAPTER_CONFIG)):
        raise ValueError(f"{folder} holds no {ADAPTER_CONFIG}; save the adapter there first")
    return [
        write_bytes_atomic(
            os.path.join(folder, name), content.encode() if isinstance(content, str) else content
        )
        for name, content in files.items()
    ]

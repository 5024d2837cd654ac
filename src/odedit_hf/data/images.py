"""Image paths and image reading for MMEdit records.

Two jobs, kept apart from the schema so the loader and :class:`~odedit_hf.data.schema.EditRequest`
share one copy: resolving a record's relative image path under its root without letting it escape
(absolute paths, ``..``, symlinks pointing outside), and reading an image lazily as RGB with an error
that names the file, record and field.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .errors import DataValidationError

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["load_rgb_image", "resolve_image_path"]


def resolve_image_path(
    root: str,
    relative: str,
    *,
    root_arg: str,
    source: str | None = None,
    index: int | None = None,
    field: str | None = None,
) -> str:
    """Resolve ``relative`` under the directory ``root`` and check it names an existing file.

    Args:
        root: the image root, already resolved with :func:`os.path.realpath`.
        relative: the path stored in the record; must be relative.
        root_arg: the name of the argument the root came from (for messages), e.g. ``"image_root"``.
        source, index, field: where the path came from, for error messages.

    Returns:
        The resolved real path (symlinks followed), guaranteed to lie inside ``root``.

    Raises:
        DataValidationError: absolute path, a path resolving outside ``root``, or no such file.
    """
    where = {"path": source, "index": index, "field": field}
    if os.path.isabs(relative) or os.path.splitdrive(relative)[0]:
        raise DataValidationError(
            f"absolute image path {relative!r}; MMEdit image paths are relative to {root_arg}",
            hint=f"store the path relative to {root_arg} ({root})",
            **where,
        )
    try:
        # realpath follows every symlink, so a link inside the root that points outside is caught.
        resolved = os.path.realpath(os.path.join(root, relative))
    except (ValueError, OSError) as exc:  # e.g. an embedded NUL byte
        raise DataValidationError(
            f"invalid image path {relative!r} ({exc})", hint="fix the path in the record", **where
        ) from exc
    if os.path.commonpath([root, resolved]) != root:
        raise DataValidationError(
            f"image path {relative!r} resolves to {resolved}, outside {root_arg} {root}",
            hint=f"image paths may not leave {root_arg} (no '..' or symlinks pointing outside); "
            "move the image under the root or point the root higher",
            **where,
        )
    if not os.path.isfile(resolved):
        raise DataValidationError(
            f"image file not found: {resolved}",
            hint=f"check that {root_arg} ({root}) is the folder the paths are relative to "
            "and that the images are downloaded",
            **where,
        )
    return resolved


def load_rgb_image(
    path: str, *, source: str | None = None, index: int | None = None, field: str | None = None
) -> Image.Image:
    """Read the image at ``path``, fully decoded and converted to RGB.

    Raises:
        DataValidationError: the file is missing or is not an image PIL can read.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataValidationError(
            f"cannot read image {path}: {exc}",
            hint="replace or re-download the file, or drop the record",
            path=source,
            index=index,
            field=field,
        ) from exc

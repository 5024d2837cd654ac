"""What every odedit-hf tuner does in peft's ``BaseTuner._create_and_replace``, written once.

An editor whose layers wrap ``torch.nn.Linear`` modules (FT-L, GRACE, T-Patcher, WISE) calls
:func:`replace_linear_target` from its tuner's ``_create_and_replace``: it refuses what the editor cannot
target (peft's parameter targeting, another config type, a non-Linear module), updates a layer that
already holds another adapter of the editor, or wraps the module in a new layer (frozen unless the
adapter is active) and puts it in the parent's place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

__all__ = ["replace_linear_target"]


def replace_linear_target(
    tuner: Any,
    *,
    editor: str,
    config_cls: type,
    layer_cls: type,
    new_layer: Callable[[nn.Module], nn.Module],
    peft_config: Any,
    adapter_name: str,
    target: nn.Module,
    target_name: str,
    parent: nn.Module,
    current_key: str,
    parameter_name: str | None,
    kwargs: Mapping[str, Any],
    check_existing: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """Add ``adapter_name`` to ``target`` (``current_key``) for ``tuner``; return the module holding it.

    Args:
        editor: the editor's display name in messages (``"FT-L"``, ``"GRACE"``).
        config_cls, layer_cls: the editor's peft config and tuner-layer classes.
        new_layer: builds the editor's layer around ``target`` (for ``adapter_name`` and ``peft_config``).
        check_existing: called with a ``layer_cls`` target before it gets the adapter (raise to refuse).

    Raises:
        ValueError: unknown keyword arguments, a parameter target, another config type, or a target that is
            not ``torch.nn.Linear``.
    """
    name = type(tuner).__name__
    if kwargs:
        raise ValueError(f"{name}._create_and_replace: unknown keyword arguments {sorted(kwargs)}")
    if parameter_name is not None:
        raise ValueError(
            f"{editor} targets modules, not parameters; got parameter {parameter_name!r} of {current_key!r}"
        )
    if not isinstance(peft_config, config_cls):
        raise ValueError(f"{name} needs a {config_cls.__name__}, got {type(peft_config).__name__}")
    if isinstance(target, layer_cls):
        if check_existing is not None:
            check_existing(target)
        target.update_layer(adapter_name, peft_config)
        return target
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not isinstance(base, nn.Linear):
        raise ValueError(
            f"{editor} target {current_key!r} is a {type(base).__name__}, not torch.nn.Linear; "
            "target FFN projections (see the backbone registry's ffn_projections)."
        )
    module = new_layer(target)
    if adapter_name not in tuner.active_adapters:
        module.requires_grad_(False)  # a further adapter is not trainable until set_adapter makes it active
    tuner._replace_module(parent, target_name, module, target)
    return module

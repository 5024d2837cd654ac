"""What every odedit-hf tuner does in peft's ``BaseTuner._create_and_replace``, written once.

An editor's tuner calls :func:`replace_target` from its ``_create_and_replace`` (editors whose layers wrap
``torch.nn.Linear`` modules — FT-L, GRACE, T-Patcher, WISE, MEND, UniKE — through
:func:`replace_linear_target`; IKE and SERAC with their embedding / linear layers): it refuses what the
editor cannot target (peft's parameter targeting, another config type, a module of another type), updates
a layer that already holds another adapter of the editor, or wraps the module in a new layer (frozen
unless the adapter is active, where the editor trains) and puts it in the parent's place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

__all__ = ["ResizeOnLoad", "replace_linear_target", "replace_target"]


def replace_target(
    tuner: Any,
    *,
    editor: str,
    config_cls: type,
    layer_cls: type,
    new_layer: Callable[[nn.Module, nn.Module], nn.Module],
    base_types: tuple[type, ...],
    base_hint: str,
    peft_config: Any,
    adapter_name: str,
    target: nn.Module,
    target_name: str,
    parent: nn.Module,
    current_key: str,
    parameter_name: str | None,
    kwargs: Mapping[str, Any],
    check_existing: Callable[[nn.Module], None] | None = None,
    freeze_inactive: bool = True,
) -> nn.Module:
    """Add ``adapter_name`` to ``target`` (``current_key``) for ``tuner``; return the module holding it.

    Args:
        editor: the editor's display name in messages (``"FT-L"``, ``"GRACE"``).
        config_cls, layer_cls: the editor's peft config and tuner-layer classes.
        new_layer: ``new_layer(target, base)`` builds the editor's layer around ``target`` (``base`` is its
            base module, one of ``base_types``) for ``adapter_name`` and ``peft_config``; it may raise.
        base_types: the module types the editor wraps.
        base_hint: what to target instead, ending the message for a module of another type.
        check_existing: called with a ``layer_cls`` target before it gets the adapter (raise to refuse).
        freeze_inactive: a new layer of an adapter that is not active starts frozen (for editors that
            train at edit time; IKE and SERAC leave ``requires_grad`` to their tuner).

    Raises:
        ValueError: unknown keyword arguments, a parameter target, another config type, or a target that is
            none of ``base_types``.
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
    if not isinstance(base, base_types):
        wanted = " or ".join(f"torch.nn.{t.__name__}" for t in base_types)
        raise ValueError(
            f"{editor} target {current_key!r} is a {type(base).__name__}, not {wanted}; {base_hint}"
        )
    module = new_layer(target, base)
    if freeze_inactive and adapter_name not in tuner.active_adapters:
        module.requires_grad_(False)  # a further adapter is not trainable until set_adapter makes it active
    tuner._replace_module(parent, target_name, module, target)
    return module


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
    return replace_target(
        tuner,
        editor=editor,
        config_cls=config_cls,
        layer_cls=layer_cls,
        new_layer=lambda module, _base: new_layer(module),
        base_types=(nn.Linear,),
        base_hint="target FFN projections (see the backbone registry's ffn_projections).",
        peft_config=peft_config,
        adapter_name=adapter_name,
        target=target,
        target_name=target_name,
        parent=parent,
        current_key=current_key,
        parameter_name=parameter_name,
        kwargs=kwargs,
        check_existing=check_existing,
    )


class ResizeOnLoad(nn.Module):
    """The ``nn.Module`` base of a tuner layer whose adapter state grows (codebooks, neurons, memories):
    ``load_state_dict`` first calls the layer's ``resize_from_state_dict(state_dict, prefix)``, so that a
    fresh layer takes the saved sizes before its containers load. Put it first among the bases
    (``class Linear(ResizeOnLoad, GRACELayer)``): ``nn.Module``'s own method would otherwise win."""

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        self.resize_from_state_dict(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)

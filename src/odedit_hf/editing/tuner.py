"""What every odedit-hf tuner does in peft's ``BaseTuner._create_and_replace``, written once.

An editor's tuner is declared ``class FTLModel(EditorTuner, BaseTuner)``: :class:`EditorTuner`'s
``_create_and_replace`` refuses what the editor cannot target (peft's parameter targeting, another config
type, a module of another type), updates a layer that already holds another adapter of the editor, or wraps
the module in a new layer (frozen unless the adapter is active, where the editor trains) and puts it in the
parent's place. The editor declares its label, config class and base module types as class attributes and
builds its layer in :meth:`EditorTuner._new_layer`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["EditorTuner", "ResizeOnLoad"]


class EditorTuner:
    """The ``_create_and_replace`` of an editor's peft tuner. Put it first among the bases
    (``class GRACEModel(EditorTuner, BaseTuner)``): peft's ``BaseTuner`` declares the method abstract, and
    the mixin's must come first in the MRO to implement it.

    The layer classes are the tuner's ``tuner_layer_cls`` (peft's own attribute: the class, or a tuple of
    classes, of the layers that hold the editor's adapters).

    Attributes:
        editor_label: the editor's display name in messages (``"FT-L"``, ``"GRACE"``).
        config_cls: the editor's peft config class.
        base_types: the module types the editor wraps (``torch.nn.Linear`` unless declared).
        base_hint: what to target instead, ending the message for a module of another type.
        freeze_inactive: a new layer of an adapter that is not active starts frozen (for editors that train
            at edit time; IKE and SERAC leave ``requires_grad`` to their tuner).
        layer_factory: the layer class the default :meth:`_new_layer` builds, as
            ``layer_factory(target, adapter_name, peft_config)``; editors whose layer needs more (a role, a
            check of the target) override :meth:`_new_layer` instead.
    """

    editor_label: str
    config_cls: type
    base_types: tuple[type[nn.Module], ...] = (nn.Linear,)
    base_hint: str = "target FFN projections (see the backbone registry's ffn_projections)."
    freeze_inactive: bool = True
    layer_factory: Any = None

    def _new_layer(
        self, target: nn.Module, base: nn.Module, adapter_name: str, peft_config: Any, current_key: str
    ) -> nn.Module:
        """The editor's layer around ``target`` (``current_key``; ``base`` is its base module, one of
        :attr:`base_types`) holding ``adapter_name`` of ``peft_config``. It may raise to refuse the target."""
        if self.layer_factory is None:
            raise NotImplementedError(f"{type(self).__name__} must set layer_factory or implement _new_layer")
        return self.layer_factory(target, adapter_name, peft_config)

    def _check_existing(self, layer: nn.Module, peft_config: Any, current_key: str) -> None:
        """Called with a ``tuner_layer_cls`` target before it gets a further adapter; raise to refuse."""

    def _after_replace(
        self, module: nn.Module, adapter_name: str, peft_config: Any, current_key: str
    ) -> None:
        """Called with the module now holding ``adapter_name`` (new or updated) at ``current_key``."""

    def _create_and_replace(
        self,
        peft_config: Any,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Add ``adapter_name`` to ``target`` (``current_key``, ``parent.<target_name>``).

        Raises:
            ValueError: unknown keyword arguments, a parameter target, another config type, a target that is
                none of :attr:`base_types`, or what the editor's hooks refuse.
        """
        name = type(self).__name__
        if kwargs:
            raise ValueError(f"{name}._create_and_replace: unknown keyword arguments {sorted(kwargs)}")
        if parameter_name is not None:
            raise ValueError(
                f"{self.editor_label} targets modules, not parameters; got parameter {parameter_name!r} "
                f"of {current_key!r}"
            )
        if not isinstance(peft_config, self.config_cls):
            raise ValueError(f"{name} needs a {self.config_cls.__name__}, got {type(peft_config).__name__}")
        if isinstance(target, self.tuner_layer_cls):
            self._check_existing(target, peft_config, current_key)
            target.update_layer(adapter_name, peft_config)
            module = target
        else:
            from peft.tuners.tuners_utils import BaseTunerLayer

            base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
            if not isinstance(base, self.base_types):
                wanted = " or ".join(f"torch.nn.{t.__name__}" for t in self.base_types)
                raise ValueError(
                    f"{self.editor_label} target {current_key!r} is a {type(base).__name__}, not {wanted}; "
                    f"{self.base_hint}"
                )
            module = self._new_layer(target, base, adapter_name, peft_config, current_key)
            if self.freeze_inactive and adapter_name not in self.active_adapters:
                module.requires_grad_(
                    False
                )  # a further adapter is not trainable until set_adapter makes it active
            self._replace_module(parent, target_name, module, target)
        self._after_replace(module, adapter_name, peft_config, current_key)


class ResizeOnLoad(nn.Module):
    """The ``nn.Module`` base of a tuner layer whose adapter state grows (codebooks, neurons, memories):
    ``load_state_dict`` first calls the layer's ``resize_from_state_dict(state_dict, prefix)``, so that a
    fresh layer takes the saved sizes before its containers load. Put it first among the bases
    (``class Linear(ResizeOnLoad, GRACELayer)``): ``nn.Module``'s own method would otherwise win."""

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        self.resize_from_state_dict(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)

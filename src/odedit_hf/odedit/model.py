"""``ODEditModel``: the peft tuner of PEFT type ``ODEDIT``.

ODEdit changes the *objective* of an edit, not the layers: the adapter layers are exactly those of the
wrapped editor (LoRA's, FT-L's, any later one's). So this tuner is a thin delegate: it keeps one tuner
of the editor's own class on the same model (not registered as a submodule, so nothing is stored
twice) and forwards injection, adapter switching, merging and state-dict selection to it. peft's
structural helpers (``disable_adapter``, state-dict filtering by tuner layers) then work unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .config import ODEditConfig
from .registration import register_odedit

logger = logging.getLogger(__name__)

__all__ = ["ODEditModel", "editor_tuner_class"]


def editor_tuner_class(config: ODEditConfig) -> type[BaseTuner]:
    """The peft tuner class of the editor that ``config`` wraps."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING.get(config.editor.peft_type)
    if tuner_cls is None:
        raise ValueError(
            f"ODEdit: the editor PEFT type {config.editor.peft_type!r} has no tuner class registered with peft; "
            "import the package that defines the editor"
        )
    return tuner_cls


class ODEditModel(BaseTuner):
    """Creates the wrapped editor's adapter layers on ``model`` and delegates every tuner operation to it.

    Use it through peft: ``get_peft_model(model, ODEditConfig(editor=LoraConfig(...)))``. All ODEdit
    adapters on one model must wrap the same editor type.
    """

    prefix: str = "odedit_"
    tuner_layer_cls = BaseTunerLayer
    target_module_mapping: dict[str, list[str]] = {}

    def __init__(
        self,
        model: nn.Module,
        peft_config: ODEditConfig | dict[str, ODEditConfig],
        adapter_name: str,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        # set before BaseTuner.__init__ (which injects); plain attribute, never a registered submodule
        object.__setattr__(self, "_editor_tuner", None)
        super().__init__(
            model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict
        )

    # ------------------------------------------------------------------ the delegate
    @property
    def editor_tuner(self) -> BaseTuner:
        """The wrapped editor's tuner (e.g. a ``LoraModel``) that owns the adapter layers."""
        tuner = self.__dict__.get("_editor_tuner")
        if tuner is None:
            raise ValueError("ODEditModel: no adapter has been injected yet")
        return tuner

    def _check_new_adapter_config(self, config: ODEditConfig) -> None:
        if not isinstance(config, ODEditConfig):
            raise ValueError(f"ODEditModel: expected an ODEditConfig, got {type(config).__name__}")
        tuner = self.__dict__.get("_editor_tuner")
        if tuner is not None:
            wrapped = {str(c.editor_peft_type) for c in self.peft_config.values()}
            if len(wrapped) > 1:
                raise ValueError(
                    f"ODEditModel: all ODEdit adapters on one model must wrap the same editor type, got {sorted(wrapped)}; "
                    "use a separate model for another editor"
                )

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        config = self.peft_config[adapter_name]
        self._check_new_adapter_config(config)
        editor_config = config.editor
        # the editor follows the wrapper's bookkeeping (PeftModel sets these on the outer config)
        editor_config.inference_mode = config.inference_mode
        editor_config.base_model_name_or_path = config.base_model_name_or_path
        editor_config.revision = config.revision
        tuner = self.__dict__.get("_editor_tuner")
        if tuner is None:
            tuner_cls = editor_tuner_class(config)
            tuner = tuner_cls(
                model,
                {adapter_name: editor_config},
                adapter_name,
                low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )
            object.__setattr__(self, "_editor_tuner", tuner)
        else:
            tuner.peft_config[adapter_name] = editor_config
            tuner.inject_adapter(
                model,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )
        self.targeted_module_names = list(tuner.targeted_module_names)
        self.targeted_parameter_names = list(tuner.targeted_parameter_names)
        # the editor's tuner pointed the model at its own config dict; point it back at ours
        model.peft_config = self.peft_config

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - never called
        raise NotImplementedError("ODEditModel delegates layer creation to the wrapped editor's tuner")

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        self.editor_tuner._mark_only_adapters_as_trainable(model)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        self.editor_tuner.set_adapter(adapter_name, inference_mode=inference_mode)
        self.active_adapter = adapter_name

    def enable_adapter_layers(self) -> None:
        self.editor_tuner.enable_adapter_layers()

    def disable_adapter_layers(self) -> None:
        self.editor_tuner.disable_adapter_layers()

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        self.editor_tuner._enable_adapter_layers(enabled)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(
                f"ODEditModel: adapter {adapter_name!r} does not exist; have {list(self.peft_config)}"
            )
        tuner = self.editor_tuner
        tuner.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        self.active_adapter = tuner.active_adapter
        self.model.peft_config = self.peft_config

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        self.editor_tuner._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)

    def _check_merge_allowed(self) -> None:
        self.editor_tuner._check_merge_allowed()

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self.editor_tuner.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.editor_tuner.unmerge_adapter()

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        return self.editor_tuner.merge_and_unload(*args, **kwargs)

    def unload(self) -> nn.Module:
        return self.editor_tuner.unload()

    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        hooks = getattr(type(self.editor_tuner), "_enable_peft_forward_hooks", None)
        if hooks is None:
            return contextlib.nullcontext()
        return self.editor_tuner._enable_peft_forward_hooks(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            tuner = self.__dict__.get("_editor_tuner")
            if tuner is None or name.startswith("__"):
                raise
            return getattr(tuner, name)

    # ------------------------------------------------------------------ state-dict hooks (class level)
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):  # noqa: ANN001
        return editor_tuner_class(config)._get_adapter_state_dict(
            model=model,
            config=config.editor,
            adapter_name=adapter_name,
            state_dict=state_dict,
            unwanted_adapter_names=unwanted_adapter_names,
        )

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):  # noqa: ANN001
        return editor_tuner_class(config)._remap_adapter_state_dict_for_load(
            model=model, config=config.editor, adapter_name=adapter_name, state_dict=state_dict
        )


# Registration at import, as peft's own tuners do (see registration.py).
register_odedit()

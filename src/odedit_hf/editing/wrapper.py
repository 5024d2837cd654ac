"""The generic wrapper shared by ODEdit, LDKE and ASAM: a nested-editor PEFT config, a delegating
tuner, and the :class:`Wrapper` method base.

A wrapper method changes the *objective* of an edit (and may add a gate), not the editor's layers:
the adapter layers are exactly those of the wrapped editor (LoRA's, FT-L's, GRACE's, ...). So

- :class:`WrapperConfig` is a ``PeftConfig`` holding the wrapped editor's config in ``editor``, saved
  nested in ``adapter_config.json`` and rebuilt on load;
- :class:`WrapperModel` is a thin delegate tuner: it keeps one tuner of the editor's own class on the
  same model (not registered as a submodule, so nothing is stored twice) and forwards injection,
  adapter switching, merging and state-dict selection to it. peft's structural helpers
  (``disable_adapter``, state-dict filtering by tuner layers) then work unchanged;
- :class:`Wrapper` is the :class:`~odedit_hf.editing.Editor` of a wrapper: it holds the wrapped editor
  method, builds ``Config(editor=editor.peft_config(backbone), **options)``, and forwards every editor
  hook to the editor (a wrapper that needs more overrides them and calls ``super()``).

A method subclasses the three (``ODEditConfig(WrapperConfig)``, ``ODEditModel(WrapperModel)``,
``ODEditMethod(Wrapper)``) and registers its PEFT type in its package ``__init__``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .editor import Editor

if TYPE_CHECKING:
    from peft import PeftModel

    from odedit_hf.backbones import Backbone
    from odedit_hf.data import EditRequest

    from .protocol import EditStats
    from .rollback import BaseWeights

logger = logging.getLogger(__name__)

__all__ = ["Wrapper", "WrapperConfig", "WrapperModel", "editor_config_from_dict", "editor_tuner_class"]


def editor_config_from_dict(data: Mapping[str, Any], *, where: str = "WrapperConfig.editor") -> PeftConfig:
    """Rebuild a nested editor config saved by :meth:`WrapperConfig.to_dict`."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from odedit_hf._registration import import_method_packages

    peft_type = data.get("peft_type")
    if peft_type is None:
        raise ValueError(
            f"{where}: the nested editor config has no 'peft_type'; pass a PeftConfig instance "
            "(e.g. LoraConfig(...) or FTLConfig(...)) or a dict saved by to_dict()"
        )
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        import_method_packages()  # method packages register their PEFT types when imported
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise ValueError(
            f"{where}: PEFT type {peft_type!r} of the nested editor is not registered with peft; "
            "import the package that defines it before loading this adapter"
        )
    return PEFT_TYPE_TO_CONFIG_MAPPING[peft_type].from_peft_type(**dict(data))


def _jsonable(value: Any) -> Any:
    """Sets become sorted lists (peft's own save only converts top-level sets), recursively."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@dataclasses.dataclass
class WrapperConfig(PeftConfig):
    """Base of a wrapper method's PEFT config: the nested config of the editor it wraps.

    Args:
        editor (`PeftConfig`):
            The config of the wrapped editor, e.g. peft's `LoraConfig` or odedit-hf's `FTLConfig`. Saved
            nested in `adapter_config.json` and rebuilt on load.
    """

    editor: Any = dataclasses.field(default=None, metadata={"help": "The nested editor config (PeftConfig)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        where = type(self).__name__
        if self.editor is None:
            raise ValueError(
                f"{where}: `editor` is required: pass the config of the editor it wraps, e.g. "
                f"{where}(editor=LoraConfig(target_modules=[...]))"
            )
        if isinstance(self.editor, Mapping):
            self.editor = editor_config_from_dict(self.editor, where=f"{where}.editor")
        if not isinstance(self.editor, PeftConfig):
            raise ValueError(
                f"{where}.editor must be a PeftConfig (or its dict), got {type(self.editor).__name__}"
            )
        if self.editor.is_prompt_learning:
            raise ValueError(
                f"{where}.editor: prompt-learning methods ({self.editor.peft_type}) have no edit parameters inside "
                "the model; wrap a tuner such as LoRA or FT-L"
            )
        if isinstance(self.editor, WrapperConfig):
            raise ValueError(f"{where}.editor: a wrapper method cannot wrap another wrapper's config")
        self.editor.task_type = self.task_type  # the editor follows the wrapper in this bookkeeping field

    @property
    def editor_peft_type(self) -> str:
        """The PEFT type of the wrapped editor (e.g. ``"LORA"``, ``"FTL"``)."""
        peft_type = self.editor.peft_type
        return str(peft_type.value if hasattr(peft_type, "value") else peft_type)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the nested editor config as its own ``to_dict()`` (sets as sorted lists)."""
        out = {
            f.name: copy.deepcopy(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name != "editor"
        }
        out["editor"] = _jsonable(self.editor.to_dict())
        return _jsonable(out)

    @classmethod
    def option_names(cls) -> list[str]:
        """The wrapper's own hyperparameters (its fields beyond peft's bookkeeping and ``editor``)."""
        base = {f.name for f in dataclasses.fields(PeftConfig)}
        return [f.name for f in dataclasses.fields(cls) if f.name not in base and f.name != "editor"]


def editor_tuner_class(config: WrapperConfig) -> type[BaseTuner]:
    """The peft tuner class of the editor that ``config`` wraps."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING.get(config.editor.peft_type)
    if tuner_cls is None:
        raise ValueError(
            f"the editor PEFT type {config.editor.peft_type!r} has no tuner class registered with peft; "
            "import the package that defines the editor"
        )
    return tuner_cls


class WrapperModel(BaseTuner):
    """Creates the wrapped editor's adapter layers on ``model`` and delegates every tuner operation to it.

    Subclasses set ``prefix`` and ``config_class``. All adapters of one wrapper model must wrap the same
    editor type.
    """

    prefix: str = "wrapper_"
    config_class: ClassVar[type[WrapperConfig]] = WrapperConfig
    tuner_layer_cls = BaseTunerLayer
    target_module_mapping: dict[str, list[str]] = {}

    def __init__(
        self,
        model: nn.Module,
        peft_config: WrapperConfig | dict[str, WrapperConfig],
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
            raise ValueError(f"{type(self).__name__}: no adapter has been injected yet")
        return tuner

    def _check_new_adapter_config(self, config: WrapperConfig) -> None:
        name = type(self).__name__
        if not isinstance(config, self.config_class):
            raise ValueError(f"{name}: expected a {self.config_class.__name__}, got {type(config).__name__}")
        if self.__dict__.get("_editor_tuner") is not None:
            wrapped = {str(c.editor_peft_type) for c in self.peft_config.values()}
            if len(wrapped) > 1:
                raise ValueError(
                    f"{name}: all adapters on one model must wrap the same editor type, got {sorted(wrapped)}; "
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
            tuner = editor_tuner_class(config)(
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
        raise NotImplementedError(
            f"{type(self).__name__} delegates layer creation to the wrapped editor's tuner"
        )

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
                f"{type(self).__name__}: adapter {adapter_name!r} does not exist; have {list(self.peft_config)}"
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
        if getattr(type(self.editor_tuner), "_enable_peft_forward_hooks", None) is None:
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


class Wrapper(Editor):
    """Base of a wrapper method's :class:`~odedit_hf.editing.Editor` (ODEdit, LDKE, ASAM).

    Subclasses are dataclasses with an ``editor`` field (the wrapped editor method) and set
    :attr:`config_class` (their :class:`WrapperConfig` subclass). The wrapper's hyperparameters are the
    config's own fields (:meth:`WrapperConfig.option_names`), held in ``options_`` and passed to the
    config. Every editor hook is forwarded to the wrapped editor, so the editor's growth, losses,
    snapshots and identity check keep working under the wrapper.
    """

    kind: ClassVar[str] = "wrapper"
    wrappable: ClassVar[bool] = False
    config_class: ClassVar[type[WrapperConfig]] = WrapperConfig

    editor: Editor

    def _check_editor(self) -> None:
        if not isinstance(self.editor, Editor):
            raise ValueError(
                f"{self.name}: editor must be an editing method (e.g. get_method('lora')), got {type(self.editor).__name__}"
            )
        if self.editor.kind == "wrapper" or not self.editor.wrappable:
            raise ValueError(
                f"{self.name} cannot wrap {self.editor.name!r}: "
                + (
                    "it is a wrapper method itself"
                    if self.editor.kind == "wrapper"
                    else getattr(self.editor, "wrap_refusal", lambda wrapper: None)(type(self).name)
                    or "that editor declares it cannot be wrapped"
                )
            )
        if not self.editor.trains_at_edit:
            raise ValueError(
                f"{self.name} cannot wrap {self.editor.name!r}: that editor trains no parameter at edit time"
            )
        self.name = f"{type(self).name}+{self.editor.name}"
        # validate the wrapper's options now, where the user set them (the config is rebuilt per backbone later)
        from peft import LoraConfig

        self.config_class(editor=LoraConfig(target_modules=["placeholder"]), **self.config_options())

    @classmethod
    def split_options(
        cls, kwargs: Mapping[str, Any], editor_parts: Sequence[str]
    ) -> dict[str, dict[str, Any]]:
        """Split flat keyword arguments between the wrapper (its config's fields) and the editor (the rest).

        A name both take goes to the editor unless written ``<wrapper>_<name>`` (``odedit_alpha``).
        """
        from .registry import method_class

        own = set(cls.config_class.option_names())
        editor_fields = {f.name for f in dataclasses.fields(method_class(editor_parts[0]))}
        out: dict[str, dict[str, Any]] = {cls.name: {}, editor_parts[0]: {}}
        for key, value in kwargs.items():
            prefixed = key.removeprefix(f"{cls.name}_")
            if prefixed != key and prefixed in own:
                out[cls.name][prefixed] = value
            elif key in own and key not in editor_fields:
                out[cls.name][key] = value
            else:
                out[editor_parts[0]][key] = value
        return out

    @property
    def wrapper_options(self) -> dict[str, Any]:
        """The wrapper's own options, as set (defaults are the config's)."""
        return {k: v for k, v in self.options().items() if k != "editor"}

    #: whether the wrapper's own step is checkpointing-safe (then the wrapped editor decides too)
    wrapper_supports_gradient_checkpointing: ClassVar[bool] = False

    @property
    def supports_gradient_checkpointing(self) -> bool:  # type: ignore[override]
        """Checkpointing-safe only when both the wrapper's step and the wrapped editor are."""
        return type(self).wrapper_supports_gradient_checkpointing and bool(
            getattr(self.editor, "supports_gradient_checkpointing", False)
        )

    @property
    def loop(self):  # noqa: ANN201 - EditLoopConfig
        """The wrapped editor's loop: a wrapper reuses its editor's step budget and learning rate."""
        return self.editor.loop

    def peft_config(self, backbone: Backbone) -> WrapperConfig:
        """``Config(editor=<the editor's config>, **wrapper options)``."""
        return self.config_class(editor=self.editor.peft_config(backbone), **self.config_options())

    def config_options(self) -> dict[str, Any]:
        """The keyword arguments of :attr:`config_class` (default: :attr:`wrapper_options`)."""
        return self.wrapper_options

    # ------------------------------------------------------------------ the editor's hooks, forwarded
    def before_edit(self, peft_model: PeftModel, backbone: Backbone, requests: Sequence[EditRequest]) -> None:
        self.editor.before_edit(peft_model, backbone, requests)

    def after_edit(
        self, peft_model: PeftModel, backbone: Backbone, requests: Sequence[EditRequest], stats: EditStats
    ) -> None:
        self.editor.after_edit(peft_model, backbone, requests, stats)

    def extra_loss(self, peft_model: PeftModel) -> dict[str, torch.Tensor]:
        return self.editor.extra_loss(peft_model)

    def adapter_is_identity(self, peft_model: PeftModel) -> bool:
        return self.editor.adapter_is_identity(peft_model)

    def edit_parameters(self, peft_model: PeftModel) -> list[torch.nn.Parameter]:
        return self.editor.edit_parameters(peft_model)

    def snapshot(self, peft_model: PeftModel, adapter_name: str, base: BaseWeights | None = None) -> Any:
        return self.editor.snapshot(peft_model, adapter_name, base=base)

    def extra_memory_bytes(self, num_edit_parameters: int) -> int:
        """The editor's own state plus the wrapper's (:meth:`wrapper_memory_bytes`)."""
        return self.editor.extra_memory_bytes(num_edit_parameters) + self.wrapper_memory_bytes(
            num_edit_parameters
        )

    def wrapper_memory_bytes(self, num_edit_parameters: int) -> int:
        """Bytes of the wrapper's own state (default 0; ODEdit: its λ-network)."""
        return 0

    def resolved_config(self) -> dict[str, Any]:
        """Name, the wrapper's options *resolved* (every field of its config, defaults included) and the
        editor's resolved config."""
        defaults = {
            f.name: f.default
            for f in dataclasses.fields(self.config_class)
            if f.name in self.config_class.option_names() and f.default is not dataclasses.MISSING
        }
        defaults.update(self.config_options())
        from .editor import _jsonable as jsonable

        return {"name": self.name, "options": jsonable(defaults), "editor": self.editor.resolved_config()}


# A method package that this module's own peft import deferred (see odedit_hf._registration) can load now.
from odedit_hf._registration import retry_pending as _retry_pending  # noqa: E402

_retry_pending()

"""WISE tuner: wraps the targeted ``nn.Linear`` module(s) of a model in :class:`~.layer.Linear` and gives
them the forward's attention mask (a pre-hook on the decoder stack)."""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from odedit_hf.editing.tuner import EditorTuner

from .config import WISEConfig
from .layer import NOT_MERGEABLE, AttentionMaskHolder, Linear, WISELayer

logger = logging.getLogger(__name__)

__all__ = ["WISEModel"]

_PEFT_PREFIX = "base_model.model."
_HOLDER_ATTR = "_wise_attention_mask_holder"
_STACK = re.compile(r"^(.+?)\.(?:layers|h|blocks)\.\d+\.")


def _attach_mask_holder(model: nn.Module, module_name: str) -> AttentionMaskHolder | None:
    """The :class:`AttentionMaskHolder` of ``model.<module_name>``, with the hooks that fill it registered
    once per module (a pre-hook storing a 2-D ``attention_mask`` keyword, a post-hook clearing it)."""
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        logger.warning(
            "WISE: no module %r to read the attention mask from; routing averages over every position",
            module_name,
        )
        return None
    holder = module.__dict__.get(_HOLDER_ATTR)
    if holder is not None:
        return holder
    holder = AttentionMaskHolder()

    def before(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        holder.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def after(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        holder.mask = None

    holder.handles = (  # type: ignore[attr-defined]
        module.register_forward_pre_hook(before, with_kwargs=True),
        module.register_forward_hook(after, with_kwargs=True, always_call=True),
    )
    module.__dict__[_HOLDER_ATTR] = holder
    return holder


def _detach_mask_holders(model: nn.Module) -> None:
    for module in model.modules():
        holder = module.__dict__.pop(_HOLDER_ATTR, None)
        if holder is not None:
            for handle in getattr(holder, "handles", ()):
                handle.remove()


class WISEModel(EditorTuner, BaseTuner):
    """WISE as a peft tuner: ``get_peft_model(model, WISEConfig(target_modules=[...]))`` builds it.

    Loading a checkpoint resizes every layer's stored shards to the checkpoint's count first
    (:meth:`_remap_adapter_state_dict_for_load`), so ``PeftModel.from_pretrained(fresh_model, path)``
    reproduces the memories exactly. Merging raises: routing is not a weight delta.
    """

    prefix: str = "wise_"
    tuner_layer_cls = WISELayer
    target_module_mapping: dict[str, list[str]] = {}
    editor_label = "WISE"
    config_cls = WISEConfig
    layer_factory = Linear

    def _after_replace(
        self, module: nn.Module, adapter_name: str, peft_config: PeftConfig, current_key: str
    ) -> None:
        mask_module = peft_config.mask_module
        if mask_module is None:
            found = _STACK.match(current_key)
            mask_module = found.group(1) if found else None
        if mask_module is not None and module._wise_attention is None:
            module._wise_attention = _attach_mask_holder(self.model, mask_module)

    def _check_merge_allowed(self) -> None:
        raise ValueError(NOT_MERGEABLE)

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        _detach_mask_holders(self.model)
        return super()._unload_and_optionally_merge(*args, **kwargs)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls,
        model: nn.Module,
        config: PeftConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Resize every WISE layer's stored shards of ``adapter_name`` to the checkpoint's, then peft's remap."""
        for module_name, module in model.named_modules():
            if not isinstance(module, WISELayer) or adapter_name not in module.wise_memories:
                continue
            short = module_name.removeprefix(_PEFT_PREFIX)
            for name in dict.fromkeys((module_name, _PEFT_PREFIX + short, short)):
                saved = state_dict.get(f"{name}.wise_memories")
                if saved is not None:
                    module.resize_memories(adapter_name, int(saved.shape[0]))
                    break
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

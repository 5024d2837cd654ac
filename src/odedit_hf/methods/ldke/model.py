"""``LDKEModel``: the peft tuner of PEFT type ``LDKE``.

The adapter layers are the wrapped editor's (the generic delegating
:class:`~odedit_hf.editing.wrapper.WrapperModel`); LDKE adds, per adapter, a
:class:`~.classifier.ClassifierState` (``ldke_gate.<adapter>``, a child of the tuner, so peft's
structural state-dict selection saves and loads it with the editor's tensors) and two kinds of forward
hooks, installed at injection and removed by ``unload``:

- a pre-hook on the lowest candidate decoder layer computes the gate of every position of the batch
  from the hidden states entering it (:func:`~.classifier.gate_features`);
- a hook on every adapter layer replaces its output ``y`` by ``base(x) + gate · (y - base(x))``, and
  by ``base(x)`` in decoder layers that no edit has trained (so an editor whose fresh adapter is not
  exactly the identity changes nothing there). The editor's own forward is untouched, which is what
  lets LDKE gate any editor (FT-L, LoRA, GRACE, T-Patcher) whose adapter layer returns the base
  layer's output plus something.
"""

from __future__ import annotations

import logging
import re
from typing import Any, ClassVar

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from odedit_hf.editing.wrapper import WrapperModel

from .classifier import ClassifierState, gate_features, gate_logits
from .config import LDKEConfig

logger = logging.getLogger(__name__)

__all__ = ["LDKEModel", "adapter_layer_indices"]

_LAYER_RE = re.compile(r"^(.*\.layers)\.(\d+)\.")


def adapter_layer_indices(model: nn.Module) -> tuple[str, dict[str, int]]:
    """The decoder-layer list holding the adapter layers of ``model`` and ``{module name: layer index}``.

    Raises:
        ValueError: an adapter layer outside the decoder layers, or adapter layers in two layer lists.
    """
    paths: set[str] = set()
    found: dict[str, int] = {}
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        match = _LAYER_RE.match(name)
        if match is None:
            raise ValueError(
                f"LDKE: the adapter layer {name!r} is not inside a decoder layer; LDKE localises and gates "
                "edits per decoder layer, so wrap an editor that targets decoder-layer modules"
            )
        paths.add(match.group(1))
        found[name] = int(match.group(2))
    if not found:
        raise ValueError("LDKE: the wrapped editor created no adapter layer")
    if len(paths) > 1:
        raise ValueError(
            f"LDKE: the editor's adapter layers lie in several layer lists {sorted(paths)}; "
            "target the language model's decoder layers only"
        )
    return paths.pop(), found


class LDKEModel(WrapperModel):
    """Creates the wrapped editor's adapter layers, the classifier state and the gating hooks.

    Use it through peft: ``get_peft_model(model, LDKEConfig(editor=LoraConfig(...)))``. All LDKE
    adapters on one model must wrap the same editor type. Merging is refused while the classifier is
    on (merged weights would apply the edit to every input).
    """

    prefix: str = "ldke_"
    config_class: ClassVar[type[LDKEConfig]] = LDKEConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        object.__setattr__(self, "_ldke_hooks", [])
        object.__setattr__(self, "_ldke_gate_value", None)
        object.__setattr__(self, "_ldke_features", None)
        object.__setattr__(self, "_ldke_layer_of", {})
        object.__setattr__(self, "_ldke_feature_layer", None)
        object.__setattr__(self, "_ldke_layers_path", None)
        object.__setattr__(self, "_ldke_base_out", {})
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ injection
    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        config = self.peft_config[adapter_name]
        path, layer_of = adapter_layer_indices(model)
        num_layers = len(model.get_submodule(path))
        feature_layer = min(layer_of.values())
        hidden = _hidden_size(model)
        if "ldke_gate" not in self._modules:
            self.ldke_gate = nn.ModuleDict()
        device = next(model.parameters()).device
        self.ldke_gate[adapter_name] = ClassifierState(config.classifier_capacity, 2 * hidden, num_layers).to(
            device
        )
        self._install_hooks(model, path, layer_of, feature_layer)

    def _install_hooks(
        self, model: nn.Module, path: str, layer_of: dict[str, int], feature_layer: int
    ) -> None:
        self._remove_hooks()
        hooks = [
            model.get_submodule(f"{path}.{feature_layer}").register_forward_pre_hook(
                self._capture_hook, with_kwargs=True
            )
        ]
        by_module = {}
        for name, index in layer_of.items():
            module = model.get_submodule(name)
            by_module[id(module)] = index
            # the base layer's own output inside the adapter layer's forward: what the gate falls back to,
            # without running the base layer a second time (and with the input the editor gave it)
            hooks.append(module.get_base_layer().register_forward_hook(self._base_hook))
            hooks.append(module.register_forward_hook(self._gate_hook, with_kwargs=True))
        object.__setattr__(self, "_ldke_hooks", hooks)
        object.__setattr__(self, "_ldke_layer_of", by_module)
        object.__setattr__(self, "_ldke_feature_layer", feature_layer)
        object.__setattr__(self, "_ldke_layers_path", path)

    def _remove_hooks(self) -> None:
        for handle in self.__dict__.get("_ldke_hooks", []):
            handle.remove()
        object.__setattr__(self, "_ldke_hooks", [])
        object.__setattr__(self, "_ldke_gate_value", None)

    # ------------------------------------------------------------------ what the method reads
    @property
    def feature_layer(self) -> int:
        """The decoder layer whose input feeds the classifier (the lowest candidate layer)."""
        return int(self._ldke_feature_layer)

    def layer_index_of(self, module: nn.Module) -> int | None:
        """The decoder-layer index of an adapter layer (``None`` for other modules)."""
        return self._ldke_layer_of.get(id(module))

    def candidate_layers(self) -> list[int]:
        """The decoder layers holding adapter layers, sorted."""
        return sorted(set(self._ldke_layer_of.values()))

    def gate_state(self, adapter_name: str | None = None) -> ClassifierState:
        """The classifier state of ``adapter_name`` (default: the active adapter)."""
        return self.ldke_gate[adapter_name or self._active_name()]

    def last_features(self) -> torch.Tensor | None:
        """The classifier features ``(B, T, 2H)`` of the last forward pass (``None`` before any)."""
        return self._ldke_features

    def _active_name(self) -> str:
        active = self.active_adapter
        return active if isinstance(active, str) else active[0]

    # ------------------------------------------------------------------ the hooks
    def _capture_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if hidden is None:
            raise ValueError(
                "LDKE: the decoder layer was called without hidden states; cannot compute the gate"
            )
        cache_position = kwargs.get("cache_position")
        if cache_position is not None and cache_position.numel() and int(cache_position.reshape(-1)[0]) > 0:
            raise ValueError(
                "LDKE: incremental decoding with a KV cache is not supported (the gate needs the whole "
                "sequence); call the model on full sequences (e.g. generate(..., use_cache=False))"
            )
        name = self._active_name()
        config = self.peft_config[name]
        if not config.classifier:
            object.__setattr__(self, "_ldke_gate_value", None)
            object.__setattr__(self, "_ldke_features", None)
            return
        features = gate_features(hidden)
        object.__setattr__(self, "_ldke_features", features)
        logits = gate_logits(self.ldke_gate[name], features)
        if logits is None:
            gate = torch.zeros(hidden.shape[:2], device=hidden.device)
        elif config.gate == "hard":
            gate = (logits > 0).float()
        else:
            gate = torch.sigmoid(logits)
        object.__setattr__(self, "_ldke_gate_value", gate)

    def _base_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._ldke_base_out[id(module)] = output

    def _gate_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        base = self._ldke_base_out.pop(id(module.get_base_layer()), None)
        if module.disable_adapters or module.merged or not isinstance(output, torch.Tensor):
            return None
        if not isinstance(base, torch.Tensor) or base.shape != output.shape:
            # the layer's output is not "base output + something" of the same shape (T-Patcher's key layer
            # appends its neurons' activations; the value layer after it is where the patch is gated)
            return None
        name = self._active_name()
        config = self.peft_config[name]
        state = self.ldke_gate[name]
        index = self._ldke_layer_of.get(id(module))
        if index is not None and not bool(state.used_layers[index]):
            return base
        if not config.classifier:
            return None
        gate = self._ldke_gate_value
        if gate is None:
            raise ValueError(
                "LDKE: an adapter layer ran before the classifier's gate was computed; call the whole model, "
                "not one of its layers"
            )
        if tuple(gate.shape) != tuple(output.shape[:2]):
            raise ValueError(
                f"LDKE: gate shape {tuple(gate.shape)} does not match the adapter layer's output "
                f"{tuple(output.shape)}; the layer must see (batch, tokens, ...) inputs"
            )
        g = gate.to(output.dtype).unsqueeze(-1)
        if config.gate == "hard":
            return torch.where(g > 0, output, base)
        return base + g * (output - base)

    # ------------------------------------------------------------------ tuner operations
    def _check_merge_allowed(self) -> None:
        if any(c.classifier for c in self.peft_config.values()):
            raise ValueError(
                "LDKE: an adapter with the Disentanglement Classifier cannot be merged (the merged weights "
                "would apply the edit to every input); keep it unmerged, or edit with --ldke.classifier false"
            )
        super()._check_merge_allowed()

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self._check_merge_allowed()
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        self._check_merge_allowed()
        self._remove_hooks()
        return super().merge_and_unload(*args, **kwargs)

    def unload(self) -> nn.Module:
        self._remove_hooks()
        return super().unload()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if "ldke_gate" in self._modules and adapter_name in self.ldke_gate:
            del self.ldke_gate[adapter_name]
        if not self.peft_config:
            self._remove_hooks()


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        size = getattr(text, "hidden_size", None)
        if isinstance(size, int):
            return size
    raise ValueError("LDKE: cannot read the language model's hidden_size from model.config")

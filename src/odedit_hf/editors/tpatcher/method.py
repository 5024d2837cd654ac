"""T-Patcher as an :class:`~odedit_hf.editing.Editor` (``get_method("tpatcher")``).

Huang et al., "Transformer-Patcher: One Mistake Worth One Neuron" (ICLR 2023). Before every edit the
editor counts the target tokens the current model gets wrong and adds one patch neuron per error (at
most ``max_add_neuron_num`` per request) to the last FFN of the language model; the new neurons are
the only parameters the edit trains (earlier edits' neurons are frozen), on the target NLL plus the
activation loss (each new neuron fires on its error's FFN input) and the memory loss (it stays silent
on the memory: FFN inputs of the training split and of past edits).
"""

from __future__ import annotations

import logging
import math
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from odedit_hf.editing.editor import Editor, no_layer_changes

if TYPE_CHECKING:
    from peft import PeftModel

    from odedit_hf.backbones import Backbone
    from odedit_hf.data import EditRequest
    from odedit_hf.editing import BaseWeights, EditStats

    from .config import TPatcherConfig
    from .layer import TPatcherLayer

logger = logging.getLogger(__name__)

__all__ = ["TPatcherMethod", "TPatcherSnapshot", "activation_loss", "ffn_roles", "memory_loss"]


def _topk_mean(values: torch.Tensor, k: int) -> torch.Tensor:
    flat = values.reshape(-1)
    return torch.topk(flat, min(k, flat.numel())).values.mean()


def activation_loss(a_edit: torch.Tensor, *, margin: float = 0.0, topk: int = 5) -> torch.Tensor:
    """T-Patcher's activation loss: the mean of the ``topk`` largest ``exp(margin - a)`` over the new
    neurons' activations ``a_edit`` at their own error inputs (pushes every new neuron to fire there)."""
    if a_edit.numel() == 0:
        raise ValueError("activation_loss: no activation given (an edit adds at least one neuron)")
    return _topk_mean(torch.exp(margin - a_edit), topk)


def memory_loss(
    a_mem: torch.Tensor, a_edit: torch.Tensor, *, margin: float = 3.0, floor: float = -3.0, topk: int = 1000
) -> torch.Tensor:
    """T-Patcher's memory loss on the new neurons' activations ``a_mem`` ``(m, n)`` at ``m`` memory inputs.

    ``mean(top_k exp(a_mem - a_edit + margin)) + mean(top_k exp(a_mem - floor))`` over all ``m·n``
    entries (``a_edit`` ``(n,)`` broadcast per neuron): each neuron fires at least ``margin`` less on the
    memory than at its edit input, and below ``floor`` there. 0 for an empty memory.
    """
    if a_mem.numel() == 0:
        return a_edit.new_zeros(())
    relative = torch.exp(a_mem - a_edit.unsqueeze(0) + margin)
    absolute = torch.exp(a_mem - floor)
    return _topk_mean(relative, topk) + _topk_mean(absolute, topk)


def ffn_roles(backbone: Backbone, layer: int = -1) -> tuple[str, str | None, str]:
    """``(key, up, value)`` module names of decoder layer ``layer``'s FFN, from the backbone registry.

    The registry lists an FFN's projections in data-flow order: the last is the value (output) projection,
    whose shapes mirror the others'; of two input projections (SwiGLU) the one named ``*gate*`` is the key
    (its output goes through the activation) and the other the up projection.
    """
    from torch import nn

    names = backbone.ffn_module_names(layers=[layer])
    modules = {}
    for name in names:
        module = backbone.base_model.get_submodule(name)
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if not isinstance(base, nn.Linear):
            raise ValueError(f"T-Patcher: FFN projection {name!r} is a {type(base).__name__}, not nn.Linear")
        modules[name] = base

    # the registry lists the projections in data-flow order (fc1, fc2 / gate, up, down): the last one is
    # the output projection; its shapes must mirror every input projection's
    *inputs, value = names
    out = modules[value]
    if (
        not inputs
        or len(inputs) > 2
        or any(
            out.in_features != modules[n].out_features or out.out_features != modules[n].in_features
            for n in inputs
        )
    ):
        raise ValueError(
            f"T-Patcher: {names} of the {backbone.spec.model_type!r} backbone are not an FFN's input projection(s) "
            "followed by its output projection (expected fc1/fc2 or gate/up/down, in that order and shape)"
        )
    if len(inputs) == 1:
        return inputs[0], None, value
    gates = [n for n in inputs if "gate" in n.rsplit(".", 1)[-1]]
    if len(gates) != 1:
        raise ValueError(
            f"T-Patcher: a gated FFN needs exactly one projection named '*gate*' among {inputs} "
            f"(the one whose output goes through the activation)"
        )
    return gates[0], next(n for n in inputs if n != gates[0]), value


def _patch_layers(peft_model: Any, adapter_name: str) -> dict[str, TPatcherLayer]:
    from .layer import TPatcherLayer

    found: dict[str, TPatcherLayer] = {}
    for module in peft_model.modules():
        if isinstance(module, TPatcherLayer) and adapter_name in module.tpatcher_weight:
            if module.role in found:
                raise ValueError(
                    f"T-Patcher adapter {adapter_name!r} patches more than one {module.role} projection"
                )
            found[module.role] = module
    if "key" not in found or "value" not in found:
        raise ValueError(
            f"the model has no T-Patcher adapter {adapter_name!r}; wrap it with "
            "get_peft_model(model, get_method('tpatcher').peft_config(backbone))"
        )
    return found


class TPatcherSnapshot:
    """The T-Patcher state of one adapter (every layer's tensors, neuron counts included); ``restore()``
    puts it back, shrinking or growing the patch to what it was."""

    def __init__(self, peft_model: Any, adapter_name: str = "default") -> None:
        self._layers = _patch_layers(peft_model, adapter_name)
        self.adapter_name = adapter_name
        self._saved = {role: layer.adapter_state(adapter_name) for role, layer in self._layers.items()}

    def num_neurons(self) -> int:
        """The neuron count at the snapshot."""
        state = self._saved["key"]
        return int(state["tpatcher_weight"][0].shape[0] + state["tpatcher_weight_frozen"][0].shape[0])

    def restore(self) -> None:
        """Put every layer's tensors back as they were at the snapshot (new tensor objects)."""
        for role, layer in self._layers.items():
            layer.load_adapter_state(self.adapter_name, self._saved[role])


@dataclass
class _Pending:
    """What :meth:`TPatcherMethod.extra_loss` needs during one edit (set by ``before_edit``)."""

    model: weakref.ref
    adapter: str
    key: Any  # the key layer
    queries: torch.Tensor  # (n_new, d): FFN inputs at the errors, one per new neuron
    memory: torch.Tensor  # (m, d): training-split memory + past edits' inputs
    edit_states: torch.Tensor  # (t, d): FFN inputs at every target position of this edit


@dataclass
class TPatcherMethod(Editor):
    """T-Patcher: one trainable patch neuron per wrong target token in the last FFN, trained on the
    target NLL plus T-Patcher's activation and memory losses; earlier edits' neurons stay frozen.

    The neuron. A patch neuron is one more hidden unit of the FFN (:class:`~.config.TPatcherConfig`): for
    a SwiGLU FFN the patched output is ``FFN(x) + V diag(a) (σ(K_g x + b) ⊙ K_u x)`` with the FFN's own
    σ (SiLU), for a plain FFN ``FFN(x) + V diag(a) σ(K x + b)``. Its *activation*, the router that the
    losses act on, is the gate pre-activation ``k·x + b`` (T-Patcher's ``fc1`` output before GELU). A
    neuron added for an error whose FFN input is ``q`` starts with ``k = q/‖q‖²`` and ``b = 0``
    (activation 1 at ``q``), its up row ``K_u = q/‖q‖²`` as well (``K_u q = 1``, so at its own error the
    neuron is exactly T-Patcher's), a zero value column (adding neurons changes no output) and scale
    ``a = scale_init``. The up rows stay fixed by default: trained, they let the optimiser put the
    neuron's magnitude into the ungated factor ``K_u x`` and close the gate (on the tiny world, sequential
    T = 100: M-Gen 0.740 but M-Loc 0.880 with ``train_up``, against 0.505 / 0.905 fixed).

    The loss. ``NLL + act_weight·L_act + mem_weight·L_mem`` (:func:`activation_loss`, :func:`memory_loss`)
    on the activations at each new neuron's error input and at the memory: the training split's FFN
    inputs (:meth:`build_memory`) and those of every target position of past edits (kept in the adapter,
    so rollback and saving include them). The NLL is the plain one of every editor, not T-Patcher's
    label-smoothed NLL (ε = 0.1): its optimum puts the target at probability ``1 - ε = 0.9``, an NLL of
    0.105, just above the shared early stop (NLL < 0.1), so every edit would run its whole budget.

    Errors are counted on the model as it is at the edit (earlier patches included); a request whose
    targets are all right already gets one neuron at its highest-NLL target token, so that the loop has
    something to train.

    Args:
        layer: decoder layer whose FFN is patched (negative from the end); T-Patcher patches the last.
        max_add_neuron_num: the most neurons one request adds (one per wrong target token).
        scale_init: initial output scale ``a`` of a new neuron (T-Patcher's ``amplify_con``).
        train_up: also train the up rows ``K_u`` of a SwiGLU FFN's neurons (default: fixed at ``q/‖q‖²``).
        act_weight: weight of the activation loss (T-Patcher's ``alc``).
        mem_weight: weight of the memory loss (T-Patcher's ``mlc``).
        act_margin: activation margin of the activation loss (``act_margin_val``).
        mem_margin: how much lower a neuron must fire on the memory than on its edit (``margin_val1``).
        mem_floor: the activation the memory is pushed below (``margin_val2``).
        act_topk: the activation loss averages its this many largest terms.
        mem_topk: each memory term averages its this many largest terms.
        memory: ``auto`` (the embedded world's vqa_train file when the model is a world's, else no
            training-split memory), ``off``, or the path of an MMEdit file whose prompts make the memory.
        memory_image_root: image folder of the memory file (default: ``images`` beside it).
        memory_size: the most training-split FFN inputs kept (T-Patcher: 40000; 10000 here for CPUs, which
            keeps the whole train split of the tiny world, 3283 states).
        memory_batch_size: prompts per forward pass when the memory is built.
        memory_seed: seeds which prompts and positions make the memory.
        cache_dir: folder of the memory cache (default ``~/.cache/odedit_hf/tpatcher``).
        steps: the most optimiser steps per edit.
        lr: Adam learning rate (T-Patcher: 0.01).
        stop_loss: stop an edit once the target NLL is below this (``none``: run every step).
        weight_decay: Adam weight decay on the new neurons (T-Patcher: 0.01).
        max_grad_norm: clip the gradient norm to this value (T-Patcher: 5; ``none``: no clipping).
    """

    layer: int = -1
    max_add_neuron_num: int = 5
    scale_init: float = 10.0
    train_up: bool = False
    act_weight: float = 1.0
    mem_weight: float = 5.0
    act_margin: float = 0.0
    mem_margin: float = 3.0
    mem_floor: float = -3.0
    act_topk: int = 5
    mem_topk: int = 1000
    memory: str = "auto"
    memory_image_root: str | None = None
    memory_size: int = 10000
    memory_batch_size: int = 16
    memory_seed: int = 0
    cache_dir: str | None = None
    steps: int = 50
    lr: float = 1e-2
    stop_loss: float | None = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float | None = 5.0

    name: ClassVar[str] = "tpatcher"
    supports_batch: ClassVar[bool] = True

    def __post_init__(self) -> None:
        for name in ("max_add_neuron_num", "act_topk", "mem_topk", "memory_size", "memory_batch_size"):
            value = getattr(self, name)
            lowest = 0 if name == "memory_size" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise ValueError(f"TPatcherMethod.{name} must be an int >= {lowest}, got {value!r}")
        for name in ("act_weight", "mem_weight", "act_margin", "mem_margin", "mem_floor", "scale_init"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"TPatcherMethod.{name} must be a finite number, got {value!r}")
            setattr(self, name, float(value))
        if self.act_weight < 0 or self.mem_weight < 0 or self.scale_init <= 0:
            raise ValueError("TPatcherMethod: act_weight and mem_weight must be >= 0 and scale_init > 0")
        if not isinstance(self.train_up, bool):
            raise ValueError(f"TPatcherMethod.train_up must be true or false, got {self.train_up!r}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise ValueError(f"TPatcherMethod.layer must be a decoder layer index, got {self.layer!r}")
        if not isinstance(self.memory, str) or not self.memory:
            raise ValueError(
                f"TPatcherMethod.memory must be 'auto', 'off' or a file path, got {self.memory!r}"
            )
        if self.memory not in ("auto", "off") and not os.path.isfile(self.memory):
            raise ValueError(
                f"TPatcherMethod.memory: {self.memory!r} is no file; give an MMEdit file (e.g. a world's "
                "data/evqa_train.json), 'auto' or 'off'"
            )
        self.loop  # noqa: B018 - validates the loop fields now, where the user set them
        self._pending: _Pending | None = None
        self._memories: dict[tuple[Any, ...], torch.Tensor] = {}
        self._hashes: dict[int, tuple[weakref.ref, str]] = {}
        self._warned_no_memory = False

    # ------------------------------------------------------------------ what the edit trains
    def peft_config(self, backbone: Backbone) -> TPatcherConfig:
        from .config import TPatcherConfig

        key, up, value = ffn_roles(backbone, self.layer)
        return TPatcherConfig(key_module=key, up_module=up, value_module=value, scale_init=self.scale_init)

    def edit_parameters(self, peft_model: PeftModel) -> list[torch.nn.Parameter]:
        """This edit's neurons (the current block of every patch layer), in ``model.parameters()`` order."""
        layers = _patch_layers(peft_model, peft_model.active_adapter)
        wanted = {
            id(p) for layer in layers.values() for p in layer.current_parameters(peft_model.active_adapter)
        }
        params = [p for p in peft_model.parameters() if id(p) in wanted and p.requires_grad and p.numel()]
        if not params:
            raise ValueError(
                "T-Patcher: no trainable neuron; edit_parameters is meant for the edit loop, after before_edit "
                "added this edit's neurons (and the adapter must not be in inference mode)"
            )
        return params

    def adapter_is_identity(self, peft_model: PeftModel) -> bool:
        """Whether no active T-Patcher adapter has a neuron yet (the patched FFN is then not widened at all)."""
        from .layer import TPatcherLayer

        return no_layer_changes(peft_model, TPatcherLayer, lambda layer, name: layer.num_neurons(name) > 0)

    def snapshot(self, peft_model: PeftModel, adapter_name: str, base: BaseWeights | None = None) -> Any:
        """A :class:`TPatcherSnapshot`: ``restore()`` gives back the neuron count and values of now."""
        return TPatcherSnapshot(peft_model, adapter_name)

    # ------------------------------------------------------------------ memory
    def _weight_hash(self, model: torch.nn.Module) -> str:
        from .memory import model_weight_hash

        entry = self._hashes.get(id(model))
        if entry is not None and entry[0]() is model:
            return entry[1]
        digest = model_weight_hash(model)
        self._hashes[id(model)] = (weakref.ref(model), digest)
        return digest

    def _memory_source(self, backbone: Backbone) -> tuple[str, str] | None:
        from .memory import find_world_train_file

        if self.memory == "off":
            return None
        if self.memory == "auto":
            return find_world_train_file(backbone.base_model)
        root = self.memory_image_root or os.path.join(os.path.dirname(os.path.abspath(self.memory)), "images")
        if not os.path.isdir(root):
            raise ValueError(
                f"TPatcherMethod: the memory file's image folder {root!r} does not exist; set memory_image_root"
            )
        return self.memory, root

    def build_memory(self, backbone: Backbone) -> torch.Tensor:
        """The training-split memory of this model (``(m, d)`` float32 on the CPU; empty without a source).

        Computed on the first edit (or by calling this), then taken from the in-process memo or the disk
        cache (``cache_dir``), keyed by the model's weight hash, the source file and the sampling settings.
        """
        key_name, _, _ = ffn_roles(backbone, self.layer)
        module = backbone.base_model.get_submodule(key_name)
        module = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        source = self._memory_source(backbone)
        if source is None or self.memory_size == 0:
            if not self._warned_no_memory and self.memory != "off":
                logger.warning(
                    "T-Patcher: no training-split memory (the model does not come from an embedded world); the "
                    "memory loss covers past edits only. Pass memory=<MMEdit train file> to add one."
                )
                self._warned_no_memory = True
            return torch.zeros(0, module.in_features)
        digest = self._weight_hash(backbone.base_model)
        memo_key = (digest, *source, key_name, self.memory_size, self.memory_seed)
        memory = self._memories.get(memo_key)
        if memory is None:
            from .memory import load_or_build_memory

            model = backbone.model
            was_training = model.training
            model.eval()
            try:
                memory = load_or_build_memory(
                    backbone,
                    key_name,
                    module,
                    source[0],
                    source[1],
                    size=self.memory_size,
                    batch_size=self.memory_batch_size,
                    seed=self.memory_seed,
                    cache_dir=self.cache_dir,
                    weight_hash=digest,
                )
            finally:
                model.train(was_training)
            self._memories[memo_key] = memory
        return memory

    # ------------------------------------------------------------------ hooks
    @torch.no_grad()
    def before_edit(self, peft_model: PeftModel, backbone: Backbone, requests: Sequence[EditRequest]) -> None:
        """Count the wrong target tokens, add one neuron per error (capped per request) with its key at
        the error's FFN input ``q`` (``q/‖q‖²``: activation 1 there), and cache what the losses need."""
        from odedit_hf.backbones import IGNORE_INDEX
        from odedit_hf.editing import edit_samples, model_device, model_inputs

        from .memory import capture_inputs

        adapter = peft_model.active_adapter
        layers = _patch_layers(peft_model, adapter)
        key = layers["key"]
        train_memory = self.build_memory(backbone)
        device = model_device(peft_model)
        batch = backbone.build_batch(edit_samples(requests), device=device)
        with capture_inputs(key.get_base_layer()) as seen:
            logits = peft_model(**model_inputs(batch)).logits
        if len(seen) != 1:
            raise ValueError(f"T-Patcher: the patched FFN ran {len(seen)} times in one forward, expected 1")
        labels = batch["labels"]
        x = seen[0].reshape(labels.shape[0], labels.shape[1], -1).float()
        # logits at position p predict the token at p + 1
        targets = labels[:, 1:]
        scores = logits[:, :-1].float()
        is_target = targets != IGNORE_INDEX
        wrong = is_target & (scores.argmax(-1) != targets)
        nll = torch.nn.functional.cross_entropy(
            scores.transpose(1, 2), targets.clamp_min(0), reduction="none"
        ).masked_fill(~is_target, -math.inf)
        picked: list[tuple[int, int]] = []
        for b in range(labels.shape[0]):
            positions = wrong[b].nonzero().flatten().tolist()[: self.max_add_neuron_num]
            if not positions:  # nothing wrong: one neuron at the weakest target token, so the edit can train
                positions = [int(nll[b].argmax())]
            picked.extend((b, p) for p in positions)
        queries = torch.stack([x[b, p] for b, p in picked])
        n_new = queries.shape[0]
        keys = queries / queries.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)
        value = layers["value"]
        init_zero = value.tpatcher_init_weights.get(adapter, True)
        if init_zero:
            columns = torch.zeros(value.out_features, n_new, device=device)
        else:
            columns = torch.randn(value.out_features, n_new, device=device) * 0.1
        key.grow(adapter, keys, bias=torch.zeros(n_new, device=device))
        if "up" in layers:
            layers["up"].grow(adapter, keys, trainable=self.train_up)
        value.grow(
            adapter, columns, scale=torch.full((n_new,), value.tpatcher_scale_init[adapter], device=device)
        )
        past = key.tpatcher_memory[adapter]
        memory = torch.cat([train_memory.to(past.device), past], dim=0) if train_memory.numel() else past
        self._pending = _Pending(
            model=weakref.ref(peft_model),
            adapter=adapter,
            key=key,
            queries=queries,
            memory=memory,
            edit_states=x[:, :-1][is_target],
        )
        logger.debug(
            "T-Patcher: %d wrong target token(s) of %d, %d neuron(s) added (now %d); memory %d states",
            int(wrong.sum()),
            int(is_target.sum()),
            n_new,
            key.num_neurons(adapter),
            memory.shape[0],
        )

    def _current(self, peft_model: PeftModel) -> _Pending | None:
        pending = self._pending
        if pending is None or pending.model() is not peft_model:
            return None
        return pending

    def edit_activations(self, peft_model: PeftModel) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a_edit, a_mem)`` of this edit's neurons: pre-activations ``k·x + b`` at each neuron's own error
        input ``(n,)`` and at every memory input ``(m, n)`` (differentiable in the neurons)."""
        pending = self._current(peft_model)
        if pending is None:
            raise ValueError("T-Patcher: no edit in progress (call before_edit first)")
        weight = pending.key.tpatcher_weight[pending.adapter]
        bias = pending.key.tpatcher_bias[pending.adapter]
        a_edit = (pending.queries * weight).sum(-1) + bias
        a_mem = torch.nn.functional.linear(pending.memory, weight, bias)
        return a_edit, a_mem

    def extra_loss(self, peft_model: PeftModel) -> dict[str, torch.Tensor]:
        """``act_weight·L_act + mem_weight·L_mem`` of this edit's neurons, from the inputs cached in
        :meth:`before_edit` (the layers below the patch do not change during an edit)."""
        if self._current(peft_model) is None:
            return {}
        a_edit, a_mem = self.edit_activations(peft_model)
        out = {
            "tpatcher_act": self.act_weight
            * activation_loss(a_edit, margin=self.act_margin, topk=self.act_topk)
        }
        if a_mem.numel():
            out["tpatcher_mem"] = self.mem_weight * memory_loss(
                a_mem, a_edit, margin=self.mem_margin, floor=self.mem_floor, topk=self.mem_topk
            )
        return out

    def after_edit(
        self, peft_model: PeftModel, backbone: Backbone, requests: Sequence[EditRequest], stats: EditStats
    ) -> None:
        """Add this edit's FFN inputs (every target position) to the memory of past edits."""
        pending = self._current(peft_model)
        self._pending = None
        if pending is not None:
            pending.key.append_memory(pending.adapter, pending.edit_states)

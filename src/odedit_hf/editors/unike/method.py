"""UniKE as an :class:`~odedit_hf.editing.Editor` (``get_method("unike")``).

Pan et al., "Towards Unified Multimodal Editing with Enhanced Knowledge Collaboration" (NeurIPS 2024).
Both kinds of knowledge are key-value memories at the same layer: intrinsic knowledge as T-Patcher patch
neurons in the FFN (keys = new rows of the input projection(s), values = new columns of the output
projection), extrinsic knowledge as latent in-context key-value pairs mixed into the self-attention
output. The two cooperate through disentangled representations: retrieval of the extrinsic memory runs in
a contrastively trained *semantic* space, and the *truthfulness* direction of the edit's in-context
knowledge steers the keys of its patch neurons. See ``docs/editors/unike.md``.
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

from odedit_hf.editing.editor import Editor

if TYPE_CHECKING:
    from peft import PeftModel

    from odedit_hf.backbones import Backbone
    from odedit_hf.data import EditRequest
    from odedit_hf.editing import BaseWeights, EditStats

    from .config import UniKEConfig
    from .layer import MemoryLinear, PatchLinear

logger = logging.getLogger(__name__)

__all__ = ["UniKEMethod", "UniKESnapshot", "VARIANTS", "attention_output_name"]

#: The variant defaults of the fields left ``None``: ``paper`` (the method of the paper, the default) and
#: ``code`` (the released code's effective settings; see the class docstring).
VARIANTS: dict[str, dict[str, Any]] = {
    "paper": {
        "intrinsic": True,
        "extrinsic": True,
        "disentangle": True,
        "beta": 0.1,
        "layers": [-1],
        "neurons": 0,
        "act_weight": 1.0,
        "mem_weight": 5.0,
        "steps": 50,
        "lr": 1e-2,
        "weight_decay": 0.01,
        "max_grad_norm": 5.0,
    },
    "code": {
        "intrinsic": True,
        "extrinsic": False,
        "disentangle": True,
        "beta": 0.1,
        "layers": [-2, -1],
        "neurons": 20,
        "act_weight": 0.0,
        "mem_weight": 0.0,
        "steps": 1,
        "lr": 7e-4,
        "weight_decay": 0.0,
        "max_grad_norm": 1.1,
    },
}

#: Self-attention output projections of the supported families, relative to a decoder layer.
_ATTENTION_OUTPUTS = ("self_attn.o_proj", "self_attn.out_proj", "self_attn.dense", "attention.dense")


def attention_output_name(backbone: Backbone, layer: int) -> str:
    """Full name of decoder layer ``layer``'s self-attention output projection (``o_proj`` and kin)."""
    from torch import nn

    index = backbone._normalize_layers([layer])[0]
    prefix = f"{backbone.spec.layers}.{index}"
    block = backbone.base_model.get_submodule(prefix)
    for name in _ATTENTION_OUTPUTS:
        try:
            module = block.get_submodule(name)
        except AttributeError:
            continue
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if isinstance(base, nn.Linear):
            return f"{prefix}.{name}"
    raise ValueError(
        f"UniKE: decoder layer {index} of {backbone.spec.model_type!r} has none of {_ATTENTION_OUTPUTS} as an "
        "nn.Linear; UniKE's extrinsic memory needs the self-attention output projection (set extrinsic=false)"
    )


def _layers(peft_model: Any, adapter: str) -> tuple[dict[int, dict[str, PatchLinear]], MemoryLinear]:
    """The patch layers of ``adapter`` grouped by decoder layer (role -> layer) and its memory layer."""
    import re

    from .layer import MemoryLinear, PatchLinear

    groups: dict[int, dict[str, PatchLinear]] = {}
    memory = None
    for name, module in peft_model.named_modules():
        if isinstance(module, PatchLinear) and adapter in module.unike_weight:
            match = re.search(r"\.(\d+)\.[^.]*\.?[^.]*$", name)
            index = int(match.group(1)) if match else -1
            groups.setdefault(index, {})[module.role] = module
        elif isinstance(module, MemoryLinear) and adapter in module.unike_kv_key:
            memory = module
    if memory is None or not groups or any("key" not in g or "value" not in g for g in groups.values()):
        raise ValueError(
            f"the model has no UniKE adapter {adapter!r}; wrap it with "
            "get_peft_model(model, get_method('unike').peft_config(backbone))"
        )
    return dict(sorted(groups.items())), memory


class UniKESnapshot:
    """Every UniKE layer's tensors of one adapter (sizes included); ``restore()`` puts them back."""

    def __init__(self, peft_model: Any, adapter_name: str = "default") -> None:
        groups, memory = _layers(peft_model, adapter_name)
        self.adapter_name = adapter_name
        self._layers = [memory] + [layer for g in groups.values() for layer in g.values()]
        self._saved = [layer.adapter_state(adapter_name) for layer in self._layers]

    def restore(self) -> None:
        for layer, state in zip(self._layers, self._saved):
            layer.load_adapter_state(self.adapter_name, state)


@dataclass
class _Pending:
    model: weakref.ref
    adapter: str
    keys: list[Any]  # the key layer of every patched FFN
    queries: list[torch.Tensor]  # per patched FFN: (n_new, d) inputs at the errors
    memories: list[torch.Tensor]  # per patched FFN: (m, d) train-split + past-edit inputs
    edit_states: list[torch.Tensor]  # per patched FFN: (t, d) inputs at every target position


@dataclass
class UniKEMethod(Editor):
    """UniKE: T-Patcher neurons (intrinsic) + a latent in-context key-value memory (extrinsic) at the same
    decoder layer, cooperating through a semantic and a truthfulness space.

    Intrinsic half: before every edit, one patch neuron per wrong target token (at most
    ``max_add_neuron_num`` per request; ``neurons`` > 0: that many per patched FFN instead, as the
    released code's 20) is added to the FFN of every layer in ``layers``; its key starts at the error's FFN
    input ``q`` as ``q/‖q‖²`` plus, with ``disentangle``, ``β·ζ̂/‖q‖`` where ``ζ̂`` is the edit's
    truthfulness direction (below). The loss adds T-Patcher's activation and memory losses
    (``act_weight``, ``mem_weight``; the memory is the train split's FFN inputs plus past edits').

    Extrinsic half: the edit sample is run through the model; its self-attention outputs (inputs of
    ``o_proj``) at the positions that predict a target token become one memory entry of latent
    key-value pairs (at most ``kv_tokens``; values start equal to the keys and are trained when
    ``train_kv``), joined by the latent pairs of the ``demos`` train-split records nearest to the edit
    in the semantic space (fixed). At every position of every later forward the entry with the most
    similar anchor is retrieved and mixed in with weight ``α`` (see :mod:`.layer`).

    Disentanglement: a semantic head over the memory layer's inputs and a truthfulness head over the
    patched FFN's inputs, each a linear projection trained once per model with a supervised
    contrastive loss on the world's train split (``encoder_records`` records; without a train split, on
    the edited requests' own samples, with a warning). Off: retrieval in the raw hidden space, no key
    steering.

    Variants: ``variant="paper"`` (default) fills every field left ``None`` with the paper's method
    (both halves on, T-Patcher's losses, Adam lr 1e-2, up to 50 steps); ``variant="code"`` with what
    the released code runs (extrinsic off, 20 neurons in each of the last two FFNs, β = 0.1, NLL only,
    one step at lr 7e-4, clip 1.1; Adam here where the code uses SGD). Explicit fields win.

    Args:
        variant: ``paper`` or ``code``: where the fields left ``none`` take their values.
        intrinsic: add patch neurons (the intrinsic half).
        extrinsic: add the latent key-value memory entry (the extrinsic half).
        disentangle: train and use the semantic and truthfulness heads.
        beta: weight of the truthfulness direction in a new neuron's key.
        layers: decoder layers whose FFN is patched (negative from the end).
        memory_layer: decoder layer whose self-attention output carries the key-value memory.
        neurons: neurons added per patched FFN per edit; ``0``: one per wrong target token (T-Patcher).
        max_add_neuron_num: the most neurons one request adds under ``neurons=0``.
        scale_init: initial output scale ``a`` of a new neuron.
        train_up: also train the up rows of a SwiGLU FFN's neurons.
        act_weight: weight of T-Patcher's activation loss.
        mem_weight: weight of T-Patcher's memory loss.
        memory: T-Patcher's memory source (``auto``: the world's train split; ``off``; an MMEdit file).
        memory_size: the most train-split FFN inputs in T-Patcher's memory.
        kv_tokens: the most latent key-value pairs an edit contributes.
        train_kv: train the edit's latent values with the neurons.
        kv_step: how fast the latent values move relative to their own size: stored in units of
            ``kv_step·‖k‖/√d``, one Adam step changes a value coordinate by about ``kv_step·lr`` of a typical one.
        demos: train-split demonstrations whose latent pairs join an edit's entry (top by semantic similarity).
        sim_threshold: retrieval gate θ on the cosine similarity.
        alpha_max: the mixing weight at similarity 1.
        sem_dim: width of the semantic space.
        tru_dim: width of the truthfulness space.
        encoder_source: ``auto`` (the world's train split), ``edits`` (the edited requests' own samples)
            or an MMEdit file.
        encoder_records: train-split records the heads are trained on.
        encoder_steps: optimiser steps of each head.
        encoder_lr: Adam learning rate of the heads.
        temperature: temperature of the contrastive loss.
        encoder_seed: seeds the heads' initialisation and batches.
        steps: the most optimiser steps per edit (``none``: the variant's).
        lr: Adam learning rate of the edit (``none``: the variant's).
        stop_loss: stop an edit once the target NLL is below this (``none``: run every step).
        weight_decay: Adam weight decay (``none``: the variant's, paper 0.01, code 0).
        max_grad_norm: clip the gradient norm to this value (``none``: the variant's, paper 5, code 1.1).
    """

    variant: str = "paper"
    intrinsic: bool | None = None
    extrinsic: bool | None = None
    disentangle: bool | None = None
    beta: float | None = None
    layers: list[int] | None = None
    memory_layer: int = -1
    neurons: int | None = None
    max_add_neuron_num: int = 5
    scale_init: float = 10.0
    train_up: bool = False
    act_weight: float | None = None
    mem_weight: float | None = None
    memory: str = "auto"
    memory_size: int = 10000
    kv_tokens: int = 8
    train_kv: bool = True
    kv_step: float = 20.0
    demos: int = 2
    sim_threshold: float = 0.5
    alpha_max: float = 1.0
    sem_dim: int = 16
    tru_dim: int = 16
    encoder_source: str = "auto"
    encoder_records: int = 256
    encoder_steps: int = 200
    encoder_lr: float = 1e-2
    temperature: float = 0.1
    encoder_seed: int = 0
    steps: int | None = None
    lr: float | None = None
    stop_loss: float | None = 0.1
    weight_decay: float | None = None
    max_grad_norm: float | None = None

    name: ClassVar[str] = "unike"
    supports_batch: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"UniKEMethod.variant must be one of {sorted(VARIANTS)}, got {self.variant!r}")
        for key, value in VARIANTS[self.variant].items():
            if getattr(self, key) is None:
                setattr(self, key, list(value) if isinstance(value, list) else value)
        for name in ("intrinsic", "extrinsic", "disentangle", "train_up", "train_kv"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"UniKEMethod.{name} must be true or false, got {getattr(self, name)!r}")
        if not (self.intrinsic or self.extrinsic):
            raise ValueError("UniKEMethod: intrinsic and extrinsic are both off; nothing would be edited")
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        if not self.layers or any(isinstance(v, bool) or not isinstance(v, int) for v in self.layers):
            raise ValueError(f"UniKEMethod.layers must be decoder layer indices, got {self.layers!r}")
        self.layers = list(self.layers)
        ints = {
            "neurons": 0,
            "max_add_neuron_num": 1,
            "memory_size": 0,
            "kv_tokens": 1,
            "demos": 0,
            "sem_dim": 1,
            "tru_dim": 1,
            "encoder_records": 1,
            "encoder_steps": 0,
            "encoder_seed": 0,
        }
        for name, lowest in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise ValueError(f"UniKEMethod.{name} must be an int >= {lowest}, got {value!r}")
        if isinstance(self.memory_layer, bool) or not isinstance(self.memory_layer, int):
            raise ValueError(
                f"UniKEMethod.memory_layer must be a decoder layer index, got {self.memory_layer!r}"
            )
        for name in (
            "beta",
            "scale_init",
            "act_weight",
            "mem_weight",
            "encoder_lr",
            "temperature",
            "kv_step",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"UniKEMethod.{name} must be a finite number, got {value!r}")
            setattr(self, name, float(value))
        if (
            min(self.beta, self.act_weight, self.mem_weight) < 0
            or self.temperature <= 0
            or self.scale_init <= 0
        ):
            raise ValueError(
                "UniKEMethod: beta, act_weight, mem_weight must be >= 0; temperature, scale_init > 0"
            )
        if not isinstance(self.memory, str) or not (
            self.memory in ("auto", "off") or os.path.isfile(self.memory)
        ):
            raise ValueError(
                f"UniKEMethod.memory must be 'auto', 'off' or an MMEdit file, got {self.memory!r}"
            )
        if not isinstance(self.encoder_source, str) or not self.encoder_source:
            raise ValueError(
                f"UniKEMethod.encoder_source must be auto, edits or a file, got {self.encoder_source!r}"
            )
        self._config_check()
        self.loop  # noqa: B018 - validates the loop fields now, where the user set them
        self._pending: _Pending | None = None
        self._heads: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self._pools: dict[tuple[Any, ...], tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self._train_memories: dict[tuple[Any, ...], torch.Tensor] = {}
        self._hashes: dict[int, tuple[weakref.ref, str]] = {}
        self._memo: tuple[Any, ...] | None = None

    def _config_check(self) -> None:
        from .config import UniKEConfig

        UniKEConfig(
            patch_modules={"a": "key"},
            memory_module="b",
            sem_dim=self.sem_dim,
            tru_dim=self.tru_dim,
            scale_init=self.scale_init,
            sim_threshold=self.sim_threshold,
            alpha_max=self.alpha_max,
        )

    # ------------------------------------------------------------------ the adapter
    def peft_config(self, backbone: Backbone) -> UniKEConfig:
        from odedit_hf.editors.tpatcher.method import ffn_roles

        from .config import UniKEConfig

        patch: dict[str, str] = {}
        ffn_dim = 0
        for layer in self.layers:
            key, up, value = ffn_roles(backbone, layer)
            patch.update({key: "key", value: "value", **({up: "up"} if up else {})})
            module = backbone.base_model.get_submodule(key)
            ffn_dim = getattr(module, "in_features", 0)
        return UniKEConfig(
            patch_modules=patch,
            memory_module=attention_output_name(backbone, self.memory_layer),
            sem_dim=self.sem_dim,
            tru_dim=self.tru_dim,
            ffn_dim=ffn_dim,
            scale_init=self.scale_init,
            sim_threshold=self.sim_threshold,
            alpha_max=self.alpha_max,
            semantic_retrieval=self.disentangle,
        )

    def edit_parameters(self, peft_model: PeftModel) -> list[torch.nn.Parameter]:
        """This edit's neurons (current blocks; up rows only with ``train_up``) and, with ``train_kv``,
        its latent values, in ``model.parameters()`` order."""
        adapter = peft_model.active_adapter
        groups, memory = _layers(peft_model, adapter)
        wanted: set[int] = set()
        for group in groups.values():
            for role, layer in group.items():
                if role != "up" or self.train_up:
                    wanted.update(id(p) for p in layer.current_parameters(adapter))
        if self.train_kv:
            wanted.add(id(memory.unike_kv_value[adapter]))
        params = [p for p in peft_model.parameters() if id(p) in wanted and p.requires_grad and p.numel()]
        if not params:
            raise ValueError(
                "UniKE: nothing to train; edit_parameters is meant for the edit loop, after before_edit added "
                "this edit's neurons / memory entry (and the adapter must not be in inference mode)"
            )
        return params

    def adapter_is_identity(self, peft_model: PeftModel) -> bool:
        """Whether the active adapter has no neuron and no memory entry (then it changes no output)."""
        try:
            groups, memory = _layers(peft_model, peft_model.active_adapter)
        except ValueError:
            return False
        adapter = peft_model.active_adapter
        layers = [memory] + [layer for g in groups.values() for layer in g.values()]
        if any(layer.merged for layer in layers):
            return False
        return memory.num_tokens(adapter) == 0 and all(
            g["key"].num_neurons(adapter) == 0 for g in groups.values()
        )

    def snapshot(self, peft_model: PeftModel, adapter_name: str, base: BaseWeights | None = None) -> Any:
        """A :class:`UniKESnapshot` (neuron counts, memory entries and heads of now)."""
        return UniKESnapshot(peft_model, adapter_name)

    # ------------------------------------------------------------------ the heads
    def _source(self, backbone: Backbone) -> tuple[str, str] | None:
        from odedit_hf.editors.tpatcher.memory import find_world_train_file

        if self.encoder_source == "edits":
            return None
        if self.encoder_source == "auto":
            return find_world_train_file(backbone.base_model)
        if not os.path.isfile(self.encoder_source):
            raise ValueError(
                f"UniKEMethod.encoder_source: {self.encoder_source!r} is no file; give an MMEdit train file, "
                "'auto' or 'edits'"
            )
        return self.encoder_source, os.path.join(
            os.path.dirname(os.path.abspath(self.encoder_source)), "images"
        )

    @staticmethod
    def _record_samples(record: Any) -> list[Any]:
        """The six samples of one record: reliability, the two generality and two locality samples, and
        ``src -> pred`` (the untruthful answer) last (``None`` when ``pred`` is missing or equals ``alt``)."""
        from odedit_hf.backbones import PromptSample
        from odedit_hf.editing.samples import EVAL_SAMPLE_NAMES, eval_samples

        samples = eval_samples(record)
        out = [samples.get(name) for name in EVAL_SAMPLE_NAMES]
        pred = getattr(record, "pred", None)
        if pred and pred != record.alt:
            rel = samples["reliability"]
            out.append(PromptSample(prompt=rel.prompt, target=pred, image=rel.image, task=rel.task))
        else:
            out.append(None)
        return out

    def _collect(self, backbone: Backbone, peft_model: Any, records: Sequence[Any]) -> list[list[Any]]:
        """Per record, the :class:`~.encoder.RecordStates` of its six samples (``None`` where absent), on the
        base model (adapter disabled)."""
        from .encoder import collect_states

        groups, memory = _layers(peft_model, peft_model.active_adapter)
        keys = [g["key"] for g in groups.values()]
        per = [self._record_samples(r) for r in records]
        flat = [s for samples in per for s in samples if s is not None]
        was_training = peft_model.training
        peft_model.eval()
        try:
            with peft_model.disable_adapter():
                states = collect_states(backbone, peft_model, memory, keys, flat)
        finally:
            peft_model.train(was_training)
        it = iter(states)
        return [[None if s is None else next(it) for s in samples] for samples in per]

    def _train_heads(
        self, backbone: Backbone, peft_model: Any, requests: Sequence[EditRequest]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The semantic and truthfulness heads for this model (trained now, or from the in-process memo)."""
        from odedit_hf.data import load_mmedit

        from .encoder import semantic_set, train_head, truth_set

        source = self._source(backbone)
        digest = self._digest(backbone.base_model)
        settings = (self.sem_dim, self.tru_dim, self.encoder_records, self.encoder_steps, self.encoder_lr)
        memo = (digest, source, *settings, self.temperature, self.encoder_seed)
        self._memo = memo
        if source is not None and memo in self._heads:
            return self._heads[memo]
        if source is None:
            logger.warning(
                "UniKE: no train split to train the semantic/truthfulness heads on; training them on the %d "
                "edited request(s)' own samples (their rephrase and locality prompts). Pass "
                "encoder_source=<MMEdit train file> for a leak-free encoder.",
                len(requests),
            )
            records = list(requests)
        else:
            records = list(load_mmedit(source[0], source[1], limit=self.encoder_records))
        states = self._collect(backbone, peft_model, records)
        # semantic: reliability + both generality samples are one group; the locality samples negatives
        groups = [
            ([s for s in rec[:3] if s is not None], [s for s in rec[3:5] if s is not None]) for rec in states
        ]
        sem_x, sem_y = semantic_set(groups)
        sem, before, after = train_head(
            sem_x,
            sem_y,
            self.sem_dim,
            steps=self.encoder_steps,
            lr=self.encoder_lr,
            temperature=self.temperature,
            batch=1024,
            seed=self.encoder_seed,
        )
        logger.info(
            "UniKE semantic head: contrastive loss %.3f -> %.3f on %d states", before, after, len(sem_y)
        )
        truth = truth_set([(rec[0], rec[5]) for rec in states])
        if truth is None:
            ffn_dim = states[0][0].ffn[-1].shape[-1]
            tru = torch.zeros(self.tru_dim, ffn_dim)
            logger.warning(
                "UniKE: no record has a pred answer; the truthfulness head stays zero (no steering)"
            )
        else:
            tru, before, after = train_head(
                truth[0],
                truth[1],
                self.tru_dim,
                steps=self.encoder_steps,
                lr=self.encoder_lr,
                temperature=self.temperature,
                batch=1024,
                seed=self.encoder_seed + 1,
            )
            logger.info(
                "UniKE truthfulness head: contrastive loss %.3f -> %.3f on %d states",
                before,
                after,
                len(truth[1]),
            )
        if source is not None:
            self._heads[memo] = (sem, tru)
            self._pools[memo] = (
                torch.stack([rec[0].mem.mean(0) for rec in states]),
                [rec[0].mem[-self.kv_tokens :] for rec in states],
            )
        return sem, tru

    # ------------------------------------------------------------------ hooks
    @torch.no_grad()
    def before_edit(self, peft_model: PeftModel, backbone: Backbone, requests: Sequence[EditRequest]) -> None:
        """Train the heads once, then add this edit's patch neurons and its latent key-value entry."""
        import contextlib

        from odedit_hf.backbones import IGNORE_INDEX
        from odedit_hf.editing import edit_samples, model_device, model_inputs
        from odedit_hf.editors.tpatcher.memory import capture_inputs

        adapter = peft_model.active_adapter
        groups, memory = _layers(peft_model, adapter)
        keys = [g["key"] for g in groups.values()]
        device = model_device(peft_model)
        sem_pool = None
        if self.disentangle:
            if not memory.encoder_ready(adapter):
                sem, tru = self._train_heads(backbone, peft_model, requests)
                memory.set_encoders(adapter, sem, tru)
            sem_pool = self._pools.get(self._memo)
        # the edit's states on the model as it is (earlier edits included)
        samples = edit_samples(requests)
        batch = backbone.build_batch(samples, device=device)
        with contextlib.ExitStack() as stack:
            mem_seen = stack.enter_context(capture_inputs(memory))
            seen = [stack.enter_context(capture_inputs(k)) for k in keys]
            logits = peft_model(**model_inputs(batch)).logits
        if len(mem_seen) != 1 or any(len(s) != 1 for s in seen):
            raise ValueError("UniKE: a memory or patched layer did not run exactly once in one forward")
        labels = batch["labels"]
        b, t = labels.shape
        targets = labels[:, 1:]
        scores = logits[:, :-1].float()
        is_target = targets != IGNORE_INDEX
        ffn_states = [s[0].reshape(b, t, -1).float() for s in seen]
        mem_states = mem_seen[0].reshape(b, t, -1).float()

        pending_queries, pending_memories, pending_states = [], [], []
        if self.intrinsic:
            wrong = is_target & (scores.argmax(-1) != targets)
            nll = torch.nn.functional.cross_entropy(
                scores.transpose(1, 2), targets.clamp_min(0), reduction="none"
            ).masked_fill(~is_target, -math.inf)
            picked: list[tuple[int, int]] = []
            for i in range(b):
                positions = wrong[i].nonzero().flatten().tolist()[: self.max_add_neuron_num]
                if not positions:
                    positions = [int(nll[i].argmax())]
                picked.extend((i, p) for p in positions)
            if self.neurons > 0:  # the released code: a fixed count, keys cycling over the error positions
                picked = [picked[j % len(picked)] for j in range(self.neurons)]
            directions = (
                self._truth_directions(backbone, peft_model, requests, memory, keys)
                if self.disentangle
                else None
            )
            for g_index, (group, x) in enumerate(zip(groups.values(), ffn_states)):
                q = torch.stack([x[i, p] for i, p in picked])
                norm2 = q.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)
                k = q / norm2
                if directions is not None and self.beta > 0:
                    k = k + self.beta * directions[g_index].to(k) / norm2.sqrt()
                n_new = k.shape[0]
                value = group["value"]
                init_zero = value.tpatcher_init_weights.get(adapter, True)
                columns = torch.zeros(value.out_features, n_new, device=device)
                if not init_zero:
                    columns = torch.randn(value.out_features, n_new, device=device) * 0.1
                group["key"].grow(adapter, k, bias=torch.zeros(n_new, device=device))
                if "up" in group:
                    group["up"].grow(adapter, q / norm2, trainable=self.train_up)
                value.grow(
                    adapter,
                    columns,
                    scale=torch.full((n_new,), value.tpatcher_scale_init[adapter], device=device),
                )
                past = group["key"].tpatcher_memory[adapter]
                train_memory = self._train_memory(backbone, peft_model, list(groups)[g_index])
                mem = torch.cat([train_memory.to(past.device), past]) if train_memory.numel() else past
                pending_queries.append(q)
                pending_memories.append(mem)
                pending_states.append(x[:, :-1][is_target])
        if self.extrinsic:
            entries = []
            for i in range(b):
                own = mem_states[i, :-1][is_target[i]][-self.kv_tokens :]
                fixed = None
                if self.demos > 0 and sem_pool is not None:
                    fixed = self._nearest_demos(memory, adapter, own, sem_pool)
                entries.append((own, own.clone(), fixed))
            memory.add_entries(adapter, entries, trainable=self.train_kv, value_step=self.kv_step)
        self._pending = (
            _Pending(
                weakref.ref(peft_model), adapter, keys, pending_queries, pending_memories, pending_states
            )
            if self.intrinsic
            else None
        )
        logger.debug(
            "UniKE: %d neuron(s) per patched FFN now %s; memory %d entries / %d pairs",
            pending_queries[0].shape[0] if pending_queries else 0,
            [k.num_neurons(adapter) for k in keys],
            memory.num_entries(adapter),
            memory.num_tokens(adapter),
        )

    def _nearest_demos(
        self, memory: Any, adapter: str, own: torch.Tensor, pool: tuple[torch.Tensor, list[torch.Tensor]]
    ) -> torch.Tensor | None:
        anchors, tokens = pool
        weight = memory.unike_sem_weight[adapter].cpu()
        query = torch.nn.functional.normalize(own.mean(0).cpu() @ weight.T, dim=-1)
        sims = torch.nn.functional.normalize(anchors @ weight.T, dim=-1) @ query
        top = sims.topk(min(self.demos, sims.numel())).indices.tolist()
        picked = [tokens[j] for j in top if sims[j] < 0.999]  # never the edit's own record
        return torch.cat(picked).to(own) if picked else None

    def _truth_directions(
        self,
        backbone: Backbone,
        peft_model: Any,
        requests: Sequence[EditRequest],
        memory: Any,
        keys: list[Any],
    ) -> list[torch.Tensor] | None:
        """Per patched FFN, ``Tᵀζ`` normalised: the edit's truthfulness direction (``ζ`` = mean head output at
        the answer tokens of ``src -> alt`` minus that of ``src -> pred``); ``None`` without a ``pred``."""
        from odedit_hf.backbones import PromptSample
        from odedit_hf.editing import edit_samples

        from .encoder import collect_states

        pos_samples = edit_samples(requests)
        pairs = [
            (s, PromptSample(prompt=s.prompt, target=r.pred, image=s.image, task=s.task))
            for s, r in zip(pos_samples, requests)
            if getattr(r, "pred", None) and r.pred != r.alt
        ]
        if not pairs:
            return None
        adapter = peft_model.active_adapter
        head = memory.unike_tru_weight[adapter].cpu()
        if not head.any():
            return None
        states = collect_states(backbone, peft_model, memory, keys, [s for pair in pairs for s in pair])
        out = []
        for g in range(len(keys)):
            pos = torch.cat([states[2 * j].ffn[g] for j in range(len(pairs))])
            neg = torch.cat([states[2 * j + 1].ffn[g] for j in range(len(pairs))])
            zeta = pos.mean(0) @ head.T - neg.mean(0) @ head.T
            out.append(torch.nn.functional.normalize(zeta @ head, dim=-1))
        return out

    def _train_memory(self, backbone: Backbone, peft_model: Any, layer_index: int) -> torch.Tensor:
        """T-Patcher's train-split memory of ``layer_index``'s FFN inputs (base model; T-Patcher's disk cache,
        keyed by the base weights without UniKE's adapter tensors)."""
        from odedit_hf.editors.tpatcher.memory import find_world_train_file, load_or_build_memory
        from odedit_hf.editors.tpatcher.method import ffn_roles

        if self.mem_weight == 0 or self.memory == "off" or self.memory_size == 0:
            return torch.zeros(0)
        if self.memory == "auto":
            source = find_world_train_file(backbone.base_model)
        else:
            source = (self.memory, os.path.join(os.path.dirname(os.path.abspath(self.memory)), "images"))
        if source is None:
            return torch.zeros(0)
        key_name, _, _ = ffn_roles(backbone, layer_index)
        digest = self._digest(backbone.base_model)
        memo = (digest, *source, key_name, self.memory_size)
        memory = self._train_memories.get(memo)
        if memory is None:
            module = backbone.base_model.get_submodule(key_name)
            module = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            was_training = peft_model.training
            peft_model.eval()
            try:
                with peft_model.disable_adapter():
                    memory = load_or_build_memory(
                        backbone,
                        key_name,
                        module,
                        source[0],
                        source[1],
                        size=self.memory_size,
                        batch_size=16,
                        seed=0,
                        cache_dir=None,
                        weight_hash=digest,
                    )
            finally:
                peft_model.train(was_training)
            self._train_memories[memo] = memory
        return memory

    def _digest(self, model: torch.nn.Module) -> str:
        """The base weights' hash (UniKE's adapter tensors left out), once per model object."""
        from odedit_hf.editors.tpatcher.memory import model_weight_hash

        entry = self._hashes.get(id(model))
        if entry is not None and entry[0]() is model:
            return entry[1]
        digest = model_weight_hash(model, skip="unike_")
        self._hashes[id(model)] = (weakref.ref(model), digest)
        return digest

    def _current(self, peft_model: PeftModel) -> _Pending | None:
        pending = self._pending
        if pending is None or pending.model() is not peft_model:
            return None
        return pending

    def extra_loss(self, peft_model: PeftModel) -> dict[str, torch.Tensor]:
        """T-Patcher's activation and memory losses of this edit's neurons (every patched FFN)."""
        from odedit_hf.editors.tpatcher.method import activation_loss, memory_loss

        pending = self._current(peft_model)
        if pending is None or (self.act_weight == 0 and self.mem_weight == 0):
            return {}
        act, mem = None, None
        for key, queries, memory in zip(pending.keys, pending.queries, pending.memories):
            weight = key.tpatcher_weight[pending.adapter]
            bias = key.tpatcher_bias[pending.adapter]
            if weight.shape[0] == 0:
                continue
            a_edit = (queries * weight).sum(-1) + bias
            term = activation_loss(a_edit)
            act = term if act is None else act + term
            if memory.numel():
                a_mem = torch.nn.functional.linear(memory, weight, bias)
                term = memory_loss(a_mem, a_edit)
                mem = term if mem is None else mem + term
        out = {}
        if act is not None and self.act_weight > 0:
            out["unike_act"] = self.act_weight * act
        if mem is not None and self.mem_weight > 0:
            out["unike_mem"] = self.mem_weight * mem
        return out

    def after_edit(
        self, peft_model: PeftModel, backbone: Backbone, requests: Sequence[EditRequest], stats: EditStats
    ) -> None:
        """Add this edit's FFN inputs to every patched FFN's memory of past edits."""
        pending = self._current(peft_model)
        self._pending = None
        if pending is not None:
            for key, states in zip(pending.keys, pending.edit_states):
                key.append_memory(pending.adapter, states)

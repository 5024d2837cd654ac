"""WISE as an :class:`~odedit_hf.editing.Editor` (``get_method("wise")``).

Wang et al., "WISE: Rethinking the Knowledge Memory for Lifelong Model Editing of Large Language Models"
(NeurIPS 2024, arXiv 2405.14768), following EasyEdit's ``easyeditor/models/wise/WISE.py`` where the paper
leaves a choice open. An edit trains the side memory ``Δ`` of one FFN projection (on the current shard's
random mask, clamped to ``±norm_constraint``) on the target NLL plus the activation-margin loss, which
pushes the side memory's activation distance up on the edit prompt and down on one unrelated prompt per
edit (the request's ``loc`` and/or its ``m_loc`` image question). After the edit its distance is recorded
(the routing threshold), and every ``save_freq`` / ``merge_freq`` edits the side memory is stored as a
shard / the shards are TIES-merged.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from odedit_hf.editing.editor import Editor, NLLObjective, model_device, no_layer_changes

from .config import IDENTITY_ACT, check_activation

if TYPE_CHECKING:
    from peft import PeftModel

    from odedit_hf.backbones import Backbone
    from odedit_hf.data import EditRequest
    from odedit_hf.editing import BaseWeights, EditStats

    from .config import WISEConfig
    from .layer import WISELayer

logger = logging.getLogger(__name__)

__all__ = [
    "LOCALITY_PROMPTS",
    "WISEMethod",
    "WISEObjective",
    "WISESnapshot",
    "activation_margin_loss",
    "wise_layers",
]

#: Which of a request's unrelated prompts the activation loss keeps away from the side memory.
LOCALITY_PROMPTS: tuple[str, ...] = ("both", "text", "image")


def wise_layers(peft_model: Any, adapter_name: str) -> list[tuple[str, WISELayer]]:
    """``(module name, layer)`` of every WISE layer of ``peft_model`` holding ``adapter_name``, in module order."""
    from .layer import WISELayer

    return [
        (name, module)
        for name, module in peft_model.named_modules()
        if isinstance(module, WISELayer) and adapter_name in module.wise_side
    ]


def _positive_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of the positive entries of ``values``, 0 when there is none (EasyEdit's hinge reduction)."""
    positive = values[values > 0]
    return positive.mean() if positive.numel() else values.new_zeros(())


def activation_margin_loss(
    d_edit: torch.Tensor, d_loc: torch.Tensor, *, loc_margin: float, edit_margin: float, gap_margin: float
) -> torch.Tensor:
    """WISE's activation-margin loss on the side memory's distances ``d_edit (n,)`` (edit prompts) and
    ``d_loc (m,)`` (unrelated prompts): ``[Δ_loc − α]₊ + [β − Δ_edit]₊ + [Δ_loc − Δ_edit + γ]₊``, each
    term averaged over its positive entries (every (loc, edit) pair for the last), as EasyEdit computes it.
    """
    if d_edit.numel() == 0 or d_loc.numel() == 0:
        raise ValueError("activation_margin_loss: needs at least one edit and one unrelated distance")
    gap = d_loc.reshape(-1, 1) - d_edit.reshape(1, -1) + gap_margin
    return _positive_mean(d_loc - loc_margin) + _positive_mean(edit_margin - d_edit) + _positive_mean(gap)


class WISESnapshot:
    """The WISE state of one adapter (side memory, mask, shards, merged memory, thresholds, counters);
    :meth:`restore` puts it back exactly, shrinking or growing the stored shards."""

    def __init__(self, peft_model: Any, adapter_name: str) -> None:
        layers = wise_layers(peft_model, adapter_name)
        if not layers:
            raise ValueError(
                f"WISESnapshot: the model has no WISE layer holding adapter {adapter_name!r}; "
                "wrap it with get_peft_model(model, method.peft_config(backbone)) first"
            )
        self.adapter_name = adapter_name
        self._states = [(layer, layer.adapter_state(adapter_name)) for _, layer in layers]

    def restore(self) -> None:
        """Put every WISE layer back to its state at the snapshot."""
        for layer, state in self._states:
            layer.load_adapter_state(self.adapter_name, state)


@dataclass
class _Cached:
    """One batch's inputs to the WISE layer, its base outputs and attention mask (fixed during an edit:
    nothing below the side memory changes)."""

    x: torch.Tensor
    base: torch.Tensor
    mask: torch.Tensor


@dataclass
class _Pending:
    model: weakref.ref
    adapter: str
    layer: Any
    edit: _Cached
    loc: list[_Cached] = field(default_factory=list)


@dataclass
class WISEMethod(Editor):
    """WISE: a side memory on one FFN projection, routed against the main memory by activation distance.

    An edit (one or several requests: batches are supported) trains ``Δ`` of the side memory ``W' = W +
    Δ ⊙ M`` (``M`` the shard's random mask, ``mask_ratio`` of the entries) with the shared loop on the
    target NLL plus ``act_weight`` × the activation-margin loss (:func:`activation_margin_loss`) on the
    distance ``Δ(x)`` = mean over tokens of ``‖act(W'x) − act(Wx)‖₂`` at the edit prompts and at the
    requests' unrelated prompts (``locality``). After every optimiser step ``Δ`` is clamped to
    ``±norm_constraint``. Then the edit's distance is recorded: at inference a sequence goes to a memory
    only when its distance reaches ``act_ratio`` × the smallest recorded one (see
    :class:`~.config.WISEConfig` for the ``retrieve`` and merged-memory rules). Every ``save_freq`` edits the
    side memory is stored as a shard and the next edit draws a new mask; every ``merge_freq`` edits the
    shards are TIES-merged with peft's ``ties``.

    Args:
        layer: the decoder layer of the side memory (negative from the end); default the last of the
            backbone's ``default_edit_layers``.
        projection: the FFN projection inside that layer; default the family's last
            ``default_edit_projections`` entry (the down / out projection).
        mask_ratio: fraction of the side memory's entries a shard trains (WISE: 0.2).
        norm_constraint: clamp of ``W'`` to ``W ± c`` after every step (WISE: 1.0; ``none``: off).
        loc_margin: α, the most an unrelated prompt's distance may reach (WISE: 5).
        edit_margin: β, the least an edit prompt's distance must reach (WISE: 20).
        gap_margin: γ, the least the edit's distance must exceed the unrelated one's by (WISE: 10).
        act_weight: weight of the activation-margin loss (WISE: 1).
        act_ratio: routing threshold τ = ``act_ratio`` × the smallest recorded edit distance (WISE: 0.4).
        act_fn: activation applied to both outputs before the distance: ``model`` (the language model's
            ``hidden_act``, as EasyEdit), ``identity``, or an ACT2FN name.
        retrieve: route over every stored shard, each with its own τ (``true``), or merge the shards into
            one merged memory (``false``, WISE's default for BLIP-2 / MiniGPT-4).
        save_freq: edits per shard (WISE: 500).
        merge_freq: edits per TIES merge, a multiple of ``save_freq`` (WISE: 1000).
        densities: TIES density (WISE: 0.53).
        weights: weight of each shard in a merge (WISE: 1.0).
        mask_seed: seeds the shard masks (shard ``i``: ``mask_seed + i``).
        long_sequence: at inference, sequences longer than this route on their largest token distance.
        locality: the unrelated prompts of the activation loss: ``both`` (the request's ``loc`` question
            and its ``m_loc`` image question), ``text`` (``loc`` only, as EasyEdit's multimodal WISE) or
            ``image`` (``m_loc`` only).
        steps: the most optimiser steps per edit (WISE: 10 SGD steps).
        lr: Adam learning rate of ``Δ`` (the shared loop uses Adam; WISE uses SGD at lr 1.0).
        stop_loss: stop an edit once the target NLL is below this (``none``: run every step).
        weight_decay: weight decay on ``Δ`` (WISE: 1e-5).
        max_grad_norm: clip the gradient norm to this value (``none``: no clipping).
    """

    layer: int | None = None
    projection: str | None = None
    mask_ratio: float = 0.2
    norm_constraint: float | None = 1.0
    loc_margin: float = 5.0
    edit_margin: float = 20.0
    gap_margin: float = 10.0
    act_weight: float = 1.0
    act_ratio: float = 0.4
    act_fn: str = "model"
    retrieve: bool = False
    save_freq: int = 500
    merge_freq: int = 1000
    densities: float = 0.53
    weights: float = 1.0
    mask_seed: int = 0
    long_sequence: int = 100
    locality: str = "both"
    steps: int = 30
    lr: float = 0.05
    stop_loss: float | None = 0.1
    weight_decay: float = 1e-5
    max_grad_norm: float | None = None

    name: ClassVar[str] = "wise"
    supports_batch: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise ValueError(f"WISEMethod.layer must be a decoder layer index or None, got {self.layer!r}")
        if self.projection is not None and (not isinstance(self.projection, str) or not self.projection):
            raise ValueError(
                f"WISEMethod.projection must be a module name inside a layer (e.g. 'mlp.down_proj'), "
                f"got {self.projection!r}"
            )
        for name in ("loc_margin", "edit_margin", "gap_margin", "act_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"WISEMethod.{name} must be a finite number, got {value!r}")
            setattr(self, name, float(value))
        if self.act_weight < 0:
            raise ValueError(f"WISEMethod.act_weight must be >= 0, got {self.act_weight}")
        if self.act_fn != "model":
            check_activation(self.act_fn, "WISEMethod.act_fn (or 'model')")
        if self.locality not in LOCALITY_PROMPTS:
            raise ValueError(
                f"WISEMethod.locality must be one of {', '.join(LOCALITY_PROMPTS)}, got {self.locality!r}"
            )
        self._config_fields()  # validates the adapter options now, where the user set them
        self.loop  # noqa: B018 - validates the loop fields now, where the user set them
        self._pending: _Pending | None = None
        #: what the last edit did to the memories: "shard" (side memory stored), "merge"
        self.last_events: list[str] = []

    # ------------------------------------------------------------------ what the edit trains
    def _config_fields(self, act_fn: str = IDENTITY_ACT) -> dict[str, Any]:
        from .config import WISEConfig

        fields = {
            "mask_ratio": self.mask_ratio,
            "norm_constraint": self.norm_constraint,
            "act_ratio": self.act_ratio,
            "act_fn": act_fn,
            "retrieve": self.retrieve,
            "save_freq": self.save_freq,
            "merge_freq": self.merge_freq,
            "densities": self.densities,
            "weights": self.weights,
            "mask_seed": self.mask_seed,
            "long_sequence": self.long_sequence,
        }
        WISEConfig(target_modules=["placeholder"], **fields)
        return fields

    def target_module(self, backbone: Backbone) -> str:
        """The fully qualified name of the side memory's ``nn.Linear``: the last module of the backbone's
        ``default_edit_module_names`` (narrowed to ``layer`` / ``projection`` when set)."""
        names = backbone.default_edit_module_names(
            layers=None if self.layer is None else [self.layer],
            projections=None if self.projection is None else [self.projection],
        )
        return names[-1]

    def activation_name(self, backbone: Backbone) -> str:
        """The activation of the distance: ``act_fn``, or for ``model`` the language model's ``hidden_act``."""
        if self.act_fn != "model":
            return self.act_fn
        config = backbone.base_model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        name = getattr(text, "hidden_act", None) or getattr(text, "activation_function", None)
        if not isinstance(name, str):
            raise ValueError(
                f"WISE: the {backbone.spec.model_type!r} model config names no hidden_act; set act_fn "
                "(e.g. 'silu' or 'identity')"
            )
        return check_activation(name, f"WISE: the model's hidden_act {name!r}")

    def peft_config(self, backbone: Backbone) -> WISEConfig:
        from .config import WISEConfig

        return WISEConfig(
            target_modules=[self.target_module(backbone)],
            mask_module=backbone.spec.layers.rsplit(".", 1)[0] if "." in backbone.spec.layers else None,
            **self._config_fields(self.activation_name(backbone)),
        )

    def _layer(self, peft_model: Any, adapter: str) -> WISELayer:
        layers = wise_layers(peft_model, adapter)
        if len(layers) != 1:
            raise ValueError(
                f"WISE: adapter {adapter!r} must hold exactly one WISE layer, found {len(layers)}; wrap the "
                "model with get_peft_model(model, get_method('wise').peft_config(backbone))"
            )
        return layers[0][1]

    def edit_parameters(self, peft_model: PeftModel) -> list[torch.nn.Parameter]:
        """The side memory ``Δ`` of the active adapter."""
        adapter = peft_model.active_adapter
        side = self._layer(peft_model, adapter).wise_side[adapter]
        if not side.requires_grad:
            raise ValueError(
                "WISE: the side memory is frozen; is the adapter active and not in inference mode?"
            )
        return [side]

    def adapter_is_identity(self, peft_model: PeftModel) -> bool:
        """True only when every active WISE layer has a zero side memory, no shard and no merged memory."""
        from .layer import WISELayer

        return no_layer_changes(
            peft_model, WISELayer, lambda layer, name: name in layer.wise_side and layer.has_state(name)
        )

    def snapshot(
        self, peft_model: PeftModel, adapter_name: str, base: BaseWeights | None = None
    ) -> WISESnapshot:
        """A :class:`WISESnapshot` (``base`` is not needed: the base weights are never written)."""
        return WISESnapshot(peft_model, adapter_name)

    # ------------------------------------------------------------------ hooks
    def _locality_groups(self, requests: Sequence[EditRequest]) -> list[list[Any]]:
        from odedit_hf.editing.samples import eval_samples

        samples = [eval_samples(r) for r in requests]
        groups = []
        if self.locality in ("both", "text"):
            groups.append([s["t_locality"] for s in samples])
        if self.locality in ("both", "image") and all("m_locality" in s for s in samples):
            groups.append([s["m_locality"] for s in samples])  # text-only records have no image prompt
        return groups

    @torch.no_grad()
    def before_edit(self, peft_model: PeftModel, backbone: Backbone, requests: Sequence[EditRequest]) -> None:
        """Draw the shard's mask if it starts now, put the layer in editing mode (the side memory answers
        every sequence) and cache the layer's inputs and base outputs on the edit prompts and on the
        unrelated prompts, from which :meth:`extra_loss` computes the distances at every step."""
        from odedit_hf.editing.loss import model_inputs
        from odedit_hf.editing.samples import edit_samples

        adapter = peft_model.active_adapter
        layer = self._layer(peft_model, adapter)
        if layer.draw_mask(adapter):
            logger.debug("WISE: new mask for shard %d", layer.count(adapter, 1))
        layer.set_editing(adapter, True)
        device = model_device(peft_model)
        batches = [backbone.build_batch(edit_samples(requests), device=device)]
        batches += [backbone.build_batch(group, device=device) for group in self._locality_groups(requests)]
        cached: list[_Cached] = []
        for batch in batches:
            seen: list[tuple[torch.Tensor, torch.Tensor]] = []
            handle = layer.get_base_layer().register_forward_hook(
                lambda mod, args, out, seen=seen: seen.append((args[0].detach(), out.detach()))
            )
            try:
                backbone.forward(model_inputs(batch))
            finally:
                handle.remove()
            if len(seen) != 1:
                raise ValueError(
                    f"WISE: the side-memory layer ran {len(seen)} times in one forward, expected 1"
                )
            x, out = seen[0]
            mask = batch["attention_mask"]
            if x.dim() != 3 or tuple(x.shape[:2]) != tuple(mask.shape):
                raise ValueError(
                    f"WISE: the side-memory layer's input {tuple(x.shape)} does not line up with the attention "
                    f"mask {tuple(mask.shape)}; target a projection inside the language model's decoder layers"
                )
            cached.append(_Cached(x=x, base=out, mask=mask))
        self._pending = _Pending(
            model=weakref.ref(peft_model), adapter=adapter, layer=layer, edit=cached[0], loc=cached[1:]
        )

    def _current(self, peft_model: Any) -> _Pending | None:
        pending = self._pending
        if pending is None or pending.model() is not peft_model:
            return None
        return pending

    def distances(self, peft_model: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Δ_edit (n,), Δ_loc (m,))``: the side memory's training distances on this edit's prompts and
        unrelated prompts (differentiable in ``Δ``; after :meth:`before_edit`)."""
        pending = self._current(peft_model)
        if pending is None:
            raise ValueError("WISE: no edit in progress (call before_edit first)")
        layer, adapter = pending.layer, pending.adapter
        delta = layer.side_delta(adapter)

        def dist(c: _Cached) -> torch.Tensor:
            return layer.distances(adapter, c.base, F.linear(c.x.float(), delta), c.mask, infer=False)

        return dist(pending.edit), torch.cat([dist(c) for c in pending.loc])

    def extra_loss(self, peft_model: PeftModel) -> dict[str, torch.Tensor]:
        """``act_weight`` × :func:`activation_margin_loss` of the side memory at this step."""
        if self._current(peft_model) is None or self.act_weight == 0:
            return {}
        d_edit, d_loc = self.distances(peft_model)
        loss = activation_margin_loss(
            d_edit,
            d_loc,
            loc_margin=self.loc_margin,
            edit_margin=self.edit_margin,
            gap_margin=self.gap_margin,
        )
        return {"wise_act": self.act_weight * loss}

    def _finish(self, peft_model: Any) -> None:
        pending = self._current(peft_model)
        self._pending = None
        for _, layer in wise_layers(peft_model, peft_model.active_adapter):
            layer.set_editing(peft_model.active_adapter, False)
        if pending is not None:
            pending.layer.set_editing(pending.adapter, False)

    def after_edit(
        self, peft_model: PeftModel, backbone: Backbone, requests: Sequence[EditRequest], stats: EditStats
    ) -> None:
        """Record the edit's distances (the routing threshold), leave editing mode, then store the side
        memory as a shard every ``save_freq`` edits and merge every ``merge_freq`` edits."""
        from .layer import EDITS

        pending = self._current(peft_model)
        self.last_events = []
        if pending is None:
            self._finish(peft_model)
            return
        with torch.no_grad():
            d_edit, d_loc = self.distances(peft_model)
        layer, adapter = pending.layer, pending.adapter
        self._finish(peft_model)
        before = layer.count(adapter, EDITS)
        layer.record_edit(adapter, d_edit, len(requests))
        after = layer.count(adapter, EDITS)
        if after // self.save_freq > before // self.save_freq:
            layer.push_shard(adapter)
            self.last_events.append("shard")
        if after // self.merge_freq > before // self.merge_freq:
            layer.merge_memories(adapter)
            self.last_events.append("merge")
        logger.debug(
            "WISE: edit %d, %d steps, distances edit %s loc %s, %s",
            after,
            stats.steps,
            [round(float(v), 3) for v in d_edit],
            [round(float(v), 3) for v in d_loc],
            self.last_events,
        )

    def edit(self, peft_model: PeftModel, backbone: Backbone, requests: Sequence[EditRequest]) -> EditStats:
        """before_edit, the shared loop on :class:`WISEObjective`, after_edit; a failed edit leaves editing
        mode (the side memory keeps what the failed loop trained; the protocols' snapshots roll it back)."""
        from odedit_hf.editing.loop import run_edit_loop
        from odedit_hf.editing.samples import edit_samples

        if len(requests) == 0:
            raise ValueError("WISE: an edit needs at least one EditRequest")
        try:
            self.before_edit(peft_model, backbone, requests)
            batch = backbone.build_batch(edit_samples(requests), device=model_device(peft_model))
            with backbone.frozen_vision_cache():
                stats = run_edit_loop(
                    peft_model,
                    self.edit_parameters(peft_model),
                    self.loop,
                    WISEObjective(self, peft_model, backbone, batch),
                )
        except BaseException:
            self._finish(peft_model)
            raise
        self.after_edit(peft_model, backbone, requests, stats)
        return stats


class WISEObjective(NLLObjective):
    """The plain WISE objective: target NLL + the activation-margin loss, with the early stop on their sum
    (EasyEdit's ``EarlyStopMeter`` watches the total loss too), so an edit runs until the margins hold
    or its step budget is spent, not only until the target is reached."""

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        total, nll, extra = super().__call__(step)
        return total, total, {"nll": nll, **extra}

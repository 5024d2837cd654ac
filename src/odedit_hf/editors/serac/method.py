"""SERAC as an :class:`~odedit_hf.editing.Editor` (``get_method("serac")``): an edit adds the request to the
adapter's cache; the classifier and the counterfactual model come trained from an artefact
(:func:`~.trainer.train_serac`); no weight of the base model changes and nothing trains at edit time."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from odedit_hf.editing.editor import Editor, model_device
from odedit_hf.editing.protocol import EditStats

from .artefact import Architecture, architecture_from, check_identity, load_artefact

if TYPE_CHECKING:
    from peft import PeftModel

    from odedit_hf.backbones import Backbone
    from odedit_hf.data import EditRequest
    from odedit_hf.editing.rollback import BaseWeights

    from .config import SERACConfig
    from .layer import Embedding
    from .model import SERACModel

logger = logging.getLogger(__name__)

__all__ = [
    "SERACMethod",
    "SERACSnapshot",
    "adapter_tensors",
    "context_ids",
    "default_architecture",
    "load_adapter_tensors",
    "prompt_markers",
    "serac_layer",
    "serac_tuner",
]


def serac_tuner(peft_model: Any) -> SERACModel:
    """The :class:`~.model.SERACModel` under ``peft_model``."""
    from .model import SERACModel

    tuner = getattr(peft_model, "base_model", None)
    if not isinstance(tuner, SERACModel):
        raise ValueError(
            "SERAC: the model is not wrapped with a SERAC adapter; wrap it with "
            "get_peft_model(model, get_method('serac', editor_weights=DIR).peft_config(backbone))"
        )
    return tuner


def serac_layer(peft_model: Any, adapter_name: str) -> Embedding:
    """The SERAC cache layer holding ``adapter_name``."""
    from .layer import Embedding

    for module in peft_model.modules():
        if isinstance(module, Embedding) and adapter_name in module.serac_cache_ids:
            return module
    raise ValueError(f"SERAC: the model has no SERAC layer holding adapter {adapter_name!r}")


def prompt_markers(backbone: Backbone) -> list[list[int]]:
    """Token ids that end a wrapped prompt (the answer marker of each task), as IKE finds them."""
    from odedit_hf.backbones import PromptSample

    sentinel = "zqxjkv"
    markers: list[list[int]] = []
    for task in ("vqa", "caption"):
        text = backbone.wrap_prompt(PromptSample(prompt=sentinel, target="x", task=task))
        after = text.split(sentinel)[-1] if sentinel in text else ""
        ids = list(backbone.tokenizer(after, add_special_tokens=False)["input_ids"]) if after.strip() else []
        if ids and ids not in markers:
            markers.append([int(t) for t in ids])
    return markers


def _skip_ids(backbone: Backbone) -> set[int]:
    skip = {int(backbone.pad_token_id)}
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(backbone.tokenizer, name, None)
        if value is not None:
            skip.add(int(value))
    if backbone.image_token_id is not None:
        skip.add(int(backbone.image_token_id))
    return skip


def context_ids(backbone: Backbone, prompt: str, target: str, task: str = "vqa") -> list[int]:
    """The cached edit text: the edit's prompt and new answer, wrapped as a text-only sample of the backbone
    (``"user : {prompt} assistant : {target}"`` under a chat template), without BOS/EOS/pad/image tokens."""
    from odedit_hf.backbones import PromptSample

    ids, _labels, _ = backbone.encode_sample(PromptSample(prompt=prompt, target=target, task=task))
    skip = _skip_ids(backbone)
    return [int(t) for t in ids if int(t) not in skip]


def default_architecture(
    backbone: Backbone,
    *,
    rank: int = 16,
    alpha: float = 32.0,
    proj_dim: int = 64,
    copy_dim: int = 32,
    cls_layer: int = -1,
    pooling: str = "mean",
    similarity: str = "l2",
    cf_layers: Sequence[int] | None = None,
) -> Architecture:
    """The adapter's shape for ``backbone``: cache on the input embedding, deltas on every linear module of
    the decoder layers ``cf_layers`` (default: all)."""
    from torch import nn

    model = backbone.base_model
    embedding = model.get_input_embeddings()
    emb_names = [name for name, module in model.named_modules() if module is embedding]
    if not emb_names:
        raise ValueError(
            f"SERAC: cannot find the input embedding of {type(model).__name__} among its modules"
        )
    layers = backbone.decoder_layers()
    chosen = range(len(layers)) if cf_layers is None else [int(i) for i in cf_layers]
    wanted = {id(m) for i in chosen for m in layers[i].modules() if isinstance(m, nn.Linear)}
    if cf_layers is not None and any(not 0 <= i < len(layers) for i in chosen):
        raise ValueError(f"SERAC: cf_layers {list(cf_layers)} out of range for {len(layers)} decoder layers")
    cf = [name for name, module in model.named_modules() if id(module) in wanted]
    if not cf:
        raise ValueError("SERAC: no linear module in the chosen decoder layers for the counterfactual deltas")
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return Architecture(
        embedding_module=emb_names[0],
        cf_modules=cf,
        hidden_size=int(text.hidden_size),
        rank=rank,
        alpha=alpha,
        proj_dim=proj_dim,
        copy_dim=copy_dim,
        cls_layer=cls_layer,
        pooling=pooling,
        similarity=similarity,
    )


def peft_config_for(architecture: Architecture, threshold: float) -> SERACConfig:
    from .config import SERACConfig

    return SERACConfig(
        target_modules=[architecture.embedding_module, *architecture.cf_modules],
        embedding_module=architecture.embedding_module,
        rank=architecture.rank,
        alpha=architecture.alpha,
        proj_dim=architecture.proj_dim,
        copy_dim=architecture.copy_dim,
        hidden_size=architecture.hidden_size,
        cls_layer=architecture.cls_layer,
        pooling=architecture.pooling,
        similarity=architecture.similarity,
        threshold=threshold,
    )


def adapter_tensors(peft_model: Any, adapter_name: str) -> dict[str, torch.Tensor]:
    """The trained tensors of an adapter in the artefact's naming (see :mod:`.artefact`)."""
    tuner = serac_tuner(peft_model)
    layer = serac_layer(peft_model, adapter_name)
    return {k: v.detach().clone() for k, v in _named_tensors(tuner, layer, adapter_name).items()}


def _named_tensors(tuner: Any, layer: Any, adapter_name: str) -> dict[str, torch.nn.Parameter]:
    from .layer import COPY_PARAMS, Linear

    out = {
        "classifier.proj_w": layer.serac_proj_w[adapter_name],
        "classifier.proj_b": layer.serac_proj_b[adapter_name],
        "classifier.log_scale": layer.serac_log_scale[adapter_name],
    }
    for name in COPY_PARAMS:
        if adapter_name in getattr(layer, name):
            out[f"cf_head.{name.removeprefix('serac_')}"] = getattr(layer, name)[adapter_name]
    for name, module in tuner.model.named_modules():
        if isinstance(module, Linear) and adapter_name in module.serac_A:
            out[f"cf.{name}.A"] = module.serac_A[adapter_name]
            out[f"cf.{name}.B"] = module.serac_B[adapter_name]
    return out


def load_adapter_tensors(
    peft_model: Any, adapter_name: str, tensors: dict[str, torch.Tensor], where: str
) -> None:
    """Copy an artefact's tensors into the adapter; ``ValueError`` when a name or a shape does not match."""
    current = adapter_tensors(peft_model, adapter_name)
    if set(current) != set(tensors):
        missing, extra = sorted(set(current) - set(tensors)), sorted(set(tensors) - set(current))
        raise ValueError(
            f"SERAC: the editor weights at {where} do not fit this adapter (missing {missing[:3]}, unexpected "
            f"{extra[:3]}); build the adapter from the artefact's architecture (SERACMethod.peft_config)"
        )
    targets = _named_tensors(serac_tuner(peft_model), serac_layer(peft_model, adapter_name), adapter_name)
    with torch.no_grad():
        for key, param in targets.items():
            if tuple(param.shape) != tuple(tensors[key].shape):
                raise ValueError(
                    f"SERAC: {key} has shape {tuple(tensors[key].shape)} at {where}, the adapter "
                    f"{tuple(param.shape)}; the artefact was trained for another architecture"
                )
            param.copy_(tensors[key].to(param.device, param.dtype))


class SERACSnapshot:
    """The cache of one adapter at a point in time; :meth:`restore` puts it back exactly (the edits added
    since are gone; the trained classifier and counterfactual deltas never change at edit time)."""

    def __init__(self, peft_model: Any, adapter_name: str) -> None:
        self.layer = serac_layer(peft_model, adapter_name)
        self.adapter_name = adapter_name
        self.state = self.layer.cache_state(adapter_name)

    def restore(self) -> None:
        # the prompt markers stay: they describe the backbone, not an edit
        state = dict(self.state, serac_markers=self.layer.serac_markers[self.adapter_name])
        self.layer.load_cache(self.adapter_name, state)


@dataclass
class SERACMethod(Editor):
    """SERAC (Mitchell et al., "Memory-Based Model Editing at Scale", ICML 2022): an edit is a cache entry.
    Every forward scores the input against the cached edits with a scope classifier (the frozen base
    model's mean-pooled image+text hidden states through a trained projection; ``exp(-scale * squared
    L2)``, max over the cache); an input in scope (score > ``threshold``) is answered by the counterfactual
    model -- the base model with trained low-rank deltas, fed ``[cached edit text ; query]`` with the
    query's image -- and every other input by the base model, unchanged. The classifier and the
    counterfactual deltas are trained once per base model (:func:`odedit_hf.editors.serac.train_serac`,
    ``odedit-hf train-editor --method serac``) and loaded from ``editor_weights``.

    Args:
        editor_weights: the folder :func:`~odedit_hf.editors.serac.train_serac` wrote (required to edit; an
            artefact trained for another base model is refused).
        threshold: the scope threshold (``none``: the artefact's, 0.5 by default).
    """

    editor_weights: str | None = None
    threshold: float | None = None

    name: ClassVar[str] = "serac"
    wrappable: ClassVar[bool] = False
    trains_at_edit: ClassVar[bool] = False
    needs_training: ClassVar[bool] = True
    supports_batch: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.editor_weights, str) and self.editor_weights.strip().lower() in ("", "none"):
            self.editor_weights = None
        if self.editor_weights is not None and not isinstance(self.editor_weights, str):
            raise ValueError(f"SERACMethod.editor_weights must be a folder path, got {self.editor_weights!r}")
        if self.threshold is not None and (
            isinstance(self.threshold, bool)
            or not isinstance(self.threshold, (int, float))
            or not 0.0 < float(self.threshold) < 1.0
        ):
            raise ValueError(f"SERACMethod.threshold must be in (0, 1) or none, got {self.threshold!r}")
        self._artefact: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None

    # ------------------------------------------------------------------ the artefact
    def artefact(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``(meta, tensors)`` of ``editor_weights`` (read once)."""
        if self.editor_weights is None:
            raise ValueError(
                "SERAC needs a trained classifier and counterfactual model: train them with "
                "odedit_hf.editors.serac.train_serac(backbone, train_requests, DIR) (or odedit-hf train-editor "
                "--method serac) and pass editor_weights=DIR (--serac.editor_weights DIR)"
            )
        if self._artefact is None:
            self._artefact = load_artefact(self.editor_weights)
        return self._artefact

    def peft_config(self, backbone: Backbone) -> SERACConfig:
        """The adapter of the artefact's architecture; refuses an artefact trained for another base model."""
        meta, _ = self.artefact()
        check_identity(meta.get("base_model", {}), backbone.base_model, self.editor_weights)
        threshold = float(self.threshold if self.threshold is not None else meta.get("threshold", 0.5))
        return peft_config_for(architecture_from(meta), threshold)

    def _ensure_trained(
        self, peft_model: PeftModel, backbone: Backbone, layer: Embedding, adapter: str
    ) -> None:
        if layer.serac_markers[adapter].numel() > 0:
            return  # filled at the first edit (or loaded from a saved adapter): trained weights are in
        meta, tensors = self.artefact()
        check_identity(meta.get("base_model", {}), backbone.base_model, self.editor_weights)
        load_adapter_tensors(peft_model, adapter, tensors, self.editor_weights)
        layer.set_markers(adapter, prompt_markers(backbone))

    # ------------------------------------------------------------------ hooks
    def edit_parameters(self, peft_model: PeftModel) -> list[torch.nn.Parameter]:
        """None: SERAC trains nothing at edit time."""
        return []

    def adapter_is_identity(self, peft_model: PeftModel) -> bool:
        """True when the active adapter's cache is empty (no input is routed then)."""
        try:
            return (
                serac_layer(peft_model, peft_model.active_adapter).num_edits(peft_model.active_adapter) == 0
            )
        except ValueError:
            return False

    def snapshot(
        self, peft_model: PeftModel, adapter_name: str, base: BaseWeights | None = None
    ) -> SERACSnapshot:
        """A :class:`SERACSnapshot` of the adapter's cache (the base weights are never written)."""
        return SERACSnapshot(peft_model, adapter_name)

    # ------------------------------------------------------------------ the edit
    def edit(self, peft_model: PeftModel, backbone: Backbone, requests: Sequence[EditRequest]) -> EditStats:
        """Add each request (its context text, and the base model's pooled features of its prompt + image)
        to the active adapter's cache; the trained weights are loaded at the first edit. No optimisation."""
        from odedit_hf.editing.samples import edit_samples

        if len(requests) == 0:
            raise ValueError("SERAC: no requests given; an edit needs at least one EditRequest")
        tuner = serac_tuner(peft_model)
        adapter = peft_model.active_adapter
        layer = serac_layer(peft_model, adapter)
        self._ensure_trained(peft_model, backbone, layer, adapter)
        feats = []
        for group in _same_kind(requests):  # a backbone may not mix image and text-only rows in one batch
            batch = backbone.build_batch(edit_samples(group), device=model_device(peft_model))
            feats.append((group, tuner.base_features(adapter, batch)))
        order = {id(r): i for i, r in enumerate(requests)}
        rows = sorted(
            ((order[id(r)], f) for group, fs in feats for r, f in zip(group, fs)), key=lambda x: x[0]
        )
        features = torch.stack([f for _, f in rows])
        ids = [context_ids(backbone, r.src, r.alt, r.task) for r in requests]
        layer.add_edits(adapter, ids, features)
        logger.debug("SERAC: %d edit(s) cached; cache %d", len(requests), layer.num_edits(adapter))
        return EditStats(steps=0, final_loss=None)

    def extra_memory_bytes(self, num_edit_parameters: int) -> int:
        """The counterfactual deltas and classifier (the artefact's tensors)."""
        if self.editor_weights is None:
            return 0
        _, tensors = self.artefact()
        return sum(t.numel() * t.element_size() for t in tensors.values())


def _same_kind(requests: Sequence[EditRequest]) -> list[list[EditRequest]]:
    with_image = [r for r in requests if not r.text_only]
    text_only = [r for r in requests if r.text_only]
    return [g for g in (with_image, text_only) if g]

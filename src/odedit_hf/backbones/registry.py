"""Model-type registry: where each family keeps its decoder layers, FFNs, head, vision tower and projector.

One map keyed by ``config.model_type`` (never by checkpoint name). The dotted paths follow the
transformers 5.x class layouts and are resolved against a real tiny model of every family in
``tests/test_backbones.py``. A new family is one :func:`register_backbone` call::

    register_backbone(BackboneSpec(model_type="mistral", multimodal=False, layers="model.layers", ...))
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Literal

logger = logging.getLogger(__name__)

__all__ = [
    "BackboneSpec",
    "UnsupportedModelError",
    "get_backbone_spec",
    "register_backbone",
    "supported_model_types",
    "unregister_backbone",
]

ImageBatching = Literal["concat", "pad_images"]
ImageTokenRule = Literal["llava", "qwen_vl", "idefics3", "blip2", "none"]


class UnsupportedModelError(ValueError):
    """The model's ``config.model_type`` has no :class:`BackboneSpec` in the registry."""


@dataclass(frozen=True)
class BackboneSpec:
    """Where one model family keeps the parts odedit-hf touches, and how it takes images.

    Args:
        model_type: ``config.model_type`` of the top-level model (e.g. ``"llava"``, ``"qwen2_vl"``).
        multimodal: whether the family takes images.
        layers: dotted path from the top-level model to the decoder ``nn.ModuleList``.
        ffn_projections: names of the FFN ``nn.Linear`` modules inside one decoder layer, e.g.
            ``("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")``.
        default_edit_projections: the subset of ``ffn_projections`` that FT-L / LoRA edit by default.
        final_norm: dotted path to the norm applied after the last decoder layer.
        lm_head: dotted path to the output projection.
        vision_tower: dotted path to the vision encoder (``None`` for text-only families).
        projector: dotted path to the vision-to-language projector (``None`` for text-only families).
        default_edit_layers: decoder layer indices edited by default; negative values count from the
            end (``(-1,)`` = the last layer). Resolved by ``Backbone.default_edit_layers()``.
        image_token_id_attr: attribute of the top-level config holding the image placeholder token id.
        image_placeholder: how one image appears in a raw (non-chat) prompt before expansion;
            ``{image_token}`` is replaced by the processor's image token. ``None``: the processor adds
            the image tokens itself (BLIP-2) and the prompt carries no placeholder.
        image_token_rule: how many placeholder tokens one image expands to, used when the full
            processor cannot run (no torchvision) and odedit-hf expands the placeholders itself.
        image_batching: how per-sample image tensors are joined into a batch: ``"concat"`` along the
            first dimension (one entry per image: LLaVA, BLIP-2, Qwen-VL) or ``"pad_images"`` (a
            ``(batch, max_images, ...)`` tensor padded with all-zero images: Idefics3, SmolVLM).
        mixed_batches: whether one batch may mix samples with and without an image.
        mm_token_type_ids: the forward needs ``mm_token_type_ids`` (1 at image tokens, 0 elsewhere) to
            build its multimodal rotary positions (Qwen-VL in transformers 5).
        hidden_states_output: dotted attribute path of the per-layer hidden states in the model's
            output (``"language_model_outputs.hidden_states"`` for BLIP-2).
        text_only_forward: dotted path of the causal LM that :meth:`Backbone.forward` calls for batches
            without images, when the top-level forward requires images (BLIP-2: ``"language_model"``);
            ``None``: the top-level model takes text-only batches.
        accepts_multiple_images: one sample may carry several images: one placeholder span per image
            in ``input_ids`` and the images' ``pixel_values`` concatenated along the first dimension in
            the order their spans appear (row-major across the batch), nothing else per image. True
            for LLaVA (``LlavaModel`` scatters the image features into the placeholders in that
            order; tested with IKE's image demonstrations). False where odedit-hf has not built and
            tested it: BLIP-2 (its processor puts one image's query tokens before BOS, with no
            placeholder in the prompt), Qwen-VL
            (``image_grid_thw`` per image and M-RoPE positions over ``mm_token_type_ids``), Idefics3 /
            SmolVLM (``pad_images`` batching), and text-only families.
    """

    model_type: str
    multimodal: bool
    layers: str
    ffn_projections: tuple[str, ...]
    default_edit_projections: tuple[str, ...]
    final_norm: str
    lm_head: str
    vision_tower: str | None
    projector: str | None
    default_edit_layers: tuple[int, ...] = (-1,)
    image_token_id_attr: str | None = "image_token_id"
    image_placeholder: str | None = "{image_token}"
    image_token_rule: ImageTokenRule = "none"
    image_batching: ImageBatching = "concat"
    mixed_batches: bool = True
    mm_token_type_ids: bool = False
    hidden_states_output: str = "hidden_states"
    text_only_forward: str | None = None
    accepts_multiple_images: bool = False

    def __post_init__(self) -> None:
        if not self.model_type:
            raise ValueError("BackboneSpec.model_type must be a non-empty string (the config's model_type).")
        if not self.ffn_projections:
            raise ValueError(
                f"BackboneSpec({self.model_type!r}): ffn_projections must name at least one module."
            )
        unknown = [p for p in self.default_edit_projections if p not in self.ffn_projections]
        if unknown or not self.default_edit_projections:
            raise ValueError(
                f"BackboneSpec({self.model_type!r}): default_edit_projections {self.default_edit_projections} must be "
                f"a non-empty subset of ffn_projections {self.ffn_projections}."
            )
        if not self.default_edit_layers:
            raise ValueError(
                f"BackboneSpec({self.model_type!r}): default_edit_layers must hold at least one index."
            )
        if self.multimodal and (self.vision_tower is None or self.projector is None):
            raise ValueError(
                f"BackboneSpec({self.model_type!r}): a multimodal spec needs vision_tower and projector paths."
            )
        if self.image_batching not in ("concat", "pad_images"):
            raise ValueError(
                f"BackboneSpec({self.model_type!r}): image_batching must be 'concat' or 'pad_images', "
                f"got {self.image_batching!r}."
            )


_LLAMA_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_OPT_MLP = ("fc1", "fc2")


def _builtin_specs() -> dict[str, BackboneSpec]:
    specs = [
        BackboneSpec(
            model_type="llava",
            multimodal=True,
            layers="model.language_model.layers",
            ffn_projections=_LLAMA_MLP,
            default_edit_projections=("mlp.down_proj",),
            final_norm="model.language_model.norm",
            lm_head="lm_head",
            vision_tower="model.vision_tower",
            projector="model.multi_modal_projector",
            image_token_rule="llava",
            accepts_multiple_images=True,
        ),
        BackboneSpec(
            # BLIP-2 wraps a full causal LM (OPT in the released checkpoints) under `language_model`.
            model_type="blip-2",
            multimodal=True,
            layers="language_model.model.decoder.layers",
            ffn_projections=_OPT_MLP,
            default_edit_projections=("fc2",),
            final_norm="language_model.model.decoder.final_layer_norm",
            lm_head="language_model.lm_head",
            vision_tower="vision_model",
            projector="language_projection",
            image_placeholder=None,
            image_token_rule="blip2",
            hidden_states_output="language_model_outputs.hidden_states",
            text_only_forward="language_model",
        ),
        BackboneSpec(
            model_type="qwen2_vl",
            multimodal=True,
            layers="model.language_model.layers",
            ffn_projections=_LLAMA_MLP,
            default_edit_projections=("mlp.down_proj",),
            final_norm="model.language_model.norm",
            lm_head="lm_head",
            vision_tower="model.visual",
            projector="model.visual.merger",
            image_placeholder="<|vision_start|>{image_token}<|vision_end|>",
            image_token_rule="qwen_vl",
            mm_token_type_ids=True,
        ),
        BackboneSpec(
            model_type="qwen3_vl",
            multimodal=True,
            layers="model.language_model.layers",
            ffn_projections=_LLAMA_MLP,
            default_edit_projections=("mlp.down_proj",),
            final_norm="model.language_model.norm",
            lm_head="lm_head",
            vision_tower="model.visual",
            projector="model.visual.merger",
            image_placeholder="<|vision_start|>{image_token}<|vision_end|>",
            image_token_rule="qwen_vl",
            mm_token_type_ids=True,
        ),
        BackboneSpec(
            model_type="idefics3",
            multimodal=True,
            layers="model.text_model.layers",
            ffn_projections=_LLAMA_MLP,
            default_edit_projections=("mlp.down_proj",),
            final_norm="model.text_model.norm",
            lm_head="lm_head",
            vision_tower="model.vision_model",
            projector="model.connector",
            image_token_rule="idefics3",
            image_batching="pad_images",
        ),
        BackboneSpec(
            model_type="smolvlm",
            multimodal=True,
            layers="model.text_model.layers",
            ffn_projections=_LLAMA_MLP,
            default_edit_projections=("mlp.down_proj",),
            final_norm="model.text_model.norm",
            lm_head="lm_head",
            vision_tower="model.vision_model",
            projector="model.connector",
            image_token_rule="idefics3",
            image_batching="pad_images",
        ),
        BackboneSpec(
            model_type="llama",
            multimodal=False,
            layers="model.layers",
            ffn_projections=_LLAMA_MLP,
            default_edit_projections=("mlp.down_proj",),
            final_norm="model.norm",
            lm_head="lm_head",
            vision_tower=None,
            projector=None,
            image_token_id_attr=None,
            image_placeholder=None,
        ),
        BackboneSpec(
            model_type="opt",
            multimodal=False,
            layers="model.decoder.layers",
            ffn_projections=_OPT_MLP,
            default_edit_projections=("fc2",),
            final_norm="model.decoder.final_layer_norm",
            lm_head="lm_head",
            vision_tower=None,
            projector=None,
            image_token_id_attr=None,
            image_placeholder=None,
        ),
        BackboneSpec(
            model_type="qwen2",
            multimodal=False,
            layers="model.layers",
            ffn_projections=_LLAMA_MLP,
            default_edit_projections=("mlp.down_proj",),
            final_norm="model.norm",
            lm_head="lm_head",
            vision_tower=None,
            projector=None,
            image_token_id_attr=None,
            image_placeholder=None,
        ),
    ]
    qwen2_vl = next(s for s in specs if s.model_type == "qwen2_vl")
    # Qwen2.5-VL keeps Qwen2-VL's module layout and image-token scheme (only the vision blocks differ inside)
    specs.append(replace(qwen2_vl, model_type="qwen2_5_vl"))
    return {s.model_type: s for s in specs}


class _Registry:
    """Holds the spec map; built lazily on first use (no work at import)."""

    def __init__(self) -> None:
        self._specs: dict[str, BackboneSpec] | None = None

    @property
    def specs(self) -> dict[str, BackboneSpec]:
        if self._specs is None:
            self._specs = _builtin_specs()
        return self._specs


_REGISTRY = _Registry()


def register_backbone(spec: BackboneSpec, *, overwrite: bool = False) -> None:
    """Add a model family to the registry.

    Args:
        spec: the family's :class:`BackboneSpec`.
        overwrite: replace an existing spec with the same ``model_type`` instead of raising.
    """
    if not isinstance(spec, BackboneSpec):
        raise TypeError(f"register_backbone expects a BackboneSpec, got {type(spec).__name__}.")
    if spec.model_type in _REGISTRY.specs and not overwrite:
        raise ValueError(
            f"A backbone spec for model_type {spec.model_type!r} is already registered; "
            "pass overwrite=True to replace it."
        )
    _REGISTRY.specs[spec.model_type] = spec
    logger.debug("registered backbone spec for model_type %r", spec.model_type)


def unregister_backbone(model_type: str) -> BackboneSpec:
    """Remove and return the spec registered for ``model_type`` (mainly for tests)."""
    if model_type not in _REGISTRY.specs:
        raise _unsupported(model_type)
    return _REGISTRY.specs.pop(model_type)


def supported_model_types() -> list[str]:
    """The registered ``model_type`` values, sorted."""
    return sorted(_REGISTRY.specs)


def _unsupported(model_type: object) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"Unsupported model_type {model_type!r}: odedit-hf has no backbone spec for it. "
        f"Supported model types: {', '.join(supported_model_types())}. "
        "To add a family, register where its parts live: "
        "`from odedit_hf.backbones import BackboneSpec, register_backbone; "
        "register_backbone(BackboneSpec(model_type=..., multimodal=..., layers=..., ffn_projections=..., "
        "default_edit_projections=..., final_norm=..., lm_head=..., vision_tower=..., projector=...))`."
    )


def _model_type_of(obj: Any) -> str:
    if isinstance(obj, str):
        return obj
    config = getattr(obj, "config", obj)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str) or not model_type:
        raise UnsupportedModelError(
            f"Cannot read a model_type from {type(obj).__name__}: pass a transformers model, its config, "
            f"or a model_type string. Supported model types: {', '.join(supported_model_types())}."
        )
    return model_type


def get_backbone_spec(model_or_config_or_model_type: Any) -> BackboneSpec:
    """The :class:`BackboneSpec` of a model, a config, or a ``model_type`` string.

    The model type is read from ``model.config.model_type`` (PEFT wrappers expose the base
    model's config too); checkpoint names are never matched.

    Raises:
        UnsupportedModelError: no spec is registered for that model type.
    """
    model_type = _model_type_of(model_or_config_or_model_type)
    spec = _REGISTRY.specs.get(model_type)
    if spec is None:
        raise _unsupported(model_type)
    return spec

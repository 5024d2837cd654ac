"""One wrapper per loaded model: batch building, layer/FFN lookup, hidden states.

A :class:`Backbone` pairs a transformers model with its processor (or tokenizer, for text-only
decoders) and the family's :class:`~odedit_hf.backbones.registry.BackboneSpec`. It turns
``(image, prompt, target)`` samples into teacher-forced batches whose ``labels`` cover exactly the
target tokens, and it names the modules editors act on.

Prompt wrapping (the same for every family):

* chat template present (on the processor or its tokenizer): the user turn is
  ``[{"type": "image"}, {"type": "text", "text": prompt}]`` (no image entry for text-only samples),
  rendered with ``add_generation_prompt=True``; the target follows the generation prompt as is;
* otherwise ``"Question: {prompt} Short answer:"`` for ``task="vqa"`` and the prompt as is for
  ``task="caption"``, preceded by the family's image placeholder when the sample has an image; the
  target gets a leading space.

The prompt and the target are tokenized separately and their ids concatenated, so the labels cover
exactly the target's own tokenization (``tokenizer(target, add_special_tokens=False)``). No EOS is
appended to the target: edits and metrics are about the answer tokens only, and an EOS would add a
token whose accuracy says nothing about the fact.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from odedit_hf.backbones.processing import ImageTextProcessor, encode_with_manual_expansion, image_token_str
from odedit_hf.backbones.registry import BackboneSpec, get_backbone_spec

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

__all__ = ["IGNORE_INDEX", "Backbone", "PromptSample", "shift_logits_labels"]

IGNORE_INDEX = -100
_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "labels")
_TASKS = ("vqa", "caption")


@dataclass
class PromptSample:
    """One teacher-forced example.

    Args:
        prompt: the question (``task="vqa"``), the caption prompt (``task="caption"``) or a text-only
            question.
        target: the answer; its tokens are the only labelled positions.
        image: the image (RGB ``PIL.Image``), or ``None`` for a text-only sample.
        task: ``"vqa"`` or ``"caption"``; decides the raw-prompt wrapping.
    """

    prompt: str
    target: str
    image: Image.Image | None = None
    task: Literal["vqa", "caption"] = "vqa"

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise ValueError(f"PromptSample.prompt must be a str, got {type(self.prompt).__name__}.")
        if not isinstance(self.target, str) or not self.target.strip():
            raise ValueError(f"PromptSample.target must be a non-empty str, got {self.target!r}.")
        if self.task not in _TASKS:
            raise ValueError(f"PromptSample.task must be one of {_TASKS}, got {self.task!r}.")


def shift_logits_labels(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align next-token logits with labels: logits at position t predict the label at t + 1.

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)`` with ``-100`` at unlabelled positions.

    Returns:
        ``(logits[:, :-1], labels[:, 1:])``, both contiguous: ``(B, T-1, V)`` and ``(B, T-1)``.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"shift_logits_labels expects logits (B, T, V) and labels (B, T) with matching B, T; "
            f"got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}."
        )
    return logits[:, :-1, :].contiguous(), labels[:, 1:].contiguous()


def _resolve(root: nn.Module, path: str, *, what: str, model_type: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError as exc:
        raise ValueError(
            f"The {what} path {path!r} of the {model_type!r} backbone spec does not resolve on "
            f"{type(root).__name__}: {exc}. Re-register the family with the right path "
            "(register_backbone(spec, overwrite=True))."
        ) from exc


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain transformers model under a PEFT wrapper (paths are relative to it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class Backbone:
    """A transformers model, its processor and its family spec.

    Args:
        model: a transformers model whose ``config.model_type`` is registered (a PEFT-wrapped model
            works too; module names are relative to the underlying transformers model).
        processor: a ``ProcessorMixin`` (multimodal), a tokenizer (text-only decoders), or an
            :class:`~odedit_hf.backbones.processing.ImageTextProcessor` (image processor + tokenizer,
            for families whose full processor needs torchvision).

    Attributes:
        spec: the family's :class:`BackboneSpec`.
        model, processor: as given.
        tokenizer: the processor's tokenizer (or the processor itself when it is a tokenizer).
        uses_chat_template: whether prompts go through a chat template.
    """

    def __init__(self, model: nn.Module, processor: Any) -> None:
        self.model = model
        self.processor = processor
        self.spec: BackboneSpec = get_backbone_spec(_unwrap(model))
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            if not callable(getattr(processor, "convert_tokens_to_ids", None)):
                raise ValueError(
                    f"Backbone({self.spec.model_type!r}): the processor {type(processor).__name__} is neither a "
                    "processor with a .tokenizer nor a tokenizer; pass AutoProcessor.from_pretrained(...) or, for "
                    "text-only models, AutoTokenizer.from_pretrained(...)."
                )
            tokenizer = processor
        self.tokenizer = tokenizer
        self.image_processor = getattr(processor, "image_processor", None)
        if self.spec.multimodal and self.image_processor is None:
            raise ValueError(
                f"Backbone({self.spec.model_type!r}) is multimodal but the processor {type(processor).__name__} has "
                "no image_processor; pass the family's processor (AutoProcessor.from_pretrained(...))."
            )
        self.chat_template: str | None = getattr(processor, "chat_template", None) or getattr(
            tokenizer, "chat_template", None
        )
        self.uses_chat_template = bool(self.chat_template)
        # Expand image placeholders ourselves when the processor is our light one or its full call fails.
        self._manual_images = isinstance(processor, ImageTextProcessor)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError(
                f"Backbone({self.spec.model_type!r}): the tokenizer has neither a pad nor an EOS token; "
                "set tokenizer.pad_token before building batches."
            )
        self.pad_token_id: int = int(pad)

    # ------------------------------------------------------------------ modules
    @property
    def base_model(self) -> nn.Module:
        """The plain transformers model (under any PEFT wrapper); registry paths are relative to it."""
        return _unwrap(self.model)

    def get_module(
        self, part: Literal["layers", "final_norm", "lm_head", "vision_tower", "projector"]
    ) -> nn.Module:
        """Resolve one of the spec's dotted paths on the model."""
        if part not in ("layers", "final_norm", "lm_head", "vision_tower", "projector"):
            raise ValueError(
                f"Unknown backbone part {part!r}; use one of layers, final_norm, lm_head, vision_tower, projector."
            )
        path = getattr(self.spec, part)
        if path is None:
            raise ValueError(f"The {self.spec.model_type!r} backbone is text-only: it has no {part}.")
        return _resolve(self.base_model, path, what=part, model_type=self.spec.model_type)

    @contextlib.contextmanager
    def frozen_vision_cache(self, max_entries: int = 16) -> Iterator[bool]:
        """Within the block, reuse the vision tower's output for a ``pixel_values`` tensor it has seen.

        An edit runs the same images through a frozen vision tower at every step; this memoises the
        tower's forward by tensor *identity* (the very tensor object, unmodified since: its version
        counter is checked) and by the other arguments' values, so only the first call per image batch
        runs the tower. The memo holds strong references and is dropped at exit.

        It turns itself off (yields ``False``, computes as usual) when the memo could change results:
        a text-only family, a tower in training mode (dropout), a trainable tower parameter, or an
        adapter layer inside the tower (enabling/disabling it would change the output).
        """
        tower = None
        if self.spec.vision_tower is not None:
            try:
                tower = self.get_module("vision_tower")
            except ValueError:
                tower = None
        if tower is None or tower.training or any(p.requires_grad for p in tower.parameters()):
            yield False
            return
        peft_tuners = sys.modules.get("peft.tuners.tuners_utils")  # no adapter layer exists before peft loads
        tuner_layer = getattr(peft_tuners, "BaseTunerLayer", None)
        if tuner_layer is not None and any(isinstance(m, tuner_layer) for m in tower.modules()):
            yield False
            return
        original = tower.__dict__.get("forward")
        compute = tower.forward
        memo: list[tuple[tuple[Any, ...], list[Any], Any]] = []

        def key_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], list[Any]] | None:
            parts: list[Any] = []
            tensors: list[Any] = []
            for name, value in [*enumerate(args), *sorted(kwargs.items())]:
                if isinstance(value, torch.Tensor):
                    parts.append((name, "tensor", id(value), value._version))
                    tensors.append(value)
                elif value is None or isinstance(value, (bool, int, float, str)):
                    parts.append((name, value))
                else:
                    return None  # an argument we cannot compare: do not memoise
            return tuple(parts), tensors

        def memo_forward(*args: Any, **kwargs: Any) -> Any:
            key = key_of(args, kwargs)
            if key is not None:
                for parts, _, output in memo:
                    if parts == key[0]:
                        return copy.copy(output)
            output = compute(*args, **kwargs)
            if key is not None:
                memo.append((key[0], key[1], output))  # the tensors stay referenced: their ids stay unique
                del memo[:-max_entries]
            return copy.copy(output)

        tower.forward = memo_forward
        try:
            yield True
        finally:
            if original is None:
                del tower.forward
            else:
                tower.forward = original
            memo.clear()

    def decoder_layers(self) -> nn.ModuleList:
        """The decoder layers (an ``nn.ModuleList``)."""
        layers = self.get_module("layers")
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(
                f"The layers path {self.spec.layers!r} of {self.spec.model_type!r} resolves to "
                f"{type(layers).__name__}, not an nn.ModuleList."
            )
        return layers

    def num_layers(self) -> int:
        """Number of decoder layers."""
        return len(self.decoder_layers())

    def _normalize_layers(self, layers: Sequence[int] | int | None) -> list[int]:
        n = self.num_layers()
        if layers is None:
            return list(range(n))
        if isinstance(layers, int):
            layers = [layers]
        out: list[int] = []
        for i in layers:
            if not isinstance(i, int) or isinstance(i, bool) or not -n <= i < n:
                raise ValueError(
                    f"Layer index {i!r} is out of range for the {self.spec.model_type!r} backbone with {n} decoder "
                    f"layers; use 0..{n - 1} or negative indices from the end."
                )
            j = i % n
            if j not in out:
                out.append(j)
        return sorted(out)

    def ffn_module_names(
        self, layers: Sequence[int] | int | None = None, projections: Sequence[str] | str | None = None
    ) -> list[str]:
        """Fully qualified names of FFN ``nn.Linear`` modules (relative to :attr:`base_model`).

        The names are the same before and after PEFT wrapping (a tuner layer around the Linear counts),
        so they can go straight into a ``PeftConfig``'s ``target_modules``.

        Args:
            layers: decoder layer indices (negative count from the end); ``None`` = all layers.
            projections: names inside one layer (e.g. ``"mlp.down_proj"``); ``None`` = all of
                ``spec.ffn_projections``.
        """
        if projections is None:
            projections = self.spec.ffn_projections
        elif isinstance(projections, str):
            projections = [projections]
        decoder = self.decoder_layers()
        names: list[str] = []
        for i in self._normalize_layers(layers):
            for proj in projections:
                try:
                    module = decoder[i].get_submodule(proj)
                except AttributeError as exc:
                    raise ValueError(
                        f"Layer {i} of the {self.spec.model_type!r} backbone has no module {proj!r}; "
                        f"its FFN projections are {self.spec.ffn_projections}."
                    ) from exc
                # a PEFT tuner layer wraps the Linear (get_base_layer); the name stays the same
                get_base_layer = getattr(module, "get_base_layer", None)
                base = get_base_layer() if callable(get_base_layer) else module
                if not isinstance(base, nn.Linear):
                    raise ValueError(
                        f"{self.spec.layers}.{i}.{proj} is a {type(module).__name__}, not an nn.Linear; "
                        f"pick one of {self.spec.ffn_projections}."
                    )
                names.append(f"{self.spec.layers}.{i}.{proj}")
        return names

    def default_edit_layers(self) -> list[int]:
        """The layers edited by default (``spec.default_edit_layers``, negatives resolved), sorted."""
        n = self.num_layers()
        return self._normalize_layers([i for i in self.spec.default_edit_layers if -n <= i < n] or [-1])

    def default_edit_module_names(
        self, layers: Sequence[int] | int | None = None, projections: Sequence[str] | str | None = None
    ) -> list[str]:
        """The FFN modules an editor edits: ``layers`` (default :meth:`default_edit_layers`) x ``projections``
        (default ``spec.default_edit_projections``). The one place where default edit targets are worked out."""
        return self.ffn_module_names(
            self.default_edit_layers() if layers is None else layers,
            self.spec.default_edit_projections if projections is None else projections,
        )

    # ------------------------------------------------------------- model outputs
    def forward(self, batch: dict[str, torch.Tensor], **kwargs: Any) -> Any:
        """Run the model on a batch from :meth:`build_batch` (extra kwargs go to the model's forward).

        Use this rather than ``model(**batch)``: for families whose top-level forward requires images
        (BLIP-2), a batch without images runs through the wrapped causal LM
        (``spec.text_only_forward``) — the same modules, adapters included.
        """
        if self.spec.text_only_forward is not None and "pixel_values" not in batch:
            lm = _resolve(
                self.base_model,
                self.spec.text_only_forward,
                what="text_only_forward",
                model_type=self.spec.model_type,
            )
            return lm(**batch, **kwargs)
        return self.model(**batch, **kwargs)

    def last_hidden_states(self, outputs: Any) -> torch.Tensor:
        """Last-layer hidden states ``(B, T, H)`` (after the final norm, transformers' convention).

        Call the model with ``output_hidden_states=True``.
        """
        hidden = None
        # the family's path first; plain "hidden_states" covers text_only_forward outputs too
        for path in dict.fromkeys((self.spec.hidden_states_output, "hidden_states")):
            hidden = outputs
            for attr in path.split("."):
                hidden = hidden.get(attr) if isinstance(hidden, dict) else getattr(hidden, attr, None)
                if hidden is None:
                    break
            if hidden is not None:
                break
        if hidden is None:
            raise ValueError(
                f"The {self.spec.model_type!r} model outputs carry no hidden_states; call the model with "
                "output_hidden_states=True."
            )
        return hidden[-1]

    @property
    def image_token_id(self) -> int | None:
        """The image placeholder token id (``None`` for text-only families)."""
        attr = self.spec.image_token_id_attr
        if attr is None:
            return None
        config = self.base_model.config
        value = getattr(config, attr, None)
        if value is None:
            raise ValueError(
                f"The {self.spec.model_type!r} config has no {attr!r}; set it to the tokenizer's image token id."
            )
        return int(value)

    def image_token_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, T)`` bool mask of the image placeholder positions in ``batch["input_ids"]``."""
        input_ids = batch["input_ids"]
        token_id = self.image_token_id
        if token_id is None:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        return input_ids == token_id

    # ------------------------------------------------------------ batch building
    def wrap_prompt(self, sample: PromptSample) -> str:
        """The prompt text of one sample, before image-placeholder expansion and tokenization."""
        has_image = sample.image is not None
        if self.uses_chat_template:
            if self.spec.multimodal or self.image_processor is not None:
                content: Any = ([{"type": "image"}] if has_image else []) + [
                    {"type": "text", "text": sample.prompt}
                ]
            else:
                content = sample.prompt  # plain tokenizer templates expect string content
            messages = [{"role": "user", "content": content}]
            return self._render_chat(messages)
        text = f"Question: {sample.prompt} Short answer:" if sample.task == "vqa" else sample.prompt
        if has_image and self.spec.image_placeholder is not None:
            text = self.spec.image_placeholder.format(image_token=image_token_str(self)) + "\n" + text
        return text

    def wrap_target(self, sample: PromptSample) -> str:
        """The target text as appended after the prompt (leading space for raw prompts)."""
        return sample.target if self.uses_chat_template else " " + sample.target

    def _render_chat(self, messages: list[dict[str, Any]]) -> str:
        apply = getattr(self.processor, "apply_chat_template", None)
        if apply is not None and getattr(self.processor, "chat_template", None):
            return apply(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, add_generation_prompt=True, tokenize=False
        )

    def _add_special_tokens(self, text: str) -> bool:
        """Whether tokenizing the rendered prompt adds the tokenizer's special tokens (BOS).

        Raw prompts: yes. Chat prompts follow transformers: a tokenizer's chat template never adds
        special tokens (the template writes them); a processor adds them unless the rendered prompt
        already starts with BOS (``ProcessorMixin.apply_chat_template``).
        """
        if not self.uses_chat_template:
            return True
        if self.image_processor is None:
            return False
        bos = self.tokenizer.bos_token
        return not (bos is not None and text.startswith(str(bos)))

    def _encode_prompt(
        self, text: str, image: Image.Image | None
    ) -> tuple[list[int], dict[str, torch.Tensor]]:
        """Token ids of one prompt (image placeholders expanded) and its image tensors."""
        add_special = self._add_special_tokens(text)
        if self.image_processor is None:
            if image is not None:
                raise ValueError(
                    f"The {self.spec.model_type!r} backbone is text-only but a sample carries an image; drop the "
                    "image or use a multimodal model."
                )
            return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"]), {}
        if not self._manual_images:
            try:
                out = self.processor(
                    images=[image] if image is not None else None,
                    text=[text],
                    add_special_tokens=add_special,
                    return_tensors="pt",
                )
            except ImportError as exc:  # e.g. a processor whose image/video part needs torchvision
                logger.warning(
                    "The %s processor call failed (%s); expanding image placeholders with the image processor "
                    "and the %r rule instead.",
                    type(self.processor).__name__,
                    exc,
                    self.spec.image_token_rule,
                )
                self._manual_images = True
            else:
                ids = out["input_ids"][0].tolist()
                extras = {k: v for k, v in out.items() if k not in _TEXT_KEYS and isinstance(v, torch.Tensor)}
                return ids, extras
        return encode_with_manual_expansion(self, text, image, add_special_tokens=add_special)

    def encode_sample(self, sample: PromptSample) -> tuple[list[int], list[int], dict[str, torch.Tensor]]:
        """``(input_ids, labels, image tensors)`` of one sample, unpadded."""
        prompt_ids, extras = self._encode_prompt(self.wrap_prompt(sample), sample.image)
        target_ids = list(self.tokenizer(self.wrap_target(sample), add_special_tokens=False)["input_ids"])
        if not target_ids:
            raise ValueError(f"The target {sample.target!r} tokenizes to no tokens; give a non-empty answer.")
        return prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids, extras

    def build_batch(
        self, samples: Sequence[PromptSample], *, device: torch.device | str | None = None
    ) -> dict[str, torch.Tensor]:
        """Right-padded teacher-forced batch.

        Returns:
            ``input_ids``, ``attention_mask``, ``labels`` (``-100`` except the target tokens), and for
            samples with images the family's image inputs (``pixel_values`` plus e.g.
            ``image_grid_thw``, ``pixel_attention_mask``, ``image_sizes``), ready for ``model(**batch)``.
        """
        if len(samples) == 0:
            raise ValueError("build_batch needs at least one PromptSample.")
        for i, s in enumerate(samples):
            if not isinstance(s, PromptSample):
                raise ValueError(f"build_batch: sample {i} is a {type(s).__name__}, expected a PromptSample.")
        with_image = [s.image is not None for s in samples]
        if any(with_image) and not all(with_image) and not self.spec.mixed_batches:
            raise ValueError(
                f"The {self.spec.model_type!r} backbone cannot mix samples with and without images in one batch; "
                "build separate batches."
            )
        encoded = [self.encode_sample(s) for s in samples]
        length = max(len(ids) for ids, _, _ in encoded)
        batch_size = len(encoded)
        input_ids = torch.full((batch_size, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
        labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, labs, _) in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
            labels[row, : len(labs)] = torch.tensor(labs, dtype=torch.long)
        batch: dict[str, torch.Tensor] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
        }
        if self.spec.mm_token_type_ids:
            batch["mm_token_type_ids"] = self.image_token_mask(batch).to(torch.int32)
        images = self._collate_images([extras for _, _, extras in encoded])
        if images and self.spec.vision_tower is not None:
            # pixel values in the vision tower's dtype (a bf16 model fed fp32 pixels fails in its conv)
            vision_dtype = next(self.get_module("vision_tower").parameters()).dtype
            images = {k: v.to(vision_dtype) if v.is_floating_point() else v for k, v in images.items()}
        batch.update(images)
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        return batch

    def _collate_images(self, per_sample: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        present = [e for e in per_sample if e]
        if not present:
            return {}
        keys = sorted({k for e in present for k in e})
        if self.spec.image_batching == "concat":
            return {k: torch.cat([e[k] for e in present if k in e], dim=0) for k in keys}
        # "pad_images": (B, max_images, ...) with all-zero images where a sample has fewer (or none);
        # Idefics3-style forwards drop all-zero images before the vision tower.
        out: dict[str, torch.Tensor] = {}
        for k in keys:
            ref = next(e[k] for e in present if k in e)
            max_images = max(e[k].shape[1] for e in present if k in e)
            padded = ref.new_zeros((len(per_sample), max_images, *ref.shape[2:]))
            for row, e in enumerate(per_sample):
                if k in e:
                    padded[row, : e[k].shape[1]] = e[k][0]
            out[k] = padded
        return out

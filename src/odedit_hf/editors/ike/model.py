"""IKE tuner: holds the memory on the input embedding and prepends the context inside the model's forward.

:class:`IKEModel` registers a forward pre-hook and a forward hook (both with kwargs) on the wrapped
transformers model. For every row of ``input_ids`` the pre-hook builds the context -- the ``k``
demonstrations nearest to the row's prompt and the nearest edited fact(s) -- and inserts its tokens
right after the row's BOS (before the prompt, so an image span is never split), shifting the row to
the right; rows are right-padded to one length with ``attention_mask`` 0, so every real token keeps
positions ``0..n-1`` as in an unpadded forward. ``labels``, ``token_type_ids`` and ``mm_token_type_ids``
are shifted alike (``-100`` / 0 on the context). Demonstrations that carry an image (their span is in
their tokens) add its pixels to ``pixel_values`` in the order of the image spans of the final
``input_ids``, row-major (:meth:`IKEModel._with_demo_images`). The forward hook gathers the logits (and hidden states,
when returned) back to the ORIGINAL positions, so a caller scoring teacher-forced logits sees
``(B, T, V)`` for its own batch. With no fact in memory, with ``disable_adapter()``, or when no IKE
adapter is active, the forward is the base model's, bit for bit.

Retrieval needs the row's text: the prompt part of the row (up to the backbone's answer marker, e.g.
``Short answer:`` or the chat template's generation prompt, so the target tokens never choose the
context) is decoded with the backbone's tokenizer and embedded with the sentence encoder. That runtime
(tokenizer, markers) is not adapter state: :meth:`IKEModel.attach` sets it (``method.edit`` does; after
``PeftModel.from_pretrained`` call ``odedit_hf.editors.ike.attach(peft_model, backbone)``). A memory
with one fact and no demonstrations needs no retrieval and runs without it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from odedit_hf.editing.tuner import EditorTuner

from .config import IKEConfig
from .layer import _NOT_MERGEABLE, IMAGE_BUFFERS, MEMORY_BUFFERS, Embedding, IKELayer, unpad_row

logger = logging.getLogger(__name__)

__all__ = ["IKEModel", "IKERuntime", "RowContext"]

_PEFT_PREFIX = "base_model.model."
_SHIFTED = {"labels": -100, "token_type_ids": 0, "mm_token_type_ids": 0}
_REFUSED = ("inputs_embeds", "position_ids", "past_key_values", "cache_position")
_PER_IMAGE = ("image_sizes", "image_grid_thw", "pixel_attention_mask")  # not extended with demo images


@dataclass
class IKERuntime:
    """What the prefixing needs besides the adapter state: the backbone's tokenizer and prompt markers.

    Args:
        tokenizer: decodes a row's prompt for retrieval and encodes nothing at forward time.
        markers: token-id sequences that end a wrapped prompt (the answer marker of each task); a row's
            prompt ends after the last occurrence of any of them (the whole row when none occurs).
        skip_ids: token ids left out of a row's text (BOS, EOS, padding, image placeholders).
        image_token_id: the image placeholder token (``None`` for text-only backbones); the rows' own
            images are found by it when demonstrations add theirs to ``pixel_values``.
    """

    tokenizer: Any
    markers: list[list[int]] = field(default_factory=list)
    skip_ids: set[int] = field(default_factory=set)
    image_token_id: int | None = None

    def prompt_text(self, ids: Sequence[int]) -> str:
        """The decoded prompt part of one row's real tokens."""
        ids = list(ids)
        cut = len(ids)
        best = -1
        for marker in self.markers:
            n = len(marker)
            for start in range(len(ids) - n, -1, -1):
                if ids[start : start + n] == marker:
                    best = max(best, start + n)
                    break
        if best > 0:
            cut = best
        kept = [t for t in ids[:cut] if t not in self.skip_ids]
        return self.tokenizer.decode(kept, skip_special_tokens=True).strip()


@dataclass
class RowContext:
    """The context chosen for one row (for inspection and tests): memory indices and tokens, and the
    rows of the demonstrations' pixel store whose images the context carries, in span order."""

    facts: list[int]
    demos: list[int]
    ids: list[int]
    images: list[int] = field(default_factory=list)


class IKEModel(EditorTuner, BaseTuner):
    """IKE as a peft tuner: ``get_peft_model(model, IKEConfig(target_modules=[embedding name]))``.

    Merging raises (a context is not a weight delta); ``unload()`` removes the hooks and the layer.
    """

    prefix: str = "ike_"
    tuner_layer_cls = IKELayer
    target_module_mapping: dict[str, list[str]] = {}
    editor_label = "IKE"
    config_cls = IKEConfig
    layer_factory = Embedding
    base_types = (nn.Embedding,)
    base_hint = "target the model's input embedding (model.get_input_embeddings())"
    freeze_inactive = False

    def __init__(self, model: nn.Module, config: Any, adapter_name: str, **kwargs: Any) -> None:
        super().__init__(model, config, adapter_name, **kwargs)
        self.ike_runtime: IKERuntime | None = None
        self.last_contexts: list[RowContext] = []  # of the last prefixed forward, for inspection
        self._pending: torch.Tensor | None = None  # the index map of the forward in flight
        self._hooks = [
            self.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            self.model.register_forward_hook(self._post_hook, with_kwargs=True),
        ]

    # ------------------------------------------------------------------ peft plumbing

    def _check_merge_allowed(self) -> None:
        raise ValueError(_NOT_MERGEABLE)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad_(False)  # IKE trains nothing

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        for handle in getattr(self, "_hooks", []):
            handle.remove()
        self._hooks = []
        return super()._unload_and_optionally_merge(*args, **kwargs)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: PeftConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Resize the memory of ``adapter_name`` to the checkpoint's, then peft's remap."""
        for module_name, module in model.named_modules():
            if not isinstance(module, IKELayer) or adapter_name not in module.ike_fact_ids:
                continue
            short = module_name.removeprefix(_PEFT_PREFIX)
            for name in dict.fromkeys((module_name, _PEFT_PREFIX + short, short)):
                found = {b: state_dict.get(f"{name}.{b}") for b in MEMORY_BUFFERS}
                if all(v is not None for b, v in found.items() if b not in IMAGE_BUFFERS):
                    state = {
                        b: torch.zeros(v.shape, dtype=v.dtype) for b, v in found.items() if v is not None
                    }
                    module.load_memory(adapter_name, state)
                    break
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    # ------------------------------------------------------------------ runtime
    def attach(self, backbone: Any) -> IKERuntime:
        """Give the prefixing the backbone's tokenizer and answer markers (idempotent)."""
        from odedit_hf.backbones import PromptSample

        tokenizer = backbone.tokenizer
        sentinel = "zqxjkv"
        markers: list[list[int]] = []
        for task in ("vqa", "caption"):
            text = backbone.wrap_prompt(PromptSample(prompt=sentinel, target="x", task=task))
            after = text.split(sentinel)[-1] if sentinel in text else ""
            ids = list(tokenizer(after, add_special_tokens=False)["input_ids"]) if after.strip() else []
            if ids and ids not in markers:
                markers.append(ids)
        skip = {backbone.pad_token_id}
        for name in ("bos_token_id", "eos_token_id", "unk_token_id"):
            value = getattr(tokenizer, name, None)
            if value is not None and name != "unk_token_id":
                skip.add(int(value))
        image_token = backbone.image_token_id
        if image_token is not None:
            skip.add(int(image_token))
        self.ike_runtime = IKERuntime(
            tokenizer=tokenizer,
            markers=markers,
            skip_ids=skip,
            image_token_id=None if image_token is None else int(image_token),
        )
        return self.ike_runtime

    def ike_layer(self) -> tuple[IKELayer | None, str | None]:
        """The IKE layer and its active adapter, or ``(None, None)`` when IKE is off (disabled, merged
        away or no IKE adapter active)."""
        for module in self.model.modules():
            if isinstance(module, IKELayer):
                if module.disable_adapters:
                    return None, None
                for name in module.active_adapters:
                    if name in module.ike_fact_ids:
                        return module, name
                return None, None
        return None, None

    def _bos_id(self) -> int | None:
        if self.ike_runtime is not None:
            value = getattr(self.ike_runtime.tokenizer, "bos_token_id", None)
            return None if value is None else int(value)
        config = self.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        value = getattr(text, "bos_token_id", None)
        return None if value is None else int(value)

    def _max_length(self, layer: IKELayer, adapter: str) -> int | None:
        if layer.ike_max_length[adapter] is not None:
            return layer.ike_max_length[adapter]
        config = self.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        value = getattr(text, "max_position_embeddings", None)
        return int(value) if isinstance(value, int) else None

    # ------------------------------------------------------------------ retrieval
    def row_context(self, layer: IKELayer, adapter: str, real_ids: Sequence[int]) -> RowContext:
        """The context of one row (its real tokens): nearest demonstrations, best first, then the
        nearest fact(s), cut to the length budget by dropping the farthest demonstrations."""
        from .encoder import get_encoder

        n_facts, n_demos = layer.num_facts(adapter), layer.num_demos(adapter)
        per_input, k = layer.ike_facts_per_input[adapter], min(layer.ike_k[adapter], n_demos)
        query = None
        if n_facts > per_input or k > 0:
            if self.ike_runtime is None:
                raise ValueError(
                    "IKE needs the backbone's tokenizer to retrieve context for this input (the adapter was "
                    "loaded or built without it): call odedit_hf.editors.ike.attach(peft_model, backbone)"
                )
            text = self.ike_runtime.prompt_text(real_ids)
            query = get_encoder(layer.ike_encoder[adapter]).encode([text])[0]
        if n_facts > per_input:
            scores = layer.ike_fact_emb[adapter].float().cpu() @ query
            facts = sorted(torch.topk(scores, per_input).indices.tolist())  # memory order: older first
        else:
            facts = list(range(n_facts))
        demos: list[int] = []
        if k > 0:
            scores = layer.ike_demo_emb[adapter].float().cpu() @ query
            demos = torch.topk(scores, k).indices.tolist()  # best first (EasyEdit's order)
        fact_ids = [t for i in facts for t in unpad_row(layer.ike_fact_ids[adapter][i])]
        demo_ids = [unpad_row(layer.ike_demo_ids[adapter][i]) for i in demos]
        budget = self._max_length(layer, adapter)
        if budget is not None:
            room = budget - len(real_ids) - len(fact_ids)
            kept = 0
            for ids in demo_ids:
                if len(ids) > room:
                    break
                room -= len(ids)
                kept += 1
            if kept < len(demo_ids):
                logger.debug("IKE: %d of %d demonstrations fit in %d tokens", kept, len(demo_ids), budget)
            demos, demo_ids = demos[:kept], demo_ids[:kept]
            if room < 0:
                logger.warning(
                    "IKE: the edited fact(s) and the input need %d tokens, more than the %d the model takes; "
                    "the context is kept whole",
                    budget - room,
                    budget,
                )
        images = [i for i in (layer.demo_image(adapter, d) for d in demos) if i >= 0]
        return RowContext(
            facts=facts, demos=demos, ids=[t for ids in demo_ids for t in ids] + fact_ids, images=images
        )

    # ------------------------------------------------------------------ hooks
    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._pending = None
        layer, adapter = self.ike_layer()
        if layer is None or layer.num_facts(adapter) == 0:
            return None
        kwargs = dict(kwargs)
        if args:
            if "input_ids" in kwargs or len(args) > 1:
                raise ValueError(
                    "IKE: pass the model's inputs as keywords (input_ids=..., attention_mask=...)"
                )
            kwargs["input_ids"], args = args[0], ()
        for name in _REFUSED:
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"IKE prepends its context to input_ids in a full forward; {name} is not supported (no "
                    "inputs_embeds, explicit positions or KV cache: run a plain teacher-forced forward)"
                )
        input_ids = kwargs.get("input_ids")
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("IKE: the forward needs input_ids of shape (batch, length)")
        batch, length = input_ids.shape
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        bos = self._bos_id()
        contexts, inserts = [], []
        for r in range(batch):
            real = mask[r].nonzero().flatten()
            start = int(real[0]) if real.numel() else 0
            real_ids = input_ids[r, real].tolist()
            ctx = self.row_context(layer, adapter, real_ids)
            contexts.append(ctx)
            inserts.append(start + (1 if real_ids and bos is not None and real_ids[0] == bos else 0))
        self.last_contexts = contexts
        new_length = length + max(len(c.ids) for c in contexts)
        device = input_ids.device
        pad = int(input_ids[0, -1]) if bool((mask[:, -1] == 0).any()) else 0
        index = torch.empty(batch, length, dtype=torch.long, device=device)
        new_kwargs = {}
        for name, value in kwargs.items():
            shift = (
                name == "input_ids"
                or name == "attention_mask"
                or (
                    name in _SHIFTED
                    and isinstance(value, torch.Tensor)
                    and tuple(value.shape) == (batch, length)
                )
            )
            if not shift:
                new_kwargs[name] = value
        shifted = {"input_ids": (input_ids, pad), "attention_mask": (mask, 0)}
        shifted.update(
            {
                n: (kwargs[n], fill)
                for n, fill in _SHIFTED.items()
                if isinstance(kwargs.get(n), torch.Tensor) and tuple(kwargs[n].shape) == (batch, length)
            }
        )
        outs = {n: t.new_full((batch, new_length), fill) for n, (t, fill) in shifted.items()}
        for r, (ctx, at) in enumerate(zip(contexts, inserts)):
            n = len(ctx.ids)
            for name, (t, _fill) in shifted.items():
                out = outs[name]
                out[r, :at] = t[r, :at]
                out[r, at + n : length + n] = t[r, at:]
                if name == "input_ids":
                    out[r, at : at + n] = torch.as_tensor(ctx.ids, dtype=t.dtype, device=device)
                elif name == "attention_mask":
                    out[r, at : at + n] = 1
            positions = torch.arange(length, device=device)
            index[r] = torch.where(positions < at, positions, positions + n)
        new_kwargs.update(outs)
        if any(c.images for c in contexts):
            new_kwargs["pixel_values"] = self._with_demo_images(
                layer, adapter, input_ids, mask, kwargs, contexts, inserts
            )
        self._pending = index
        return args, new_kwargs

    def _with_demo_images(
        self,
        layer: IKELayer,
        adapter: str,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        kwargs: dict[str, Any],
        contexts: list[RowContext],
        inserts: list[int],
    ) -> torch.Tensor:
        """``pixel_values`` with the demonstrations' images inserted: the model fills the image spans of
        ``input_ids`` row-major with the images in order, so row by row the row's own images whose span
        starts before the insertion point, the context's images (in span order), then the row's other
        images."""
        for name in _PER_IMAGE:
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"IKE: demonstrations with images cannot be added to a forward that has {name}; run it "
                    "with demo_images='off'"
                )
        own = kwargs.get("pixel_values")
        store = layer.ike_demo_pixels[adapter]
        token = None if self.ike_runtime is None else self.ike_runtime.image_token_id
        if token is None:
            raise ValueError(
                "IKE: the memory holds demonstration images but the runtime has no image token; call "
                "odedit_hf.editors.ike.attach(peft_model, backbone) with the multimodal backbone"
            )
        image_tokens = (input_ids == token) & (mask != 0)
        n_own = 0 if own is None else int(own.shape[0])
        total = int(image_tokens.sum())
        if (n_own == 0) != (total == 0) or (n_own and total % n_own):
            raise ValueError(
                f"IKE: the batch has {total} image tokens for {n_own} image(s) in pixel_values; IKE needs the "
                "same number of placeholder tokens for every image to place the demonstrations' images"
            )
        per = total // n_own if n_own else 0
        ref = own if own is not None else store
        pieces: list[torch.Tensor] = []
        offset = 0
        for r, (ctx, at) in enumerate(zip(contexts, inserts)):
            positions = image_tokens[r].nonzero().flatten()
            count = positions.numel() // per if per else 0
            if per and positions.numel() % per:
                raise ValueError(
                    f"IKE: row {r} has {positions.numel()} image tokens, not a multiple of the {per} per image"
                )
            before = int((positions[::per] < at).sum()) if count else 0
            mine = own[offset : offset + count] if own is not None else ref[:0]
            offset += count
            demo = store[torch.as_tensor(ctx.images, dtype=torch.long, device=store.device)]
            pieces += [mine[:before], demo.to(device=ref.device, dtype=ref.dtype), mine[before:]]
        return torch.cat(pieces)

    def _post_hook(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        index, self._pending = self._pending, None
        if index is None:
            return None

        def gather(t: torch.Tensor) -> torch.Tensor:
            return t.gather(1, index.unsqueeze(-1).expand(-1, -1, t.shape[-1]).to(t.device))

        if getattr(output, "logits", None) is not None:
            output["logits"] = gather(output.logits)
        hidden = getattr(output, "hidden_states", None)
        if isinstance(hidden, (tuple, list)):
            output["hidden_states"] = tuple(gather(h) for h in hidden)
        return output

"""Image-placeholder expansion without the family's full processor.

The Qwen2/2.5/3-VL and SmolVLM processors pull in a video processor that needs torchvision. When a
full processor is not available (or its call fails with an ``ImportError``), odedit-hf builds the
inputs from the image processor alone and expands each image placeholder in the text to the number
of tokens the family's forward expects, following the same rule as the family's processor:

* ``qwen_vl``: ``image_grid_thw.prod() // merge_size**2`` copies of the image token;
* ``idefics3`` (Idefics3, SmolVLM): ``<fake_token_around_image>`` + ``<global-img>`` (+ row/column
  tags when the image is split) + ``image_seq_len`` image tokens per tile,
  ``image_seq_len = (image_size // patch_size)**2 // scale_factor**2``;
* ``llava``: ``(H // patch) * (W // patch)`` tokens (+1 for a CLS token with the ``"full"`` strategy);
* ``blip2``: ``num_query_tokens`` image tokens prepended to the prompt.

A user with a real Hub processor never reaches this path: :class:`~odedit_hf.backbones.Backbone`
calls the processor itself.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from PIL import Image

    from odedit_hf.backbones.backbone import Backbone

logger = logging.getLogger(__name__)

__all__ = ["ImageTextProcessor", "encode_with_manual_expansion", "image_token_str"]


class ImageTextProcessor:
    """A minimal processor: an image processor, a tokenizer, an image token and a chat template.

    Used for families whose ``ProcessorMixin`` cannot be built here (it needs torchvision).
    :class:`~odedit_hf.backbones.Backbone` expands the image placeholders itself for it.

    Args:
        image_processor: the family's image processor (e.g. ``Qwen2VLImageProcessorPil``).
        tokenizer: the family's tokenizer; it must know the image token.
        image_token: the placeholder token one image expands from (e.g. ``"<|image_pad|>"``).
        chat_template: a Jinja chat template rendering ``{"type": "image"}`` entries as the family's
            placeholder, or ``None`` for raw prompts.
    """

    def __init__(
        self, image_processor: Any, tokenizer: Any, *, image_token: str, chat_template: str | None = None
    ):
        if image_token not in tokenizer.get_vocab():
            raise ValueError(
                f"ImageTextProcessor: the tokenizer does not know the image token {image_token!r}; add it as a "
                "special token first."
            )
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.chat_template = chat_template

    def __repr__(self) -> str:
        return (
            f"ImageTextProcessor(image_processor={type(self.image_processor).__name__}, "
            f"tokenizer={type(self.tokenizer).__name__}, image_token={self.image_token!r})"
        )


def image_token_str(backbone: Backbone) -> str:
    """The image placeholder token as a string (from the processor, the tokenizer or the config's id)."""
    token = getattr(backbone.processor, "image_token", None) or getattr(
        backbone.tokenizer, "image_token", None
    )
    if token is None:
        token = backbone.tokenizer.convert_ids_to_tokens(backbone.image_token_id)
    return str(getattr(token, "content", token))


def _expand(text: str, token: str, replacement: str, model_type: str) -> str:
    if text.count(token) != 1:
        raise ValueError(
            f"Expected exactly one {token!r} placeholder in the {model_type!r} prompt for one image, found "
            f"{text.count(token)}: {text[:200]!r}. Check the chat template or the spec's image_placeholder."
        )
    return text.replace(token, replacement)


def encode_with_manual_expansion(
    backbone: Backbone, text: str, image: Image.Image | None, *, add_special_tokens: bool
) -> tuple[list[int], dict[str, torch.Tensor]]:
    """Token ids of ``text`` with its image placeholder expanded, and the image tensors of ``image``."""
    tokenizer = backbone.tokenizer
    spec = backbone.spec
    if image is None:
        return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]), {}
    config = backbone.base_model.config
    token = image_token_str(backbone)
    rule = spec.image_token_rule
    if rule == "qwen_vl":
        images = backbone.image_processor(images=[image], return_tensors="pt")
        merge = int(
            getattr(backbone.image_processor, "merge_size", None) or config.vision_config.spatial_merge_size
        )
        n = int(images["image_grid_thw"][0].prod()) // merge**2
        text = _expand(text, token, token * n, spec.model_type)
        extras = {"pixel_values": images["pixel_values"], "image_grid_thw": images["image_grid_thw"]}
    elif rule == "idefics3":
        images = backbone.image_processor(images=[[image]], return_tensors="pt", return_row_col_info=True)
        vision = config.vision_config
        seq_len = int((vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2)
        rows, cols = int(images["rows"][0][0]), int(images["cols"][0][0])
        fake, glob = "<fake_token_around_image>", "<global-img>"
        tile = token * seq_len
        if rows == 0 and cols == 0:
            expansion = f"{fake}{glob}{tile}{fake}"
        else:
            expansion = "".join(
                "".join(f"{fake}<row_{r + 1}_col_{c + 1}>{tile}" for c in range(cols)) + "\n"
                for r in range(rows)
            )
            expansion += f"\n{fake}{glob}{tile}{fake}"
        text = _expand(text, token, expansion, spec.model_type)
        extras = {k: images[k] for k in ("pixel_values", "pixel_attention_mask") if k in images}
    elif rule == "llava":
        images = backbone.image_processor(images=[image], return_tensors="pt")
        height, width = images["pixel_values"].shape[-2:]
        patch = config.vision_config.patch_size
        n = (height // patch) * (width // patch)
        if getattr(config, "vision_feature_select_strategy", "default") != "default":
            n += 1  # the CLS token is kept with the "full" strategy
        text = _expand(text, token, token * n, spec.model_type)
        extras = {"pixel_values": images["pixel_values"]}
    elif rule == "blip2":
        images = backbone.image_processor(images=[image], return_tensors="pt")
        text = token * int(config.num_query_tokens) + text
        extras = {"pixel_values": images["pixel_values"]}
        # BLIP-2's processor tokenizes the image tokens separately and prepends them before BOS.
        ids = list(tokenizer(token * int(config.num_query_tokens), add_special_tokens=False)["input_ids"])
        ids += list(
            tokenizer(
                text[len(token) * int(config.num_query_tokens) :], add_special_tokens=add_special_tokens
            )["input_ids"]
        )
        return ids, extras
    else:
        raise ValueError(
            f"The {spec.model_type!r} backbone spec has image_token_rule={rule!r}, so odedit-hf cannot expand image "
            "placeholders itself; pass the family's full processor (AutoProcessor.from_pretrained(...))."
        )
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]), extras

"""The world's word-level tokenizer, chat template and LLaVA processor, all built offline.

Every word of the world (template words, names, answers, the chat markers) is one token, so an answer
is one or two tokens and the tiny model spends its capacity on facts, not on spelling.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .render import IMAGE_SIZE
from .spec import WorldSpec

if TYPE_CHECKING:
    from transformers import LlavaProcessor

logger = logging.getLogger(__name__)

__all__ = ["CHAT_TEMPLATE", "IMAGE_TOKEN", "PATCH_SIZE", "build_processor", "build_tokenizer"]

IMAGE_TOKEN = "<image>"
#: Vision-tower patch size: a 32 x 32 image is 2 x 2 patches (+ CLS, kept by the "full" strategy), so
#: each patch sees one quadrant of the (roughly centred) object: shape becomes a patch-local feature,
#: which a tiny ViT learns in a few hundred steps (measured: 0.98 attribute accuracy on unseen
#: renderings after 500 steps against 0.93 with 8-pixel patches, at half the cost).
PATCH_SIZE = 16

#: The chat template saved with the processor. A user turn renders as
#: ``<s>user : <image> {question} assistant :`` (``add_generation_prompt=True``); the answer follows.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }} :"
    "{% if message['content'] is string %} {{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %} <image>{% elif item['type'] == 'text' %} {{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %} {{ eos_token }}{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def build_tokenizer(world: WorldSpec) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` trained on every string of ``world``.

    Special tokens: ``<pad> <s> </s> <unk>`` and the image token (``tokenizer.image_token``).
    """
    from odedit_hf.testing import train_tokenizer

    corpus = [*world.all_text(), "user : assistant :", "system :"]
    tokenizer = train_tokenizer(
        corpus, extra_special_tokens={"image_token": IMAGE_TOKEN}, kind="wordlevel", add_bos=True
    )
    unknown = [
        w
        for text in corpus
        for w in text.split()
        if tokenizer.convert_tokens_to_ids(w) == tokenizer.unk_token_id
    ]
    if unknown:
        raise ValueError(f"world tokenizer: words missing from the vocabulary: {sorted(set(unknown))[:10]}")
    return tokenizer


def build_processor(world: WorldSpec) -> LlavaProcessor:
    """The world's ``LlavaProcessor``: a 32 x 32 CLIP image processor, the world tokenizer, the chat template."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(world),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )

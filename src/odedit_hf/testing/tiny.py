"""Tiny configs of the real transformers classes of every supported family, built offline.

``tiny_backbone("llava")`` returns a :class:`~odedit_hf.backbones.Backbone` around a randomly
initialised ``LlavaForConditionalGeneration`` with two decoder layers, hidden size 32 and 16x16
images, and a processor made from kwargs around a locally trained word-level tokenizer. Everything
is deterministic from ``seed`` and takes well under a second once transformers is imported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from odedit_hf.backbones import Backbone, ImageTextProcessor
from odedit_hf.testing.tokenizer import train_tokenizer

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_CORPUS", "TINY_MODEL_TYPES", "tiny_backbone", "tiny_image"]

#: Words every tiny tokenizer knows (prompt wrappers, chat roles, a few questions and answers).
DEFAULT_CORPUS: tuple[str, ...] = (
    "Question: what is the color of the sky? Short answer: blue",
    "Question: what is shown in the picture? Short answer: a red square",
    "Question: what is the capital of France? Short answer: Paris",
    "Question: which animal is this? Short answer: a cat dog bird fish",
    "Describe the image . A photo of a green circle on a white background",
    "User: Assistant: USER: ASSISTANT: user assistant system",
    "yes no one two three four five red green blue yellow black white square circle triangle",
    "London Berlin Rome Madrid Tokyo big small left right top bottom",
)

# Hidden sizes and layer counts are tiny on purpose; the comments give the released models' values.
_TEXT = {
    "hidden_size": 32,  # 4096 in LLaVA-1.5-7B's Llama
    "intermediate_size": 64,  # 11008
    "num_hidden_layers": 2,  # 32 in the real model
    "num_attention_heads": 4,  # 32
    "num_key_value_heads": 2,  # 32
    "max_position_embeddings": 512,  # 4096
}

_LLAVA_CHAT = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}{{ ' ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
_QWEN_CHAT = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_IDEFICS3_CHAT = (
    "{{ '<|im_start|>' }}{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<end_of_utterance>\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
_QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"]


def tiny_image(seed: int = 0, size: int = 16):
    """A deterministic RGB ``PIL.Image`` of ``size x size`` pixels (random colours from ``seed``)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8), mode="RGB")


def _text_config_kwargs(tokenizer: Any, overrides: Mapping[str, Any]) -> dict[str, Any]:
    return {
        **_TEXT,
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **overrides,
    }


def _llava(corpus: Sequence[str], chat: bool, text: Mapping[str, Any]) -> tuple[Any, Any]:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = train_tokenizer(corpus, extra_special_tokens={"image_token": "<image>"})
    vision = CLIPVisionConfig(
        hidden_size=32,  # 1024 in CLIP ViT-L/14-336
        intermediate_size=64,  # 4096
        num_hidden_layers=2,  # 24
        num_attention_heads=2,  # 16
        image_size=16,  # 336
        patch_size=4,  # 14
        projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**_text_config_kwargs(tok, text)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=16,  # (16 / 4) ** 2 patches, CLS dropped by the "default" strategy
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessorPil(
        size={"height": 16, "width": 16}, crop_size={"height": 16, "width": 16}, do_center_crop=False
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=_LLAVA_CHAT if chat else None,
    )
    return model, processor


def _llama(corpus: Sequence[str], chat: bool, text: Mapping[str, Any]) -> tuple[Any, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_tokenizer(corpus)
    if chat:
        tok.chat_template = _LLAVA_CHAT
    return LlamaForCausalLM(LlamaConfig(**_text_config_kwargs(tok, text))), tok


def _opt_config_kwargs(tokenizer: Any, overrides: Mapping[str, Any]) -> dict[str, Any]:
    kwargs = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,  # 2560 in OPT-2.7B (BLIP-2's language model)
        "ffn_dim": 64,  # 10240
        "num_hidden_layers": 2,  # 32 in the real model
        "num_attention_heads": 4,  # 32
        "max_position_embeddings": 512,  # 2048
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **overrides,
    }
    kwargs.setdefault("word_embed_proj_dim", kwargs["hidden_size"])  # no project_in/out, as OPT-2.7B
    return kwargs


def _opt(corpus: Sequence[str], chat: bool, text: Mapping[str, Any]) -> tuple[Any, Any]:
    from transformers import OPTConfig, OPTForCausalLM

    tok = train_tokenizer(corpus)
    if chat:
        tok.chat_template = _LLAVA_CHAT
    return OPTForCausalLM(OPTConfig(**_opt_config_kwargs(tok, text))), tok


def _qwen2(corpus: Sequence[str], chat: bool, text: Mapping[str, Any]) -> tuple[Any, Any]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = train_tokenizer(corpus, extra_special_tokens=_QWEN_SPECIALS, add_bos=False)  # Qwen adds no BOS
    if chat:
        tok.chat_template = _QWEN_CHAT
    return Qwen2ForCausalLM(Qwen2Config(**_text_config_kwargs(tok, text))), tok


def _blip2(corpus: Sequence[str], chat: bool, text: Mapping[str, Any]) -> tuple[Any, Any]:
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, OPTConfig
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tok = train_tokenizer(corpus)
    image_processor = BlipImageProcessorPil(size={"height": 16, "width": 16})
    # Blip2Processor adds "<image>" to the tokenizer itself (it expects an AddedToken, not a str attribute)
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tok, num_query_tokens=4)
    config = Blip2Config(
        vision_config={
            "hidden_size": 32,  # 1408 in EVA ViT-g
            "intermediate_size": 64,  # 6144
            "num_hidden_layers": 2,  # 39
            "num_attention_heads": 2,  # 16
            "image_size": 16,  # 224
            "patch_size": 4,  # 14
        },
        qformer_config={
            "hidden_size": 32,  # 768
            "num_hidden_layers": 2,  # 12
            "num_attention_heads": 2,  # 12
            "intermediate_size": 64,  # 3072
            "encoder_hidden_size": 32,  # = the vision hidden size
            "vocab_size": 64,
        },
        text_config=OPTConfig(**_opt_config_kwargs(tok, text)),
        num_query_tokens=4,  # 32
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    model = Blip2ForConditionalGeneration(config)
    if chat:
        processor.chat_template = _LLAVA_CHAT.replace("<image>\n", "")
    return model, processor


def _qwen_image_processor(patch: int = 4) -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # 16x16 images -> grid (1, 4, 4) patches -> 4 image tokens after the 2x2 merge
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32},
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
    )


def _qwen_vl_processor(tok: Any, chat: bool) -> ImageTextProcessor:
    # Qwen2VLProcessor needs a torchvision video processor: use the image processor alone.
    return ImageTextProcessor(
        _qwen_image_processor(), tok, image_token="<|image_pad|>", chat_template=_QWEN_CHAT if chat else None
    )


def _qwen_vl_ids(tok: Any) -> dict[str, int]:
    ids = {
        "image_token_id": tok.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tok.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tok.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tok.convert_tokens_to_ids("<|vision_end|>"),
    }
    if tok.unk_token_id in ids.values():
        raise ValueError(f"tiny Qwen-VL tokenizer is missing a vision token: {ids}.")
    return ids


def _qwen_vl_tokenizer(corpus: Sequence[str]) -> Any:
    # Qwen tokenizers add no BOS
    return train_tokenizer(corpus, extra_special_tokens=[*_QWEN_SPECIALS, "<|image_pad|>"], add_bos=False)


def _qwen_vl_text_kwargs(tok: Any, text: Mapping[str, Any]) -> dict[str, Any]:
    # multimodal RoPE over (time, height, width): mrope_section must sum to head_dim / 2
    return {
        **_text_config_kwargs(tok, text),
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]},
    }


def _qwen2_vl(corpus: Sequence[str], chat: bool, text: Mapping[str, Any]) -> tuple[Any, Any]:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tok = _qwen_vl_tokenizer(corpus)
    text_kwargs = _qwen_vl_text_kwargs(tok, text)
    config = Qwen2VLConfig(
        text_config=text_kwargs,
        vision_config={
            "depth": 2,  # 32 in the real model
            "embed_dim": 32,  # 1280
            "hidden_size": 32,  # = the text hidden size (merger output)
            "num_heads": 2,  # 16
            "patch_size": 4,  # 14
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        **_qwen_vl_ids(tok),
    )
    return Qwen2VLForConditionalGeneration(config), _qwen_vl_processor(tok, chat)


def _qwen2_5_vl(corpus: Sequence[str], chat: bool, text: Mapping[str, Any]) -> tuple[Any, Any]:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = _qwen_vl_tokenizer(corpus)
    text_kwargs = _qwen_vl_text_kwargs(tok, text)
    config = Qwen2_5_VLConfig(
        text_config=text_kwargs,
        vision_config={
            "depth": 2,  # 32 in the real model
            "hidden_size": 32,  # 1280
            "intermediate_size": 64,  # 3420
            "num_heads": 2,  # 16
            "patch_size": 4,  # 14
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 16,  # 112: a 2x2 window of merged patches
            "fullatt_block_indexes": [1],  # (7, 15, 23, 31)
            "out_hidden_size": 32,  # = the text hidden size
        },
        **_qwen_vl_ids(tok),
    )
    return Qwen2_5_VLForConditionalGeneration(config), _qwen_vl_processor(tok, chat)


def _qwen3_vl(corpus: Sequence[str], chat: bool, text: Mapping[str, Any]) -> tuple[Any, Any]:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tok = _qwen_vl_tokenizer(corpus)
    text_kwargs = {**_qwen_vl_text_kwargs(tok, text), "head_dim": 16}
    text_kwargs["rope_parameters"]["mrope_interleaved"] = True
    config = Qwen3VLConfig(
        text_config=text_kwargs,
        vision_config={
            "depth": 2,  # 27 in the real model
            "hidden_size": 32,  # 1152
            "intermediate_size": 64,  # 4304
            "num_heads": 2,  # 16
            "patch_size": 4,  # 16
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 32,  # = the text hidden size
            "num_position_embeddings": 16,  # 2304: a 4x4 grid of learned positions
            "deepstack_visual_indexes": [0],  # (8, 16, 24)
        },
        **_qwen_vl_ids(tok),
    )
    return Qwen3VLForConditionalGeneration(config), _qwen_vl_processor(tok, chat)


_IDEFICS3_SPECIALS = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "<|im_start|>"]


def _idefics3_parts(corpus: Sequence[str]) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    tok = train_tokenizer(corpus, extra_special_tokens={"image_token": "<image>"})
    tok.add_special_tokens(
        {"additional_special_tokens": _IDEFICS3_SPECIALS}, replace_extra_special_tokens=False
    )
    vision = {
        "hidden_size": 32,  # 1152 in SigLIP-so400m
        "intermediate_size": 64,  # 3072
        "num_hidden_layers": 2,  # 12 (27 in the released model)
        "num_attention_heads": 2,  # 16
        "image_size": 16,  # 364
        "patch_size": 4,  # 14
    }
    # image_seq_len = (16 / 4) ** 2 / scale_factor ** 2 = 4 image tokens per tile
    kwargs = {"image_token_id": tok.convert_tokens_to_ids("<image>"), "scale_factor": 2}
    return tok, vision, kwargs


def _idefics3_image_processor_kwargs() -> dict[str, Any]:
    return {"do_image_splitting": False, "size": {"longest_edge": 16}, "max_image_size": {"longest_edge": 16}}


def _idefics3(corpus: Sequence[str], chat: bool, text: Mapping[str, Any]) -> tuple[Any, Any]:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, LlamaConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tok, vision, kwargs = _idefics3_parts(corpus)
    config = Idefics3Config(
        vision_config=vision, text_config=LlamaConfig(**_text_config_kwargs(tok, text)), **kwargs
    )
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(**_idefics3_image_processor_kwargs()),
        tokenizer=tok,
        image_seq_len=4,
        chat_template=_IDEFICS3_CHAT if chat else None,
    )
    return Idefics3ForConditionalGeneration(config), processor


def _smolvlm(corpus: Sequence[str], chat: bool, text: Mapping[str, Any]) -> tuple[Any, Any]:
    from transformers import LlamaConfig, SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    tok, vision, kwargs = _idefics3_parts(corpus)
    config = SmolVLMConfig(
        vision_config=vision, text_config=LlamaConfig(**_text_config_kwargs(tok, text)), **kwargs
    )
    # SmolVLMProcessor needs a torchvision video processor: use the image processor alone.
    processor = ImageTextProcessor(
        SmolVLMImageProcessorPil(**_idefics3_image_processor_kwargs()),
        tok,
        image_token="<image>",
        chat_template=_IDEFICS3_CHAT if chat else None,
    )
    return SmolVLMForConditionalGeneration(config), processor


_BUILDERS: dict[str, tuple[Callable[[Sequence[str], bool, Mapping[str, Any]], tuple[Any, Any]], bool]] = {
    # model_type -> (builder, chat template by default: as the released checkpoints ship)
    "llava": (_llava, False),
    "blip-2": (_blip2, False),
    "qwen2_vl": (_qwen2_vl, True),
    "qwen2_5_vl": (_qwen2_5_vl, True),
    "qwen3_vl": (_qwen3_vl, True),
    "idefics3": (_idefics3, True),
    "smolvlm": (_smolvlm, True),
    "llama": (_llama, False),
    "opt": (_opt, False),
    "qwen2": (_qwen2, True),
}

TINY_MODEL_TYPES: tuple[str, ...] = tuple(_BUILDERS)


def tiny_backbone(
    model_type: str,
    *,
    seed: int = 0,
    chat_template: bool | None = None,
    texts: Sequence[str] | None = None,
    text_config: Mapping[str, Any] | None = None,
) -> Backbone:
    """A :class:`~odedit_hf.backbones.Backbone` around a tiny random model of the real class.

    Args:
        model_type: one of :data:`TINY_MODEL_TYPES` (the registry's ``model_type`` values).
        seed: seeds the weights (the global RNG state is restored afterwards).
        chat_template: give the processor a chat template (``True``), none (``False``), or the
            family's usual choice (``None``: chat for Qwen-VL, Idefics3, SmolVLM and Qwen2; raw prompts
            for LLaVA, BLIP-2, Llama and OPT).
        texts: extra corpus for the tokenizer, so that the words a test uses get their own ids
            (unknown words map to ``<unk>``).
        text_config: overrides for the language model's config kwargs (e.g.
            ``{"hidden_size": 64, "num_hidden_layers": 4}``); not for the Qwen-VL families, whose tiny
            rotary layout is tied to the default sizes.
    """
    if model_type not in _BUILDERS:
        raise ValueError(
            f"tiny_backbone: no tiny config for model_type {model_type!r}; choose one of {', '.join(_BUILDERS)}."
        )
    if text_config and model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        raise ValueError(
            f"tiny_backbone({model_type!r}): text_config overrides are not supported for the Qwen-VL families "
            "(their M-RoPE sections are sized for the default head size); build the config yourself."
        )
    builder, chat_default = _BUILDERS[model_type]
    chat = chat_default if chat_template is None else bool(chat_template)
    corpus = [*DEFAULT_CORPUS, *(texts or ())]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = builder(corpus, chat, dict(text_config or {}))
    model.eval()
    return Backbone(model, processor)

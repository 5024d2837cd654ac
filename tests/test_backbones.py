"""Backbone matrix: one row per supported family, one common set of checks (STYLE.md points 8-9).

Every row builds a tiny config of the real transformers class (``odedit_hf.testing.tiny_backbone``),
once per session, and checks: registry paths resolve; labels cover exactly the target tokens; a
forward + backward gives a finite loss and finite, non-zero gradients on the FFN projections the
registry names; hidden-state shapes; the image-token count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from odedit_hf.backbones import (
    IGNORE_INDEX,
    Backbone,
    BackboneSpec,
    PromptSample,
    UnsupportedModelError,
    get_backbone_spec,
    register_backbone,
    shift_logits_labels,
    supported_model_types,
    unregister_backbone,
)
from odedit_hf.testing import tiny_backbone, tiny_image


@dataclass(frozen=True)
class Row:
    model_type: str
    image_tokens_per_image: int  # placeholder tokens the family's forward expects for one tiny 16x16 image
    chat: bool | None = None  # None: the family's usual choice (see tiny_backbone)

    @property
    def id(self) -> str:
        return self.model_type + ("" if self.chat is None else f"-chat={self.chat}")


ROWS = [
    Row("llava", image_tokens_per_image=16),  # (16 / 4) ** 2 CLIP patches, CLS dropped ("default")
    Row("llava", image_tokens_per_image=16, chat=True),
    Row("blip-2", image_tokens_per_image=4),  # num_query_tokens
    Row("qwen2_vl", image_tokens_per_image=4),  # grid (1, 4, 4) // merge 2 ** 2
    Row("qwen2_vl", image_tokens_per_image=4, chat=False),
    Row("qwen2_5_vl", image_tokens_per_image=4),
    Row("qwen3_vl", image_tokens_per_image=4),
    Row("idefics3", image_tokens_per_image=4),  # (16 / 4) ** 2 // scale_factor 2 ** 2
    Row("idefics3", image_tokens_per_image=4, chat=False),
    Row("smolvlm", image_tokens_per_image=4),
    Row("llama", image_tokens_per_image=0),
    Row("llama", image_tokens_per_image=0, chat=True),
    Row("opt", image_tokens_per_image=0),
    Row("qwen2", image_tokens_per_image=0),
]
IDS = [r.id for r in ROWS]
MULTIMODAL_ROWS = [r for r in ROWS if r.image_tokens_per_image > 0]

QUESTION, ANSWER = "what is the color of the sky?", "blue"
TEXT_QUESTION, TEXT_ANSWER = "what is the capital of France?", "London Berlin"


@pytest.fixture(scope="session")
def backbones() -> dict[str, Backbone]:
    return {}


def _get(backbones: dict[str, Backbone], model_type: str, chat: bool | None = None) -> Backbone:
    key = f"{model_type}:{chat}"
    if key not in backbones:
        backbones[key] = tiny_backbone(model_type, seed=0, chat_template=chat)
    return backbones[key]


def _samples(bb: Backbone) -> list[PromptSample]:
    # multimodal families: one image sample and one text-only sample in the same batch
    first = PromptSample(QUESTION, ANSWER, image=tiny_image(1) if bb.spec.multimodal else None)
    return [first, PromptSample(TEXT_QUESTION, TEXT_ANSWER)]


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_registry_paths_resolve(backbones, row: Row) -> None:
    bb = _get(backbones, row.model_type, row.chat)
    spec = get_backbone_spec(bb.model)
    assert spec.model_type == row.model_type == bb.model.config.model_type
    assert isinstance(bb.decoder_layers(), nn.ModuleList)
    assert bb.num_layers() == 2
    assert isinstance(bb.get_module("lm_head"), nn.Linear)
    assert bb.get_module("lm_head").out_features == bb.model.config.get_text_config().vocab_size
    assert isinstance(bb.get_module("final_norm"), nn.Module)
    assert bb.get_module("lm_head") is bb.model.get_output_embeddings()
    if spec.multimodal:
        tower, projector = bb.get_module("vision_tower"), bb.get_module("projector")
        assert sum(p.numel() for p in tower.parameters()) > 0
        assert sum(p.numel() for p in projector.parameters()) > 0
    else:
        with pytest.raises(ValueError, match="text-only"):
            bb.get_module("vision_tower")
    names = bb.ffn_module_names()
    assert len(names) == 2 * len(spec.ffn_projections)
    modules = dict(bb.model.named_modules())
    for name in names:
        assert isinstance(modules[name], nn.Linear), name
    default = bb.ffn_module_names(bb.default_edit_layers(), spec.default_edit_projections)
    assert default == bb.default_edit_module_names()
    assert set(default) <= set(names) and default
    assert bb.ffn_module_names(layers=-1, projections=spec.default_edit_projections[0]) == [
        f"{spec.layers}.1.{spec.default_edit_projections[0]}"
    ]
    with pytest.raises(ValueError, match="out of range"):
        bb.ffn_module_names(layers=[2])
    with pytest.raises(ValueError, match="has no module"):
        bb.ffn_module_names(projections=["mlp.nope"])


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_batch_labels_forward_backward(backbones, row: Row) -> None:
    bb = _get(backbones, row.model_type, row.chat)
    samples = _samples(bb)
    batch = bb.build_batch(samples)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape and ids.shape[0] == len(samples)
    for i, sample in enumerate(samples):
        # labels cover exactly the target's own tokenization, at the end of the unpadded row
        expected = bb.tokenizer(bb.wrap_target(sample), add_special_tokens=False)["input_ids"]
        labelled = labels[i][labels[i] != IGNORE_INDEX].tolist()
        assert labelled == expected
        assert bb.tokenizer.decode(labelled).strip() == sample.target
        length = int(mask[i].sum())
        assert mask[i, :length].all() and not mask[i, length:].any()  # right padding
        assert ids[i, length - len(expected) : length].tolist() == expected
        assert (labels[i, : length - len(expected)] == IGNORE_INDEX).all()
        assert (labels[i, length:] == IGNORE_INDEX).all()
        assert bb.tokenizer.unk_token_id not in ids[i, :length].tolist()
    # image tokens: exactly the expected number per image sample, none in text-only rows
    image_mask = bb.image_token_mask(batch)
    assert image_mask.shape == ids.shape and image_mask.dtype == torch.bool
    expected_counts = [row.image_tokens_per_image if s.image is not None else 0 for s in samples]
    assert image_mask.sum(dim=1).tolist() == expected_counts
    if bb.spec.multimodal:
        assert "pixel_values" in batch
    else:
        assert set(batch) == {"input_ids", "attention_mask", "labels"}

    bb.model.zero_grad(set_to_none=True)
    captured: list[torch.Tensor] = []
    hook = bb.get_module("final_norm").register_forward_hook(lambda _m, _i, o: captured.append(o))
    try:
        out = bb.forward(batch, output_hidden_states=True)
    finally:
        hook.remove()
    assert torch.isfinite(out.loss)
    hidden = bb.last_hidden_states(out)
    assert hidden.shape == (*ids.shape, bb.model.config.get_text_config().hidden_size)
    # the registry's final norm is the one the model runs last, and its output is the last hidden state
    assert len(captured) == 1 and torch.equal(captured[0], hidden)
    assert torch.allclose(bb.get_module("lm_head")(hidden), out.logits, atol=1e-5)
    # our own loss on the shifted logits equals the model's
    logits, shifted = shift_logits_labels(out.logits, labels)
    ours = nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE_INDEX
    )
    assert math.isclose(ours.item(), out.loss.item(), rel_tol=1e-4)
    out.loss.backward()
    modules = dict(bb.model.named_modules())
    for name in bb.ffn_module_names():
        grad = modules[name].weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


@pytest.mark.parametrize("row", MULTIMODAL_ROWS, ids=[r.id for r in MULTIMODAL_ROWS])
def test_image_only_and_text_only_batches(backbones, row: Row) -> None:
    bb = _get(backbones, row.model_type, row.chat)
    only_images = bb.build_batch([PromptSample(QUESTION, ANSWER, image=tiny_image(s)) for s in (1, 2)])
    assert bb.image_token_mask(only_images).sum(dim=1).tolist() == [row.image_tokens_per_image] * 2
    only_text = bb.build_batch([PromptSample(TEXT_QUESTION, TEXT_ANSWER)])
    assert "pixel_values" not in only_text
    with torch.no_grad():
        for batch in (only_images, only_text):
            out = bb.forward(batch, output_hidden_states=True)
            assert torch.isfinite(out.loss)
            assert bb.last_hidden_states(out).shape[:2] == batch["input_ids"].shape


def test_llava_prompt_wrapping_chat_and_raw(backbones) -> None:
    raw, chat = _get(backbones, "llava", chat=False), _get(backbones, "llava", chat=True)
    assert not raw.uses_chat_template and chat.uses_chat_template
    vqa = PromptSample(QUESTION, ANSWER, image=tiny_image(1))
    assert raw.wrap_prompt(vqa) == f"<image>\nQuestion: {QUESTION} Short answer:"
    assert raw.wrap_target(vqa) == " " + ANSWER
    caption = PromptSample("A photo of", "a red square", image=tiny_image(1), task="caption")
    assert raw.wrap_prompt(caption) == "<image>\nA photo of"
    assert (
        raw.wrap_prompt(PromptSample(TEXT_QUESTION, TEXT_ANSWER))
        == f"Question: {TEXT_QUESTION} Short answer:"
    )
    assert chat.wrap_prompt(vqa) == f"USER: <image>\n{QUESTION} ASSISTANT:"
    assert chat.wrap_target(vqa) == ANSWER
    assert chat.wrap_prompt(PromptSample(TEXT_QUESTION, TEXT_ANSWER)) == f"USER: {TEXT_QUESTION} ASSISTANT:"
    # BOS as transformers adds it: raw prompts and processor chat prompts get it from the tokenizer (the
    # template has none); a bare tokenizer's chat template never adds special tokens
    bos = raw.tokenizer.bos_token_id
    assert raw.build_batch([vqa])["input_ids"][0].tolist().count(bos) == 1
    assert raw.build_batch([vqa])["input_ids"][0, 0].item() == bos
    assert chat.build_batch([vqa])["input_ids"][0, 0].item() == bos
    llama_chat = _get(backbones, "llama", chat=True)
    assert llama_chat.build_batch([vqa.__class__(QUESTION, ANSWER)])["input_ids"][0, 0].item() != bos


def test_unknown_model_type_lists_supported_types() -> None:
    with pytest.raises(UnsupportedModelError) as info:
        get_backbone_spec("mamba")
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    for model_type in supported_model_types():
        assert model_type in message
    assert "register_backbone(BackboneSpec(" in message


def test_register_backbone_roundtrip() -> None:
    spec = BackboneSpec(
        model_type="toy_decoder",
        multimodal=False,
        layers="model.layers",
        ffn_projections=("mlp.down_proj",),
        default_edit_projections=("mlp.down_proj",),
        final_norm="model.norm",
        lm_head="lm_head",
        vision_tower=None,
        projector=None,
    )
    register_backbone(spec)
    try:
        assert get_backbone_spec("toy_decoder") is spec
        with pytest.raises(ValueError, match="already registered"):
            register_backbone(spec)
    finally:
        unregister_backbone("toy_decoder")
    assert "toy_decoder" not in supported_model_types()
    with pytest.raises(ValueError, match="subset of ffn_projections"):
        BackboneSpec(**{**spec.__dict__, "default_edit_projections": ("mlp.up_proj",)})
    with pytest.raises(ValueError, match="vision_tower and projector"):
        BackboneSpec(**{**spec.__dict__, "multimodal": True})


def test_sample_and_batch_validation(backbones) -> None:
    with pytest.raises(ValueError, match="target"):
        PromptSample("q", "  ")
    with pytest.raises(ValueError, match="task"):
        PromptSample("q", "a", task="chat")  # type: ignore[arg-type]
    llama = _get(backbones, "llama")
    with pytest.raises(ValueError, match="text-only"):
        llama.build_batch([PromptSample(QUESTION, ANSWER, image=tiny_image(1))])
    with pytest.raises(ValueError, match="at least one"):
        llama.build_batch([])
    with pytest.raises(ValueError, match="output_hidden_states"):
        llama.last_hidden_states(llama.forward(llama.build_batch([PromptSample(QUESTION, ANSWER)])))
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        shift_logits_labels(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))


def test_tiny_backbone_is_deterministic() -> None:
    a, b = tiny_backbone("llama", seed=3), tiny_backbone("llama", seed=3)
    c = tiny_backbone("llama", seed=4)
    wa, wb, wc = (bb.get_module("lm_head").weight for bb in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    state = torch.random.get_rng_state()
    tiny_backbone("llama", seed=5)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone


def _same_batch(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("model_type", ["llava", "idefics3"])
def test_manual_placeholder_expansion_matches_processor(backbones, model_type: str) -> None:
    """The torchvision-free path (image processor + our expansion) builds the processor's exact batch."""
    from odedit_hf.backbones import ImageTextProcessor

    for chat in (False, True):
        full = _get(backbones, model_type, chat)
        light = ImageTextProcessor(
            full.image_processor, full.tokenizer, image_token="<image>", chat_template=full.chat_template
        )
        manual = Backbone(full.model, light)
        samples = [
            *_samples(full),
            PromptSample("A photo of", "a red square", image=tiny_image(2), task="caption"),
        ]
        _same_batch(full.build_batch(samples), manual.build_batch(samples))


def test_processor_import_error_falls_back_to_manual_expansion(backbones, caplog) -> None:
    full = _get(backbones, "llava")

    class NoTorchvisionProcessor(type(full.processor)):  # type: ignore[misc]
        def __call__(self, *args, **kwargs):
            raise ImportError("torchvision is required")

    proc = NoTorchvisionProcessor(
        image_processor=full.image_processor,
        tokenizer=full.tokenizer,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    fallback = Backbone(full.model, proc)
    samples = _samples(full)
    with caplog.at_level("WARNING", logger="odedit_hf.backbones.backbone"):
        batch = fallback.build_batch(samples)
    assert "expanding image placeholders" in caplog.text
    _same_batch(full.build_batch(samples), batch)


def test_peft_wrapped_model_keeps_names_and_forward(backbones) -> None:
    from peft import LoraConfig, get_peft_model

    bb = tiny_backbone("llava", seed=0)
    names = bb.default_edit_module_names()
    peft_model = get_peft_model(bb.model, LoraConfig(r=2, target_modules=names))
    wrapped = Backbone(peft_model, bb.processor)
    assert wrapped.spec.model_type == "llava" and wrapped.default_edit_module_names() == names
    batch = wrapped.build_batch(_samples(wrapped), device="cpu")
    out = wrapped.forward(batch, output_hidden_states=True)
    out.loss.backward()
    lora = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert len(lora) == len(names) and all(p.grad is not None for p in lora)
    assert wrapped.last_hidden_states(out).shape[:2] == batch["input_ids"].shape


def test_spec_lookup_from_config_and_string(backbones) -> None:
    bb = _get(backbones, "qwen2_vl")
    assert get_backbone_spec(bb.model.config) is get_backbone_spec("qwen2_vl") is bb.spec
    with pytest.raises(UnsupportedModelError, match="Cannot read a model_type"):
        get_backbone_spec(object())


def test_train_tokenizer_kinds() -> None:
    from odedit_hf.testing import train_tokenizer

    corpus = ["the sky is blue", "Paris is big"]
    word = train_tokenizer(corpus, extra_special_tokens={"image_token": "<image>"})
    assert word.image_token == "<image>" and word.convert_tokens_to_ids("<image>") == 4
    ids = word("<image> the sky")["input_ids"]
    assert ids[0] == word.bos_token_id and ids[1] == 4 and word.unk_token_id not in ids
    assert word("the sky", add_special_tokens=False)["input_ids"][0] != word.bos_token_id
    bpe = train_tokenizer(corpus, kind="bpe")
    assert bpe.decode(bpe(" Paris is blue", add_special_tokens=False)["input_ids"]) == " Paris is blue"
    assert len(train_tokenizer(corpus, vocab_size=7)) == 7
    with pytest.raises(ValueError, match="sequence of strings"):
        train_tokenizer("the sky")
    with pytest.raises(ValueError, match="extra_special_tokens"):
        train_tokenizer(corpus, special_tokens={"image_token": "<image>"})


def test_tiny_backbone_options() -> None:
    bb = tiny_backbone(
        "llava", text_config={"hidden_size": 48, "num_hidden_layers": 3}, texts=["zebra crossing"]
    )
    assert bb.num_layers() == 3 and bb.default_edit_layers() == [2]
    batch = bb.build_batch([PromptSample("which animal is this?", "zebra", image=tiny_image(0))])
    assert bb.tokenizer.unk_token_id not in batch["input_ids"][0].tolist()
    assert bb.last_hidden_states(bb.forward(batch, output_hidden_states=True)).shape[-1] == 48
    with pytest.raises(ValueError, match="no tiny config"):
        tiny_backbone("mamba")
    with pytest.raises(ValueError, match="Qwen-VL"):
        tiny_backbone("qwen2_vl", text_config={"hidden_size": 64})


def test_family_that_cannot_mix_images_raises(backbones) -> None:
    from dataclasses import replace

    bb = _get(backbones, "llava")
    original = get_backbone_spec("llava")
    register_backbone(replace(original, mixed_batches=False), overwrite=True)
    try:
        strict = Backbone(bb.model, bb.processor)
        with pytest.raises(ValueError, match="cannot mix samples with and without images"):
            strict.build_batch(_samples(bb))
        assert (
            strict.build_batch([PromptSample(QUESTION, ANSWER, image=tiny_image(1))])["pixel_values"].shape[0]
            == 1
        )
    finally:
        register_backbone(original, overwrite=True)
    assert get_backbone_spec("llava") is original


def test_frozen_vision_cache_runs_the_tower_once_per_image_batch() -> None:
    backbone = tiny_backbone("llava", texts=["what is this", "a cat"])
    model = backbone.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    batch = backbone.build_batch([PromptSample(prompt="what is this", target="a cat", image=tiny_image(0))])
    batch.pop("labels")
    tower = backbone.get_module("vision_tower")
    runs = []
    first_conv = next(m for m in tower.modules() if isinstance(m, torch.nn.Conv2d))
    handle = first_conv.register_forward_hook(lambda *_: runs.append(1))
    try:
        with torch.no_grad():
            plain = model(**batch).logits
            runs.clear()
            with backbone.frozen_vision_cache() as active:
                assert active
                cached = [model(**batch).logits for _ in range(3)]
                assert len(runs) == 1, "the tower must run once for the same pixel_values tensor"
                other = dict(batch, pixel_values=batch["pixel_values"].clone())
                model(**other)
                assert len(runs) == 2, "another tensor is another image batch"
                batch["pixel_values"].mul_(1.0)  # an in-place write invalidates the memo
                model(**batch)
                assert len(runs) == 3
            assert "forward" not in tower.__dict__, "the tower's forward is restored at exit"
            for logits in cached:
                assert torch.equal(logits, plain)
            # a trainable tower is never memoised
            next(tower.parameters()).requires_grad_(True)
            with backbone.frozen_vision_cache() as active:
                assert not active
    finally:
        handle.remove()

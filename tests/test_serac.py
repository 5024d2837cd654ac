"""SERAC: the scope classifier's routing, the cache (snapshot/restore, sequential and batch growth, save/load),
the trained artefact (written by train_serac, refused by another base model), and the protocols end to end.

SERAC is outside the shared editor matrix (tests/test_editors.py), as IKE is: an edit trains nothing
(``trains_at_edit`` False), its checks assume a trained counterfactual model (the edit holding) and hidden
states before the first edited layer left untouched, while SERAC's counterfactual model reads a longer
input. The equivalents are here, on a tiny random LLaVA with an artefact trained for a few steps.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from peft import PeftModel, get_peft_model

import odedit_hf  # noqa: F401  registers the PEFT types
from odedit_hf.editing import BaseWeights, eval_samples, get_method, model_inputs
from odedit_hf.testing import tiny_backbone, tiny_image, write_zsre_file

TEXTS = [
    "what color is the cube",
    "which colour has the cube",
    "what is the capital of france",
    "what animal is this",
    "which shape is shown",
    "what shape is shown",
    "red blue paris cat green circle",
]


@pytest.fixture(scope="module")
def requests(tmp_path_factory):  # noqa: ANN001
    from odedit_hf.data import EditRequest

    root = tmp_path_factory.mktemp("serac_images")
    paths = []
    for i in range(4):
        path = os.path.join(root, f"img{i}.png")
        tiny_image(i).save(path)
        paths.append(path)
    common = {
        "source": "in-memory",
        "task": "vqa",
        "pred": "red",
        "loc": "what is the capital of france",
        "loc_ans": "paris",
        "m_loc": paths[3],
        "m_loc_q": "what animal is this",
        "m_loc_a": "cat",
    }
    cube = EditRequest(
        case_id=0,
        src="what color is the cube",
        alt="blue",
        rephrase="which colour has the cube",
        image=paths[0],
        image_rephrase=paths[1],
        **common,
    )
    shape = EditRequest(
        case_id=1,
        src="which shape is shown",
        alt="green",
        rephrase="what shape is shown",
        image=paths[2],
        image_rephrase=paths[0],
        **common,
    )
    return cube, shape


def _backbone(seed: int = 0, **kwargs):  # noqa: ANN003, ANN202
    return tiny_backbone("llava", seed=seed, texts=TEXTS, **kwargs)


@pytest.fixture(scope="module")
def artefact(tmp_path_factory, requests):  # noqa: ANN001
    """A SERAC artefact for the tiny LLaVA (seed 0), trained for two steps (enough for its plumbing)."""
    from odedit_hf.editors.serac import SERACTrainingArguments, SERACTrainingConfig, train_serac

    root = tmp_path_factory.mktemp("serac_artefact")
    backbone = _backbone()
    digest = BaseWeights(backbone.model).digest()
    args = SERACTrainingArguments(
        output_dir=str(root / "trainer"), max_steps=2, eval_steps=1, logging_steps=1, disable_tqdm=True
    )
    path = train_serac(
        backbone, list(requests), str(root / "serac"), SERACTrainingConfig(rank=4, val_fraction=0.5), args
    )
    # training leaves the backbone as it was: unwrapped, the same weights
    assert not hasattr(backbone.model, "peft_config") and not backbone.model._forward_pre_hooks
    assert BaseWeights(backbone.model).digest() == digest
    return path


@pytest.fixture
def wrapped(artefact):  # noqa: ANN001
    """(backbone, method, peft model, snapshot at the empty cache, base weights, their digest)."""
    backbone = _backbone()
    base = BaseWeights(backbone.model)
    method = get_method("serac", editor_weights=artefact)
    peft_model = get_peft_model(backbone.model, method.peft_config(backbone))
    yield backbone, method, peft_model, method.snapshot(peft_model, "default", base=base), base, base.digest()
    peft_model.unload()


def _logits(model, batch):  # noqa: ANN001, ANN202
    with torch.no_grad():
        return model(**model_inputs(batch)).logits


def _batch(backbone, request, names=("reliability", "t_locality")):  # noqa: ANN001, ANN202
    samples = eval_samples(request)
    return backbone.build_batch([samples[n] for n in names])


# ------------------------------------------------------------------ the artefact
def test_train_serac_writes_a_safetensors_artefact_with_the_base_identity(artefact):  # noqa: ANN001
    from safetensors.torch import load_file

    from odedit_hf.editors.serac import base_identity

    with open(os.path.join(artefact, "serac_config.json")) as f:
        meta = json.load(f)
    assert meta["base_model"] == base_identity(_backbone().base_model)
    assert meta["architecture"]["rank"] == 4 and meta["threshold"] == 0.5
    assert [h["step"] for h in meta["history"] if "eval_loss" in h] == [1, 2]
    assert all("eval_scope_acc" in h and "eval_cf_acc" in h for h in meta["history"] if "eval_loss" in h)
    tensors = load_file(os.path.join(artefact, "serac_weights.safetensors"))
    assert {"classifier.proj_w", "classifier.proj_b", "classifier.log_scale"} <= set(tensors)
    deltas = [k for k in tensors if k.startswith("cf.")]
    assert deltas and all(k.endswith((".A", ".B")) for k in deltas)
    # two optimiser steps moved the zero-initialised B of the counterfactual deltas
    assert any(tensors[k].abs().sum() > 0 for k in deltas if k.endswith(".B"))


def test_an_artefact_for_another_base_model_is_refused(artefact):  # noqa: ANN001
    method = get_method("serac", editor_weights=artefact)
    other_weights = _backbone(seed=1)  # same config, other weights
    with pytest.raises(ValueError, match="trained for another base model.*input-embedding weights"):
        method.peft_config(other_weights)
    other_config = _backbone(text_config={"num_hidden_layers": 3})
    with pytest.raises(ValueError, match="trained for another base model.*config differ"):
        method.peft_config(other_config)
    method.peft_config(_backbone())  # the model it was trained for: accepted


def test_editing_without_an_artefact_says_how_to_train_one(requests):  # noqa: ANN001
    with pytest.raises(ValueError, match="train_serac"):
        get_method("serac").peft_config(_backbone())
    with pytest.raises(ValueError, match="not a SERAC artefact folder"):
        get_method("serac", editor_weights="/nonexistent/serac").peft_config(_backbone())
    with pytest.raises(ValueError, match="threshold"):
        get_method("serac", threshold=1.5)


# ------------------------------------------------------------------ routing
def test_scope_sends_locality_to_the_base_model_and_the_edit_to_the_counterfactual(wrapped, requests):  # noqa: ANN001
    backbone, method, peft_model, _, _, _ = wrapped
    tuner = peft_model.base_model
    batch = _batch(backbone, requests[0])  # row 0: the edit prompt + image; row 1: the text locality prompt
    base = _logits(peft_model, batch)
    method.edit(peft_model, backbone, [requests[0]])
    layer = method_layer(peft_model)
    # the constructed case: the scale puts the boundary (score 0.5) halfway between the edit and the locality
    # prompt, whatever two training steps learnt
    feats = tuner.base_features("default", batch)
    d_loc = float((layer.project("default", feats[1:]) - layer.project("default", feats[:1])).pow(2).sum())
    assert d_loc > 0
    with torch.no_grad():
        layer.serac_log_scale["default"].fill_(math.log(2 * math.log(2.0) / d_loc))
    routed = _logits(peft_model, batch)
    scores = tuner.last_scores
    assert scores[0].item() == pytest.approx(1.0) and scores[1].item() == pytest.approx(0.25)
    assert tuner.last_routes.tolist() == [True, False]
    assert torch.equal(routed[1], base[1]), "the locality row must keep the base logits bit for bit"
    from odedit_hf.editors.serac import context_ids

    ctx = context_ids(backbone, requests[0].src, requests[0].alt)
    with torch.no_grad():
        cf = tuner.counterfactual_logits(model_inputs(batch), [ctx, ctx])
    torch.testing.assert_close(routed[0], cf[0], rtol=0, atol=0)
    assert not torch.equal(routed[0], base[0]), "the edit row must come from the counterfactual model"
    # the counterfactual model reads the cached text: its logits differ from the deltas-only model's
    with torch.no_grad(), tuner.counterfactual():
        no_context = peft_model(**model_inputs(batch)).logits
    assert not torch.allclose(no_context[0], cf[0])


def method_layer(peft_model):  # noqa: ANN001, ANN201
    from odedit_hf.editors.serac import serac_layer

    return serac_layer(peft_model, "default")


def test_the_counterfactual_model_sees_the_query_image(wrapped, requests):  # noqa: ANN001
    backbone, _method, peft_model, _, _, _ = wrapped
    from odedit_hf.backbones import PromptSample
    from odedit_hf.editors.serac import context_ids

    tuner = peft_model.base_model
    ctx = context_ids(backbone, requests[0].src, requests[0].alt)
    rows = [
        backbone.build_batch([PromptSample(prompt=requests[0].src, target="blue", image=tiny_image(i))])
        for i in (0, 2)
    ]
    with torch.no_grad():
        a, b = (tuner.counterfactual_logits(model_inputs(r), [ctx]) for r in rows)
    assert not torch.allclose(a, b), (
        "two images, one context: the counterfactual output must depend on the image"
    )


def test_sequential_and_batch_edits_extend_the_cache_and_route_to_their_own_edit(wrapped, requests):  # noqa: ANN001
    backbone, method, peft_model, snapshot, _, _ = wrapped
    layer = method_layer(peft_model)
    tuner = peft_model.base_model
    method.edit(peft_model, backbone, [requests[0]])
    first = layer.cache_state("default")
    method.edit(peft_model, backbone, [requests[1]])
    assert layer.num_edits("default") == 2
    assert torch.equal(layer.serac_cache_feat["default"][:1], first["serac_cache_feat"])
    batch = backbone.build_batch([eval_samples(r)["reliability"] for r in requests])
    _logits(peft_model, batch)
    assert tuner.last_scores.tolist() == pytest.approx([1.0, 1.0])  # each edit prompt is its own cache entry
    assert tuner.last_routes.tolist() == [True, True]
    snapshot.restore()
    method.edit(peft_model, backbone, list(requests))  # one batch edit of both
    batched = layer.cache_state("default")
    assert layer.num_edits("default") == 2
    torch.testing.assert_close(batched["serac_cache_feat"][1], layer.serac_cache_feat["default"][1])


def test_snapshot_restore_rolls_the_cache_back_and_disable_adapter_is_the_base(wrapped, requests):  # noqa: ANN001
    backbone, method, peft_model, snapshot, base, digest = wrapped
    layer = method_layer(peft_model)
    batch = _batch(backbone, requests[0])
    base_logits = _logits(peft_model, batch)
    assert method.adapter_is_identity(peft_model)
    method.edit(peft_model, backbone, [requests[0]])
    after_one = _logits(peft_model, batch)
    assert not method.adapter_is_identity(peft_model)
    with peft_model.disable_adapter():
        assert torch.equal(_logits(peft_model, batch), base_logits)
    middle = method.snapshot(peft_model, "default")
    method.edit(peft_model, backbone, [requests[1]])
    assert layer.num_edits("default") == 2
    middle.restore()
    assert layer.num_edits("default") == 1
    assert torch.equal(_logits(peft_model, batch), after_one)
    snapshot.restore()
    assert layer.num_edits("default") == 0 and method.adapter_is_identity(peft_model)
    assert torch.equal(_logits(peft_model, batch), base_logits)
    base.check(digest, context="after SERAC edits and a restore")
    with pytest.raises(ValueError, match="cannot be merged"):
        peft_model.merge_adapter()


def test_save_load_reproduces_the_logits_exactly(wrapped, requests, tmp_path):  # noqa: ANN001
    from safetensors.torch import load_file

    backbone, method, peft_model, _, _, _ = wrapped
    method.edit(peft_model, backbone, [requests[0]])
    method.edit(peft_model, backbone, [requests[1]])
    batch = backbone.build_batch(
        [eval_samples(requests[0])[n] for n in ("reliability", "t_generality", "t_locality")]
    )
    edited = _logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path)
    with open(os.path.join(tmp_path, "adapter_config.json")) as f:
        assert json.load(f)["peft_type"] == "SERAC"
    saved = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert saved and all("serac_" in k for k in saved)
    assert any(k.endswith("serac_cache_ids") and v.shape[0] == 2 for k, v in saved.items())
    fresh = _backbone()
    loaded = PeftModel.from_pretrained(fresh.model, str(tmp_path))
    torch.testing.assert_close(_logits(loaded, batch), edited, rtol=0, atol=0)
    # a loaded adapter edits on without the artefact: the trained weights travel with it
    get_method("serac").edit(loaded, fresh, [requests[0]])
    assert method_layer(loaded).num_edits("default") == 3


def test_protocols_run_serac_end_to_end(artefact, requests):  # noqa: ANN001
    from odedit_hf.evaluation import run_protocol

    backbone = _backbone()
    method = get_method("serac", editor_weights=artefact)
    single = run_protocol("single", method, backbone, list(requests))
    assert all(r.steps == 0 for r in single.results)
    # the edit prompt is its own cache entry (score 1): reliability is scored on the counterfactual output
    sequential = run_protocol("sequential", method, backbone, list(requests))
    assert all(r.final is not None for r in sequential.results)
    assert not hasattr(backbone.model, "peft_config") and not backbone.model._forward_pre_hooks


def test_text_only_records_on_a_text_only_decoder(tmp_path):  # noqa: ANN001
    """ZsRE-style records on a tiny Llama: training has no image groups, the edit caches the text prompt,
    locality goes to the base model, and the protocols roll back (hash checked)."""
    from odedit_hf.data import load_edits
    from odedit_hf.editors.serac import SERACTrainingArguments, SERACTrainingConfig, train_serac
    from odedit_hf.evaluation import run_protocol

    path = write_zsre_file(tmp_path / "zsre.json", ["blue", "grey"], subject="france")
    requests = list(load_edits(path))
    texts = [
        "the capital of france is",
        "the capital city of france is",
        "the sky over the sea is",
        "blue grey",
    ]
    llama = tiny_backbone("llama", seed=0, texts=texts)
    args = SERACTrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=1, eval_steps=1, logging_steps=1, disable_tqdm=True
    )
    artefact = train_serac(llama, requests, str(tmp_path / "serac"), SERACTrainingConfig(rank=2), args)
    method = get_method("serac", editor_weights=artefact)
    peft_model = get_peft_model(llama.model, method.peft_config(llama))
    method.edit(peft_model, llama, requests[:1])
    samples = eval_samples(requests[0])
    assert "m_generality" not in samples
    batch = llama.build_batch([samples["reliability"], samples["t_locality"]])
    with peft_model.disable_adapter():
        base = _logits(peft_model, batch)
    routed = _logits(peft_model, batch)
    tuner = peft_model.base_model
    assert tuner.last_routes[0].item() and tuner.last_scores[0].item() == pytest.approx(1.0)
    assert tuner.last_routes.tolist() == [True, False], tuner.last_scores
    assert torch.equal(routed[1], base[1]) and not torch.equal(routed[0], base[0])
    peft_model.unload()
    before = BaseWeights(llama.model).digest()
    run = run_protocol("sequential", method, llama, requests)
    assert all(r.final is not None for r in run.results)
    assert BaseWeights(llama.model).digest() == before


def test_train_editor_cli_trains_serac_and_edit_loads_it(micro_world, tmp_path, capsys):  # noqa: ANN001
    """``odedit-hf train-editor --method serac`` writes the artefact ``edit --method serac`` reads; SERAC's
    edit-time options and unknown training fields are refused before anything trains."""
    import json

    from odedit_hf.cli.main import main

    out = tmp_path / "serac"
    common = [
        "train-editor",
        "--method",
        "serac",
        "--model",
        micro_world.model_dir,
        "--data",
        micro_world.root,
    ]
    assert main([*common, "--out", str(out), "--serac.threshold", "0.3"]) == 2
    assert "edit-time options" in capsys.readouterr().err and not out.exists()
    assert main([*common, "--out", str(out), "--train.bogus", "1"]) == 2
    assert "not a field of SERACTrainingConfig" in capsys.readouterr().err and not out.exists()
    argv = [*common, "--out", str(out), "--no-progress", "--n", "12", "--device", "cpu"]
    argv += ["--train.max-steps", "2", "--train.eval-steps", "1", "--train.rank", "4"]
    assert main(argv) == 0, capsys.readouterr().err
    meta = json.loads((out / "serac_config.json").read_text())
    assert meta["training"]["steps"] == 2 and meta["architecture"]["rank"] == 4
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no staging folder left
    results = tmp_path / "r.json"
    edit = ["edit", "--model", micro_world.model_dir, "--data", micro_world.root, "--method", "serac"]
    edit += [
        "--serac.editor-weights",
        str(out),
        "--num-edits",
        "2",
        "--out",
        str(results),
        "--no-memory-check",
    ]
    assert main(edit) == 0, capsys.readouterr().err
    assert json.loads(results.read_text())["n_edits"] == 2

"""The memory estimate printed before a run, the refusal of a run that cannot fit, and --device-map."""

from __future__ import annotations

import json

import pytest
import torch

from odedit_hf.cli.main import main
from odedit_hf.editing import build_method
from odedit_hf.editing.memory import estimate_edit_memory
from odedit_hf.editing.rollback import BaseWeights
from odedit_hf.testing import tiny_backbone
from odedit_hf.testing.tiny import tiny_image

WORDS = ["what is the capital of France? Tokyo Paris London", "which animal is this? a red square blue yes"]
RECORD = {
    "src": "what is the capital of France?",
    "pred": "Paris",
    "alt": "Tokyo",
    "image": "img0.png",
    "rephrase": "capital of France?",
    "image_rephrase": "img1.png",
    "loc": "what is the capital of France?",
    "loc_ans": "Paris",
    "m_loc": "img1.png",
    "m_loc_q": "which animal is this?",
    "m_loc_a": "a red square",
}


@pytest.fixture(scope="module")
def backbone():
    return tiny_backbone("llava", seed=0, texts=WORDS)


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory, backbone):
    folder = tmp_path_factory.mktemp("mem")
    backbone.model.save_pretrained(folder / "model")
    backbone.processor.save_pretrained(folder / "model")
    for i in range(2):
        tiny_image(i).save(folder / f"img{i}.png")
    (folder / "edits.json").write_text(json.dumps([RECORD]))
    return str(folder / "model"), str(folder / "edits.json")


@pytest.fixture(scope="module")
def requests_(cli_inputs):
    import os

    from odedit_hf.data import load_mmedit

    _, data = cli_inputs
    return list(load_mmedit(data, image_root=os.path.dirname(data)))


def _down_projs(model):
    return [m for n, m in model.named_modules() if n.endswith("mlp.down_proj") and "language_model" in n]


def test_lora_estimate_counts_exactly_what_lora_trains(backbone, requests_):
    method = build_method("lora", {"lora": {"rank": 4}})
    digest = BaseWeights(backbone.model).digest()
    rng = torch.get_rng_state()
    est = estimate_edit_memory(method, backbone, requests_)
    assert torch.equal(torch.get_rng_state(), rng)  # the trial wrap left the RNG alone
    BaseWeights(backbone.model).check(digest, context="test")
    assert not hasattr(backbone.model, "peft_config")
    # the adapter's own count, from a real wrap
    from peft import get_peft_model

    peft_model = get_peft_model(backbone.model, method.peft_config(backbone))
    want = sum(p.numel() for p in method.edit_parameters(peft_model))
    peft_model.unload()
    assert est.num_edit_parameters == want > 0
    assert est.optimizer_state == 8 * want and est.gradients == est.edit_parameters == 4 * want
    params = sum(
        t.numel() * t.element_size() for t in (*backbone.model.parameters(), *backbone.model.buffers())
    )
    assert est.model == params
    assert est.activations > 0 and est.tokens_per_step > 0 and est.total > est.model
    assert est.needed == est.total - est.model  # the model is already loaded when the check runs


def test_ftl_estimate_is_the_size_of_its_target_weights(backbone, requests_):
    method = build_method("ftl", {})
    from peft import get_peft_model

    peft_model = get_peft_model(backbone.model, method.peft_config(backbone))
    want = sum(p.numel() for p in method.edit_parameters(peft_model))
    peft_model.unload()
    est = estimate_edit_memory(method, backbone, requests_)
    assert est.num_edit_parameters == want
    sizes = {m.weight.numel() for m in _down_projs(backbone.model)}
    assert any(want % s == 0 for s in sizes)  # whole weight matrices, not a low-rank part


def test_a_batch_step_estimates_more_activations(backbone, requests_):
    method = build_method("lora", {})
    one = estimate_edit_memory(method, backbone, requests_ * 1, batch_size=1)
    four = estimate_edit_memory(method, backbone, requests_ * 4, batch_size=4)
    assert four.tokens_per_step == 4 * one.tokens_per_step and four.activations > 3 * one.activations


def test_edit_prints_the_estimate_and_records_it_with_the_device_map(cli_inputs, tmp_path, capsys):
    model, data = cli_inputs
    out = tmp_path / "r.json"
    argv = [
        "edit",
        "--model",
        model,
        "--data",
        data,
        "--method",
        "lora",
        "--lora.steps",
        "2",
        "--no-progress",
    ]
    assert main([*argv, "--device-map", "auto", "--out", str(out)]) == 0
    assert "memory estimate on cpu" in capsys.readouterr().err
    config = json.loads(out.read_text())["config"]
    assert config["device_map"] == {"": "cpu"}
    assert config["memory_estimate"]["edit_parameters"] > 0 and config["memory_estimate"]["total_bytes"] > 0


def test_a_run_that_cannot_fit_is_refused_before_it_starts(cli_inputs, tmp_path, capsys, monkeypatch):
    import odedit_hf.editing.memory as memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 1024)
    model, data = cli_inputs
    argv = ["edit", "--model", model, "--data", data, "--method", "ftl", "--ftl.steps", "1", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "a.json")]) == 2
    err = capsys.readouterr().err
    assert "estimated to need" in err and "--dtype bfloat16" in err and "--no-memory-check" in err
    assert not (tmp_path / "a.json").exists()
    assert main([*argv, "--no-memory-check", "--out", str(tmp_path / "b.json")]) == 0


def test_bad_placement_options_are_named(cli_inputs, tmp_path, capsys):
    model, data = cli_inputs
    argv = ["edit", "--model", model, "--data", data, "--no-progress", "--out", str(tmp_path / "r.json")]
    assert main([*argv, "--device-map", "everywhere"]) == 2
    assert "--device-map 'everywhere'" in capsys.readouterr().err
    assert main([*argv, "--max-memory", "cpu=1GiB"]) == 2
    assert "only applies with --device-map" in capsys.readouterr().err
    assert main([*argv, "--device-map", "auto", "--max-memory", "cpu"]) == 2
    assert "DEVICE=SIZE" in capsys.readouterr().err


def test_odedit_counts_its_lambda_network(backbone, requests_):
    from odedit_hf.methods.odedit.lambda_net import lambda_network_num_parameters

    plain = estimate_edit_memory(build_method("ftl", {}), backbone, requests_)
    for mode in ("sketch", "params"):
        est = estimate_edit_memory(
            build_method("odedit+ftl", {"odedit": {"lambda_mode": mode}}), backbone, requests_
        )
        n = lambda_network_num_parameters(mode, est.num_edit_parameters, 64, 128)
        assert est.method_state == 8 * n > 0 and plain.method_state == 0  # fp32 weights + their gradients
    off = build_method("odedit+ftl", {"odedit": {"irm_penalty": False}})
    assert estimate_edit_memory(off, backbone, requests_).method_state == 0


@pytest.fixture(scope="module")
def llama_requests(tmp_path_factory):
    from odedit_hf.data import load_edits
    from odedit_hf.testing import ZSRE_PROMPTS, write_zsre_file

    text_config = {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 176}
    llama = tiny_backbone("llama", seed=0, texts=[*ZSRE_PROMPTS, "blue grey"], text_config=text_config)
    path = write_zsre_file(tmp_path_factory.mktemp("mem-llama") / "zsre.json", ["blue", "grey"])
    return llama, list(load_edits(path))


def _saved_for_backward(method, backbone, requests):
    """Bytes autograd keeps for the backward of one step on the estimate's prompts (distinct storages
    alive when the backward would start, parameters and buffers excluded), and the bytes of the logits."""
    import weakref

    from peft import get_peft_model

    from odedit_hf.editing.environments import CORE_GROUPS, build_edit_batch
    from odedit_hf.editing.loss import model_inputs, nll_from_logits

    batch = build_edit_batch(backbone, requests, CORE_GROUPS, num_rephrases=1, device="cpu")
    peft_model = get_peft_model(backbone.model, method.peft_config(backbone))
    try:
        skip = {t.untyped_storage().data_ptr() for t in (*peft_model.parameters(), *peft_model.buffers())}
        saved = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in skip:
                saved.setdefault(ptr, (weakref.ref(t), t.untyped_storage().nbytes()))
            return t

        losses, logits_bytes = [], 0
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            for b in batch.batches:
                logits = peft_model(**model_inputs(b)).logits
                logits_bytes += logits.numel() * 4
                losses.append(nll_from_logits(logits, b["labels"]))
                del logits
        kept = sum(n for ref, n in saved.values() if ref() is not None)
        del losses
    finally:
        peft_model.unload()
    return kept, logits_bytes, batch


def test_activations_count_the_layers_from_the_lowest_edited_one_and_bound_what_autograd_keeps(
    llama_requests,
):
    llama, requests = llama_requests
    requests = requests[:1]
    text = llama.model.config
    h, i, a = text.hidden_size, text.intermediate_size, text.num_attention_heads
    est = {
        layer: estimate_edit_memory(build_method("ftl", {"ftl": {"layers": [layer]}}), llama, requests)
        for layer in range(4)
    }
    assert estimate_edit_memory(build_method("ftl", {}), llama, requests).activations == est[3].activations
    measured = {
        layer: _saved_for_backward(build_method("ftl", {"ftl": {"layers": [layer]}}), llama, requests)
        for layer in (0, 3)
    }
    batch = measured[0][2]
    # each layer below the top one that the backward runs through adds 6h + 3i + a*s values per position
    per_layer = sum(
        r * s * (6 * h + 3 * i + a * s) * 4 for r, s in (b["input_ids"].shape for b in batch.batches)
    )
    for layer in range(3):
        assert est[layer].activations - est[layer + 1].activations == per_layer
    for layer, (saved, logits_bytes, _) in measured.items():
        # at least what the backward keeps; over it by at most the logits' gradient and the edited layer's
        # part below the edited module (counted as a whole layer)
        assert saved <= est[layer].activations <= saved + logits_bytes + per_layer

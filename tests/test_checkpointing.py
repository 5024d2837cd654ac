"""Gradient checkpointing in eval mode (``run_protocol(..., gradient_checkpointing=True)``, ``--gradient-
checkpointing``): the same edits as without it, the layers really recompute, dropout stays off, the model's
flags come back, unsupported methods are refused before anything is wrapped, and the memory estimate
counts the smaller activations."""

from __future__ import annotations

import json

import pytest
import torch

from odedit_hf.cli.main import main
from odedit_hf.data import load_edits
from odedit_hf.editing import BaseWeights, get_method
from odedit_hf.editing.checkpointing import checkpointed_layers, eval_mode_checkpointing
from odedit_hf.editing.memory import estimate_edit_memory
from odedit_hf.evaluation import run_protocol
from odedit_hf.testing import tiny_backbone, write_zsre_file

TEXTS = [
    "the capital of france is",
    "the capital city of france is",
    "the sky over the sea is",
    "blue",
    "grey",
]


@pytest.fixture(scope="module")
def zsre_file(tmp_path_factory):
    return write_zsre_file(tmp_path_factory.mktemp("ckpt") / "zsre.json", ["blue", "grey blue"])


@pytest.fixture(scope="module")
def requests(zsre_file):
    return list(load_edits(zsre_file))


@pytest.fixture(scope="module")
def llama():
    # four layers, edited in the first, so the backward runs through all of them; attention dropout on,
    # which must stay off during edits (a recursive train() would switch it on and change the edit)
    return tiny_backbone(
        "llama", seed=0, texts=TEXTS, text_config={"num_hidden_layers": 4, "attention_dropout": 0.5}
    )


def _method(name: str):
    options = {"layers": [0], "steps": 10, "lr": 0.2 if name.endswith("lora") else 0.05}
    return (
        get_method(name, **options) if "+" not in name else get_method(name, **{name.split("+")[1]: options})
    )


def _rows(run):
    # JSON text, so that the absent multimodal scores (NaN) compare equal
    return [json.dumps([vars(r.post), r.steps], sort_keys=True) for r in run.results]


@pytest.mark.parametrize("name", ["ftl", "lora", "odedit+ftl", "odedit+lora"])
def test_checkpointed_edits_equal_plain_ones_and_recompute(llama, requests, name):
    # (torch's non-reentrant checkpoint replays a layer's attention in the backward pass; its MLP's saved
    # tensors need no replay here, so the attention is what shows the recompute)
    first_attention = checkpointed_layers(llama.model)[0].self_attn
    calls = {"n": 0}

    def count(module, args, output):
        if torch.is_grad_enabled():
            calls["n"] += 1

    handle = first_attention.register_forward_hook(count)
    try:
        plain = run_protocol("single", _method(name), llama, requests, seed=0)
        plain_calls, calls["n"] = calls["n"], 0
        ckpt = run_protocol("single", _method(name), llama, requests, seed=0, gradient_checkpointing=True)
        ckpt_calls = calls["n"]
    finally:
        handle.remove()
    assert _rows(ckpt) == _rows(plain)
    assert [r.final_loss for r in ckpt.results] == pytest.approx(
        [r.final_loss for r in plain.results], abs=1e-6
    )
    assert plain.results[0].post.reliability > 0.5  # the edit is in (the comparison is not of two no-ops)
    # the layer is replayed in the backward pass of every optimiser step (and only there: the forwards
    # without a backward, such as the loop's last loss check, are not)
    assert plain_calls > 0 and ckpt_calls - plain_calls == sum(r.steps for r in plain.results)
    # the flags come back: the whole model in eval mode, transformers' checkpointing off
    assert not any(m.training for m in llama.model.modules())
    assert not llama.model.is_activation_checkpointing


def test_layer_flags_only_the_layers_not_their_dropouts(llama):
    with eval_mode_checkpointing(llama.model) as layers:
        assert layers and all(layer.training for layer in layers)
        inner = [m for layer in layers for m in layer.modules() if m is not layer]
        assert inner and not any(m.training for m in inner)
        assert llama.model.is_activation_checkpointing
    assert not any(m.training for m in llama.model.modules())
    assert not llama.model.is_activation_checkpointing


@pytest.mark.parametrize("name", ["grace", "ldke+ftl"])
def test_unsupported_methods_are_refused_before_wrapping(llama, requests, name):
    digest = BaseWeights(llama.model).digest()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        run_protocol("single", get_method(name), llama, requests, gradient_checkpointing=True)
    assert not hasattr(llama.model, "peft_config")
    assert BaseWeights(llama.model).digest() == digest


def test_memory_estimate_counts_checkpointed_activations(llama, requests):
    # edited in the first layer: the backward runs through all four, whose inputs are all checkpointing keeps
    plain = estimate_edit_memory(_method("ftl"), llama, requests)
    ckpt = estimate_edit_memory(_method("ftl"), llama, requests, gradient_checkpointing=True)
    assert 0 < ckpt.activations < plain.activations
    assert ckpt.edit_parameters == plain.edit_parameters


def test_cli_flag_reaches_the_run_and_the_results(llama, zsre_file, tmp_path, capsys):
    model_dir = tmp_path / "llama"
    llama.model.save_pretrained(model_dir)
    llama.processor.save_pretrained(model_dir)
    out = tmp_path / "r.json"
    argv = ["edit", "--model", str(model_dir), "--data", str(zsre_file), "--method", "ftl", "--n", "1"]
    assert main([*argv, "--out", str(out), "--gradient-checkpointing", "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["gradient_checkpointing"] is True
    assert (
        main([*argv, "--method", "grace", "--out", str(tmp_path / "g.json"), "--gradient-checkpointing"]) == 2
    )
    assert "does not support it" in capsys.readouterr().err

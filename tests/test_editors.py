"""Editor test matrix: rows of (case, model, method) through one common set of checks.

A new editor adds rows to ``ROWS``; every check runs on every row:
edit succeeds, locality (layers before the edit untouched), save/load round trip of the adapter,
``disable_adapter`` gives the base outputs, rollback (base-weight hash, adapter re-initialisation),
and merge/unmerge.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from peft import PeftModel, get_peft_model

from odedit_hf.backbones import PromptSample
from odedit_hf.editing import (
    AdapterSnapshot,
    BaseWeights,
    FTMethod,
    LoRAMethod,
    model_inputs,
    run_edit_loop,
    target_nll,
    trainable_parameters,
)
from odedit_hf.evaluation import token_accuracy
from odedit_hf.testing import tiny_backbone
from odedit_hf.testing.tiny import tiny_image

WORDS = ["what is the capital of France? Tokyo Paris", "which animal is this? a green circle"]


@dataclass(frozen=True)
class Row:
    case: str
    model_type: str
    method: Callable[[], Any]
    peft_type: str
    exact_unmerge: (
        bool  # FT-L restores the base weight bit for bit; LoRA's unmerge subtracts (float rounding)
    )


ROWS = [
    Row("ft-llava", "llava", lambda: FTMethod(steps=40, lr=1e-2), "FTL", True),
    Row("lora-llava", "llava", lambda: LoRAMethod(steps=40, lr=5e-2), "LORA", False),
    Row("ft-llama", "llama", lambda: FTMethod(steps=40, lr=1e-2), "FTL", True),
    Row("lora-llama", "llama", lambda: LoRAMethod(steps=40, lr=5e-2, rank=4, alpha=8.0), "LORA", False),
    Row(
        "ft-llava-2proj-norm",
        "llava",
        lambda: FTMethod(
            layers=[1], projections=["mlp.up_proj", "mlp.down_proj"], norm_constraint=0.2, lr=2e-2
        ),
        "FTL",
        True,
    ),
]


@dataclass
class Edited:
    row: Row
    backbone: Any
    method: Any
    peft_model: Any
    base: BaseWeights
    base_digest: str
    snapshot: AdapterSnapshot
    edit_batch: dict[str, torch.Tensor]
    other_batch: dict[str, torch.Tensor]
    base_edit_logits: torch.Tensor
    base_other_logits: torch.Tensor
    base_hidden: tuple[torch.Tensor, ...]


def _samples(model_type: str) -> tuple[PromptSample, PromptSample]:
    image = tiny_image(3) if model_type == "llava" else None
    edit = PromptSample(prompt="what is the capital of France?", target="Tokyo", image=image)
    other = PromptSample(prompt="which animal is this?", target="a green circle", image=image)
    return edit, other


def _logits(model: Any, batch: dict[str, torch.Tensor], **kwargs: Any) -> Any:
    with torch.no_grad():
        return model(**model_inputs(batch), **kwargs)


@pytest.fixture(params=ROWS, ids=[r.case for r in ROWS])
def edited(request: pytest.FixtureRequest) -> Edited:
    row: Row = request.param
    torch.manual_seed(0)
    backbone = tiny_backbone(row.model_type, seed=0, texts=WORDS)
    edit_sample, other_sample = _samples(row.model_type)
    edit_batch = backbone.build_batch([edit_sample])
    other_batch = backbone.build_batch([other_sample])
    base_out = _logits(backbone.model, edit_batch, output_hidden_states=True)
    base_other = _logits(backbone.model, other_batch).logits
    base = BaseWeights(backbone.model)
    digest = base.digest()
    method = row.method()
    peft_model = get_peft_model(backbone.model, method.peft_config(backbone))
    snapshot = AdapterSnapshot(peft_model, "default", base=base)
    # method.edit takes EditRequests (image files); the matrix drives the same loop on PromptSamples directly
    post_step = method.post_step(peft_model)
    run_edit_loop(
        peft_model, backbone, edit_batch, trainable_parameters(peft_model), method.loop, post_step=post_step
    )
    return Edited(
        row,
        backbone,
        method,
        peft_model,
        base,
        digest,
        snapshot,
        edit_batch,
        other_batch,
        base_out.logits,
        base_other,
        tuple(h.clone() for h in base_out.hidden_states),
    )


def test_edit_succeeds(edited: Edited):
    labels = edited.edit_batch["labels"]
    before, _ = token_accuracy(edited.base_edit_logits, labels)
    after, exact = token_accuracy(_logits(edited.peft_model, edited.edit_batch).logits, labels)
    assert before.item() < 1.0, "the base model already gives the target: the test could not fail"
    assert after.item() == 1.0 and exact.item() == 1.0
    # a random tiny model cannot reach a low NLL (final RMSNorm + lm_head init std 0.02 bound the logits
    # to about ±0.6), so the check is that the loss fell, not that it is small
    with torch.no_grad():
        after_nll = target_nll(edited.peft_model, edited.backbone, edited.edit_batch).item()
        with edited.peft_model.disable_adapter():
            before_nll = target_nll(edited.peft_model, edited.backbone, edited.edit_batch).item()
    assert after_nll < before_nll - 0.1, (before_nll, after_nll)


def test_locality_layers_before_the_edit_are_untouched(edited: Edited):
    first_edited = min(int(name.split(".")[-3]) for name in edited.method.target_modules(edited.backbone))
    hidden = _logits(edited.peft_model, edited.edit_batch, output_hidden_states=True).hidden_states
    # hidden_states[i] is the input of decoder layer i: everything up to the first edited layer is unchanged
    for i in range(first_edited + 1):
        assert torch.equal(hidden[i], edited.base_hidden[i]), f"hidden state {i} changed"
    assert not torch.equal(hidden[-1], edited.base_hidden[-1]), "the edit changed nothing downstream"


def test_disable_adapter_gives_base_outputs(edited: Edited):
    with edited.peft_model.disable_adapter():
        assert torch.equal(_logits(edited.peft_model, edited.edit_batch).logits, edited.base_edit_logits)
        assert torch.equal(_logits(edited.peft_model, edited.other_batch).logits, edited.base_other_logits)
    assert not torch.equal(_logits(edited.peft_model, edited.edit_batch).logits, edited.base_edit_logits)


def test_save_load_round_trip(edited: Edited, tmp_path):
    edited_logits = _logits(edited.peft_model, edited.edit_batch).logits
    edited.peft_model.save_pretrained(tmp_path)
    with open(os.path.join(tmp_path, "adapter_config.json")) as f:
        assert json.load(f)["peft_type"] == edited.row.peft_type
    from safetensors.torch import load_file

    saved = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    prefix = "ftl_" if edited.row.peft_type == "FTL" else "lora_"
    assert saved and all(prefix in key for key in saved), "the adapter file must hold adapter weights only"
    fresh = tiny_backbone(edited.row.model_type, seed=0, texts=WORDS)  # same seed: the same base weights
    loaded = PeftModel.from_pretrained(fresh.model, str(tmp_path))
    torch.testing.assert_close(_logits(loaded, edited.edit_batch).logits, edited_logits, rtol=0, atol=1e-6)


def test_rollback_restores_base_outputs_and_hash(edited: Edited):
    assert edited.base.digest() == edited.base_digest, "the edit wrote into the base weights"
    edited.snapshot.restore()
    assert torch.equal(_logits(edited.peft_model, edited.edit_batch).logits, edited.base_edit_logits)
    edited.base.check(edited.base_digest, context="after restoring the adapter")
    model = edited.peft_model.unload()
    assert not hasattr(model, "peft_config")
    assert edited.base.digest() == edited.base_digest
    assert torch.equal(_logits(model, edited.edit_batch).logits, edited.base_edit_logits)


def test_merge_unmerge(edited: Edited):
    edited_logits = _logits(edited.peft_model, edited.edit_batch).logits
    edited.peft_model.merge_adapter()
    assert edited.base.digest() != edited.base_digest  # merged: the base weights hold the edit
    torch.testing.assert_close(
        _logits(edited.peft_model, edited.edit_batch).logits, edited_logits, rtol=1e-4, atol=1e-4
    )
    edited.peft_model.unmerge_adapter()
    if edited.row.exact_unmerge:
        edited.base.check(edited.base_digest, context="after unmerge")
    torch.testing.assert_close(
        _logits(edited.peft_model, edited.edit_batch).logits, edited_logits, rtol=1e-4, atol=1e-4
    )


def test_rollback_check_catches_a_write_into_the_base(edited: Edited):
    from odedit_hf.editing import RollbackError

    name = edited.method.target_modules(edited.backbone)[0]
    weight = edited.peft_model.get_base_model().get_submodule(name).get_base_layer().weight
    with torch.no_grad():
        weight[0, 0] += 1e-3
    with pytest.raises(RollbackError, match="base weights changed .*" + re.escape(name)):
        edited.base.check(edited.base_digest, context="after a bad editor")


NORM_ROWS = [r for r in ROWS if r.case.endswith("-norm")]


@pytest.mark.parametrize("edited", NORM_ROWS, ids=[r.case for r in NORM_ROWS], indirect=True)
def test_norm_constraint_bounds_the_delta(edited: Edited):
    bound = getattr(edited.method, "norm_constraint", None)
    assert bound is not None, f"row {edited.row.case} is meant to set a norm constraint"
    deltas = [p for n, p in edited.peft_model.named_parameters() if "ftl_delta" in n]
    assert deltas and max(d.abs().max().item() for d in deltas) <= bound + 1e-7
    assert max(d.abs().max().item() for d in deltas) > bound / 2, "the constraint was never approached"


def test_ftl_config_validates_and_defaults_from_the_registry():
    from odedit_hf.editors.ft import FTLConfig, FTLLayer

    for bad in (
        {"norm_constraint": -1.0},
        {"target_modules": []},
        {"layers_to_transform": [-1]},
        {"target_modules": 3},
    ):
        with pytest.raises(ValueError, match="FTLConfig"):
            FTLConfig(**bad)
    backbone = tiny_backbone("llama", seed=0)
    peft_model = get_peft_model(backbone.model, FTLConfig(layers_to_transform=[1]))
    edited = [n for n, m in peft_model.named_modules() if isinstance(m, FTLLayer)]
    assert edited == ["base_model.model.model.layers.1.mlp.down_proj"]  # llama's default_edit_projections


def test_ftl_refuses_modules_that_are_not_linear():
    from odedit_hf.editors.ft import FTLConfig

    backbone = tiny_backbone("llama", seed=0)
    with pytest.raises(ValueError, match="not torch.nn.Linear"):
        get_peft_model(backbone.model, FTLConfig(target_modules=["model.layers.0.input_layernorm"]))

"""Protocols (single with rollback, sequential, batch), request scoring, results file and table."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest
import torch

from odedit_hf.data import load_mmedit
from odedit_hf.editing import EditStats, RollbackError, model_inputs
from odedit_hf.editors.ftl import FTLMethod
from odedit_hf.editors.lora import LoRAMethod
from odedit_hf.evaluation import (
    build_report,
    evaluate_request,
    format_table,
    locality_reference,
    run_protocol,
    write_json_atomic,
)
from odedit_hf.testing import tiny_backbone
from odedit_hf.testing.tiny import tiny_image

WORDS = [
    "what is the capital of France? Tokyo Paris London",
    "which animal is this? a green circle red square blue",
    "what is the color of the sky? yes no",
]
ALTS = ["Tokyo", "London", "a green circle", "yes"]


def write_mmedit(folder, n: int = 4) -> str:
    """A small MMEdit file with PNGs beside it; returns its path."""
    os.makedirs(folder, exist_ok=True)
    for i in range(3):
        tiny_image(i).save(os.path.join(folder, f"img{i}.png"))
    records = [
        {
            "src": "what is the capital of France?",
            "pred": "Paris",
            "alt": ALTS[i % len(ALTS)],
            "image": f"img{i % 2}.png",
            "rephrase": "which animal is this?",
            "image_rephrase": "img2.png",
            "loc": "what is the color of the sky?",
            "loc_ans": "blue",
            "m_loc": "img2.png",
            "m_loc_q": "which animal is this?",
            "m_loc_a": "a red square",
        }
        for i in range(n)
    ]
    path = os.path.join(folder, "edits.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


@pytest.fixture(scope="module")
def requests_(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mmedit")
    path = write_mmedit(folder)
    return list(load_mmedit(path, folder))


@pytest.fixture
def backbone():
    return tiny_backbone("llava", seed=0, texts=WORDS)


def _logits(model, batch):
    with torch.no_grad():
        return model(**model_inputs(batch)).logits


def test_single_rolls_back_every_edit_and_returns_the_model_unchanged(backbone, requests_):
    from odedit_hf.backbones import PromptSample

    probe = backbone.build_batch([PromptSample("what is the capital of France?", "Paris", tiny_image(0))])
    before = _logits(backbone.model, probe)
    flags = {n: p.requires_grad for n, p in backbone.model.named_parameters()}
    run = run_protocol("single", FTLMethod(steps=15, lr=5e-2), backbone, requests_, seed=0)
    assert [r.case_id for r in run.results] == [0, 1, 2, 3]
    assert run.rollback_checks == len(requests_) + 1  # after every edit, and after unloading
    assert all(r.protocol == "single" and r.method == "ftl" and r.final is None for r in run.results)
    assert all(r.steps > 0 and r.wall_time_s > 0 and r.peak_memory_mb > 0 for r in run.results)
    # every edit took on the edited model (the base scores 0.0 on these targets, measured), and was
    # scored before its rollback
    assert [r.post.reliability for r in run.results] == [1.0, 1.0, 1.0, 1.0]
    assert not hasattr(backbone.model, "peft_config")
    assert torch.equal(_logits(backbone.model, probe), before)
    assert {n: p.requires_grad for n, p in backbone.model.named_parameters()} == flags


@dataclass
class CheatingFT(FTLMethod):
    """Edits the base weights in place instead of its adapter: the rollback check must catch it."""

    name = "cheat"

    def edit(self, peft_model, backbone, requests):
        name = self.target_modules(backbone)[0]
        layer = peft_model.get_base_model().get_submodule(name).get_base_layer()
        with torch.no_grad():
            layer.weight.add_(1e-3)
        return EditStats(steps=1, final_loss=None)


def test_single_raises_when_an_editor_writes_into_the_base(backbone, requests_):
    with pytest.raises(RollbackError, match="base weights changed after rolling back the edit of case"):
        run_protocol("single", CheatingFT(), backbone, requests_[:1])
    assert not hasattr(backbone.model, "peft_config"), "the adapter must be unloaded even after a failure"


def test_sequential_scores_each_edit_after_it_and_on_the_final_model(backbone, requests_):
    finals = []

    def score_the_final_model(model):  # called while the adapter holds every edit
        for request in requests_:
            reference = locality_reference(model, backbone, request)
            finals.append(evaluate_request(model, backbone, request, reference).to_dict())

    run = run_protocol(
        "sequential",
        LoRAMethod(steps=20, lr=5e-2),
        backbone,
        requests_,
        seed=0,
        on_adapter=score_the_final_model,
    )
    assert run.protocol == "sequential" and run.rollback_checks == 2
    # `final` is every request scored on the model holding all edits (scored here independently)
    assert [r.final.to_dict() for r in run.results] == finals
    # the same prompt is edited to different answers, so later edits must overwrite earlier ones
    assert run.results[0].final.reliability < run.results[0].post.reliability


def test_batch_edits_k_requests_in_one_optimisation(backbone, requests_):
    calls = []

    @dataclass
    class RecordingFT(FTLMethod):
        def edit(self, peft_model, backbone, requests):
            calls.append([r.case_id for r in requests])
            return super().edit(peft_model, backbone, requests)

    run = run_protocol("batch", RecordingFT(steps=10), backbone, requests_, batch_size=3, seed=0)
    assert run.batch_size == 3 and run.rollback_checks == 2 + 1  # two batches, then the unload
    assert calls == [[0, 1, 2], [3]]  # one optimisation for the first three, one for the last
    assert [r.case_id for r in run.results] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="batch_size"):
        run_protocol("batch", FTLMethod(), backbone, requests_)
    with pytest.raises(ValueError, match="unknown protocol"):
        run_protocol("parallel", FTLMethod(), backbone, requests_)


def test_a_fresh_adapter_scores_perfect_locality_and_the_base_accuracy(backbone, requests_):
    from peft import get_peft_model

    from odedit_hf.evaluation import token_accuracy

    method = LoRAMethod()
    peft_model = get_peft_model(backbone.model, method.peft_config(backbone))
    request = requests_[0]
    reference = locality_reference(peft_model, backbone, request)
    scores = evaluate_request(peft_model, backbone, request, reference)
    assert scores.t_locality == scores.m_locality == 1.0
    assert scores.t_locality_easyedit == scores.m_locality_easyedit == 1.0
    # reliability is the base model's own token accuracy on the edit prompt
    from odedit_hf.editing import edit_sample

    batch = backbone.build_batch([edit_sample(request)])
    with peft_model.disable_adapter():
        accuracy, _ = token_accuracy(_logits(peft_model, batch), batch["labels"])
    assert scores.reliability == pytest.approx(accuracy.item())
    # a perturbed adapter moves locality off 1 in the all-positions mode
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1.0)
    moved = evaluate_request(peft_model, backbone, request, reference)
    assert moved.m_locality_easyedit < 1.0
    peft_model.unload()


def test_report_table_and_atomic_file(backbone, requests_, tmp_path):
    run = run_protocol("sequential", FTLMethod(steps=5), backbone, requests_[:2], seed=3)
    report = build_report(run, config={"note": "test"}, device="cpu")
    for key in ("reliability", "t_generality", "m_generality", "t_locality", "m_locality", "reliability_em"):
        assert key in report["aggregates"]["post"] and key in report["aggregates"]["final"]
    assert report["locality_modes"]["t_locality"] == "answer"
    assert report["locality_modes"]["m_locality_easyedit"] == "easyedit"
    assert report["seed"] == 3 and report["protocol"] == "sequential" and report["metric_version"]
    assert len(report["edits"]) == 2 and report["rollback"]["checks"] == 2
    path = write_json_atomic(tmp_path / "out" / "results.json", report)
    with open(path) as f:
        assert json.load(f)["aggregates"] == json.loads(json.dumps(report["aggregates"]))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["results.json"]  # no temp file left behind
    table = format_table(report)
    for word in (
        "reliability",
        "t_generality",
        "m_generality",
        "t_locality",
        "m_locality",
        "answer",
        "easyedit",
        "final",
    ):
        assert word in table


def test_device_fingerprint_detects_single_changes_and_swaps():
    from odedit_hf.editing.rollback import _device_fingerprint

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(300, 7, generator=gen).to(dtype)
        ref = _device_fingerprint(a)
        assert _device_fingerprint(a.clone()) == ref
        bumped = a.clone()
        bumped[5, 3] += 1
        assert _device_fingerprint(bumped) != ref
        swapped = a.clone()
        swapped[0, 0], swapped[0, 1] = a[0, 1], a[0, 0]
        assert _device_fingerprint(swapped) != ref  # position-weighted sum sees a permutation


@pytest.mark.slow
def test_ft_single_edits_hold_on_the_micro_world(micro_world):
    """On a model that really learned its facts: the edits take, and the pre-edit answers were the old facts."""
    from odedit_hf.cli.edit import load_backbone

    backbone = load_backbone(micro_world.model_dir)
    requests = list(
        load_mmedit(micro_world.vqa_eval, micro_world.image_root, micro_world.rephrase_image_root, limit=8)
    )
    run = run_protocol("single", FTLMethod(), backbone, requests, seed=0)
    from odedit_hf.evaluation import aggregate

    scores = aggregate(run.results)
    assert scores["reliability"] >= 0.9
    assert run.rollback_checks == len(requests) + 1
    assert all(0.0 <= scores[k] <= 1.0 for k in scores)
    assert max(r.steps for r in run.results) <= FTLMethod().steps

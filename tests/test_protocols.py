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


def _fingerprint_by_hand(t: torch.Tensor) -> bytes:
    """The documented fingerprint in plain Python: the raw bits as integers, their sum and their sum
    weighted by (i·2654435761 mod 4294967291)·2 + 1, both wrapped to int64."""
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    xs = t.contiguous().reshape(-1).view(width).tolist()
    wrap = lambda v: (v + 2**63) % 2**64 - 2**63  # noqa: E731
    total = wrap(sum(xs))
    weighted = wrap(sum(x * ((i * 2654435761) % 4294967291 * 2 + 1) for i, x in enumerate(xs)))
    return f"{total}:{weighted}".encode()


@pytest.mark.parametrize("chunk", [None, 64])
def test_device_fingerprint_is_the_documented_checksum(chunk, monkeypatch):
    """Pinned against a hand computation, in one chunk and across several (the chunked sums must add up:
    a chunk that overwrote the running totals would fingerprint only the last chunk)."""
    from odedit_hf.editing import rollback

    if chunk is not None:
        monkeypatch.setattr(rollback, "_CHUNK", chunk)
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16, torch.float64, torch.uint8):
        t = torch.randn(201, generator=gen).mul(50).to(dtype)
        assert rollback._device_fingerprint(t) == _fingerprint_by_hand(t), dtype


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


# ------------------------------------------------------------------- optional probes (issue 18)
def write_probe_mmedit(folder) -> str:
    """The records of :func:`write_mmedit` plus every probe field, in one file."""
    path = write_mmedit(folder, n=2)
    with open(path) as f:
        records = json.load(f)
    for i, rec in enumerate(records):
        rec.update(
            {
                "portability": {
                    "by_name": [{"prompt": "what is the capital of France?", "ground_truth": rec["alt"]}],
                    "one_hop": [
                        {
                            "prompt": "which animal is this?",
                            "ground_truth": "a green circle",
                            "image": "img2.png",
                        }
                    ],
                },
                "hard_loc": "what is the color of the sky?",
                "hard_loc_ans": "yes",
                "hard_m_loc": "img1.png" if i == 0 else "img0.png",
                "hard_m_loc_q": "what is the color of the sky?",
                "hard_m_loc_a": "blue",
                "rephrases": ["which animal is this?", "what is the color of the sky?"],
                "image_rephrases": ["img2.png", "img1.png"],
            }
        )
    with open(path, "w") as f:
        json.dump(records, f)
    return path


@pytest.fixture(scope="module")
def probe_requests(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mmedit_probes")
    return list(load_mmedit(write_probe_mmedit(folder), folder))


def _strip_probes(request):
    import dataclasses

    return dataclasses.replace(
        request,
        portability=(),
        hard_loc=None,
        hard_loc_ans=None,
        hard_m_loc=None,
        hard_m_loc_q=None,
        hard_m_loc_a=None,
        rephrases=(),
        image_rephrases=(),
    )


def test_probe_scores_by_hand_on_a_fresh_adapter(backbone, probe_requests):
    from peft import get_peft_model

    from odedit_hf.editing.samples import probe_samples
    from odedit_hf.evaluation import token_accuracy

    peft_model = get_peft_model(backbone.model, LoRAMethod().peft_config(backbone))
    request = probe_requests[0]
    reference = locality_reference(peft_model, backbone, request)
    assert reference.hard_t_ids is not None and reference.hard_m_ids.shape[-1] == 10
    scores = evaluate_request(peft_model, backbone, request, reference)
    # a fresh adapter is the identity: the look-alike's answers agree with the pre-edit model
    assert scores.hard_t_locality == scores.hard_m_locality == 1.0
    assert scores.hard_t_locality_easyedit == scores.hard_m_locality_easyedit == 1.0
    # portability and the unit are the base model's token accuracy on the probes, reduced by hand
    probes = probe_samples(request)
    assert [s.image is None for s in probes["portability"]] == [True, False]
    assert len(probes["unit"]) == 4  # 2 text rephrases on the edit image + 2 image rephrases with src

    def per_sample(samples):
        with peft_model.disable_adapter():
            out = [
                token_accuracy(
                    _logits(peft_model, backbone.build_batch([s])), backbone.build_batch([s])["labels"]
                )
                for s in samples
            ]
        return [a.item() for a, _ in out], [e.item() for _, e in out]

    acc, em = per_sample(probes["portability"])
    assert scores.portability == pytest.approx(sum(acc) / 2) and scores.portability_em == pytest.approx(
        sum(em) / 2
    )
    acc, em = per_sample(probes["unit"])
    assert scores.unit_generality == pytest.approx(sum(acc) / 4)
    assert scores.unit_consistency == float(all(e == 1.0 for e in em))
    # the five metrics do not depend on the probes: the same request without them scores the same
    plain = _strip_probes(request)
    plain_scores = evaluate_request(
        peft_model, backbone, plain, locality_reference(peft_model, backbone, plain)
    )
    assert plain_scores.present() == ()
    assert plain_scores.to_dict() == {
        k: v for k, v in scores.to_dict().items() if k in plain_scores.to_dict()
    }
    # a perturbed adapter moves the hard-negative agreement in the all-positions mode
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1.0)
    moved = evaluate_request(peft_model, backbone, request, reference)
    assert moved.hard_m_locality_easyedit < 1.0 and moved.hard_t_locality_easyedit < 1.0
    # a reference from before the probes (no hard ids) leaves hard locality absent, not zero
    old = type(reference)(t_ids=reference.t_ids, m_ids=reference.m_ids)
    partial = evaluate_request(peft_model, backbone, request, old)
    assert "hard_t_locality" not in partial.to_dict() and "portability" in partial.to_dict()
    peft_model.unload()


def test_probe_columns_in_report_table_and_absent_without_probes(backbone, probe_requests, requests_):
    run = run_protocol("sequential", FTLMethod(steps=5), backbone, probe_requests, seed=0)
    report = build_report(run, device="cpu")
    for which in ("post", "final"):
        agg = report["aggregates"][which]
        for key in (
            "portability",
            "portability_em",
            "hard_t_locality",
            "hard_m_locality_easyedit",
            "unit_consistency",
        ):
            assert 0.0 <= agg[key] <= 1.0
    assert (
        report["probe_counts"]["unit_consistency"] == 2
        and report["locality_modes"]["hard_m_locality"] == "answer"
    )
    table = format_table(report)
    for row in ("portability", "unit", "hard_t_locality", "hard_m_locality", "probes:"):
        assert row in table
    # plain MMEdit data: the optional keys are absent from aggregates, table and edits (not zero)
    plain = build_report(run_protocol("single", FTLMethod(steps=2), backbone, requests_[:2], seed=0))
    assert plain["probe_counts"] == {}
    assert not {"portability", "hard_t_locality", "unit_consistency"} & set(plain["aggregates"]["post"])
    assert "portability" not in format_table(plain) and "hard_" not in format_table(plain)
    assert all("portability" not in e["post"] for e in plain["edits"])

"""Tests that catch the bugs an audit planted and the rest of the suite let through (issue 20).

Each test names the fault it guards against. All run on the tiny random LLaVA of
:mod:`odedit_hf.testing` (no world build), with a handful of optimiser steps.
"""

from __future__ import annotations

import copy
import os
import re
from types import SimpleNamespace

import pytest
import torch

import odedit_hf  # noqa: F401  (registers the PEFT types)
from odedit_hf.editing import BaseWeights, RollbackError, model_inputs
from odedit_hf.editing.rollback import BaseWeights as _BaseWeightsClass
from odedit_hf.editors.ftl import FTLMethod
from odedit_hf.evaluation import run_protocol

TEXTS = [
    "what color is the cube",
    "which colour has the cube",
    "what is the capital of france",
    "what animal is this",
    "red",
    "blue",
    "paris",
    "cat",
]


@pytest.fixture(scope="module")
def requests(tmp_path_factory):  # noqa: ANN001, ANN201
    """Three requests on one prompt with three different new answers (so edits visibly interfere)."""
    from odedit_hf.data import EditRequest
    from odedit_hf.testing import tiny_image

    root = tmp_path_factory.mktemp("survivor-images")
    paths = []
    for i in range(4):
        paths.append(os.path.join(root, f"img{i}.png"))
        tiny_image(20 + i).save(paths[-1])
    common = {
        "task": "vqa",
        "source": "in-memory",
        "src": "what color is the cube",
        "pred": "red",
        "rephrase": "which colour has the cube",
        "loc": "what is the capital of france",
        "loc_ans": "paris",
        "m_loc": paths[3],
        "m_loc_q": "what animal is this",
        "m_loc_a": "cat",
    }
    return [
        EditRequest(case_id=i, alt=alt, image=paths[i % 3], image_rephrase=paths[(i + 1) % 3], **common)
        for i, alt in enumerate(["blue", "paris", "cat"])
    ]


def _backbone():  # noqa: ANN202
    from odedit_hf.testing import tiny_backbone

    return tiny_backbone("llava", texts=TEXTS)


def _ftl(steps: int = 6) -> FTLMethod:
    return FTLMethod(steps=steps, lr=2e-3, stop_loss=None)


def _wrap(method, backbone):  # noqa: ANN001, ANN202
    from peft import get_peft_model

    return get_peft_model(backbone.model, method.peft_config(backbone))


def _perturb_adapter(peft_model, scale: float, seed: int = 0) -> None:  # noqa: ANN001
    """Give every trainable adapter parameter seeded noise: a non-identity adapter, reproducibly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _edit_batch(backbone, requests, config):  # noqa: ANN001, ANN202
    from odedit_hf.editing.environments import build_edit_batch
    from odedit_hf.methods.odedit.risks import needed_groups

    return build_edit_batch(backbone, requests, needed_groups(config), num_rephrases=config.num_rephrases)


# ------------------------------------------------------------------ (1) protocols reset the adapter
@pytest.mark.parametrize(("protocol", "batch_size"), [("single", None), ("batch", 2)])
def test_each_edit_starts_from_a_fresh_adapter(protocol: str, batch_size, requests) -> None:  # noqa: ANN001
    """The later edit of a run equals the same edit run alone: it never saw the earlier edits.

    Caught fault: the protocols stop restoring the adapter snapshot between edits, so edits pile up.
    """
    backbone = _backbone()
    after_others = run_protocol(protocol, _ftl(), backbone, requests, seed=0, batch_size=batch_size)
    # batch_size=2 edits [0, 1] together, then [2]: request 2 is last, alone in its optimisation both times
    alone = run_protocol(protocol, _ftl(), backbone, requests[2:], seed=0, batch_size=batch_size)
    got, want = after_others.results[-1], alone.results[0]
    assert got.case_id == want.case_id == 2
    # same optimisation from the same start: identical loss and scores, to the bit
    assert got.final_loss == want.final_loss
    assert got.post.to_dict() == want.post.to_dict()
    # precondition: an edit that does start from the earlier ones ends elsewhere (so equality is not vacuous)
    piled = run_protocol("sequential", _ftl(), backbone, requests, seed=0).results[-1]
    assert piled.final_loss != pytest.approx(want.final_loss, rel=1e-4)


# ------------------------------------------------------------------ (2) ODEdit's total
def test_odedit_total_is_its_documented_composition(requests) -> None:  # noqa: ANN001
    """``total = R_rel + alpha·R_loc + beta·R_gen + λ·P`` with every term non-zero and distinct weights.

    Caught fault: a sign flipped in the composition (``- alpha·R_loc``), a weight dropped or swapped.
    """
    from odedit_hf.methods.odedit import ODEditMethod
    from odedit_hf.methods.odedit.objective import ODEditObjective

    backbone = _backbone()
    method = ODEditMethod(_ftl(), objective={"alpha": 0.7, "beta": 0.3})
    peft_model = _wrap(method, backbone)
    config = peft_model.peft_config["default"]
    batch = _edit_batch(backbone, requests[:1], config)
    objective = ODEditObjective(config, backbone)
    with peft_model.disable_adapter():
        objective.prepare(backbone.forward, batch)
    _perturb_adapter(peft_model, 0.05)  # post-edit model != pre-edit model: R_loc > 0
    lam = torch.tensor(0.45)
    with torch.no_grad():
        terms = objective(backbone.forward, batch, lam)
    r_rel, r_loc, r_gen, penalty = (float(t) for t in (terms.r_rel, terms.r_loc, terms.r_gen, terms.penalty))
    assert min(r_rel, r_loc, r_gen, penalty) > 1e-6, (r_rel, r_loc, r_gen, penalty)
    expected = r_rel + 0.7 * r_loc + 0.3 * r_gen + 0.45 * penalty
    assert float(terms.total) == pytest.approx(expected, rel=1e-6, abs=1e-9)
    # the composition is sensitive to each term at this tolerance (so a flipped sign cannot pass)
    for term in (0.7 * r_loc, 0.3 * r_gen, 0.45 * penalty):
        assert abs(2 * term) > 1e-6 * abs(expected)


# ------------------------------------------------------------------ (3) the dual step in the loop
def test_the_per_edit_loop_moves_lambda_by_dual_ascent(requests, monkeypatch) -> None:  # noqa: ANN001
    """λ after an edit is above λ before it: the penalty is positive, so the dual ascent raised it.

    Compared on the same final edit parameters, so only the λ-network's own step counts (in
    ``sketch`` mode λ also moves with the primal parameters).
    Caught fault: ``PrimalDualObjective.after_optimizer_step`` does nothing (λ never moves).
    """
    from odedit_hf.methods.odedit import ODEditMethod
    from odedit_hf.methods.odedit import method as method_module

    built = []
    original = method_module.build_lambda_network

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        net, optimizer = original(*args, **kwargs)
        built.append((net, copy.deepcopy(net), args[1]))
        return net, optimizer

    monkeypatch.setattr(method_module, "build_lambda_network", spy)
    backbone = _backbone()
    # version-1 dual (Softplus, no slack, penalty from step 0): λ can only rise while P > 0; the version-2
    # default (log-λ with slack 0.5) lets it fall when P < 0.5 -- tested in tests/test_odedit_schedule.py
    v1 = {"schedule": "from_start", "lambda_param": "softplus", "dual_slack": 0.0}
    method = ODEditMethod(_ftl(steps=4), objective={"lambda_init": 0.5, "lambda_lr": 1.0, **v1})
    peft_model = _wrap(method, backbone)
    method.edit(peft_model, backbone, requests[:1])
    assert len(built) == 1
    net, initial, params = built[0]
    with torch.no_grad():
        before, after = float(initial(params)), float(net(params))
    assert after > before + 1e-3, (before, after)


# ------------------------------------------------------------------ (4) MMD bandwidths fixed pre-edit
def test_mmd_bandwidths_come_from_the_pre_edit_model(requests) -> None:  # noqa: ANN001
    """``R_gen`` on an edited model uses the bandwidths measured on the pre-edit model.

    The oracle is the documented equivalence: the median heuristic measured before the edit gives the
    same ``R_gen`` as passing those very bandwidths explicitly (``mmd_bandwidths``).
    Caught fault: bandwidths recomputed from the current (edited) hidden states at every step.
    """
    import dataclasses

    from odedit_hf.methods.odedit import ODEditMethod
    from odedit_hf.methods.odedit.objective import ODEditObjective

    backbone = _backbone()
    method = ODEditMethod(_ftl())
    peft_model = _wrap(method, backbone)
    config = peft_model.peft_config["default"]
    batch = _edit_batch(backbone, requests[:1], config)
    heuristic = ODEditObjective(config, backbone)
    with peft_model.disable_adapter():
        heuristic.prepare(backbone.forward, batch)
    pre_sigmas = heuristic.pre.bandwidths[requests[0].case_id]
    explicit = ODEditObjective(dataclasses.replace(config, mmd_bandwidths=tuple(pre_sigmas)), backbone)
    with peft_model.disable_adapter():
        explicit.prepare(backbone.forward, batch)
    _perturb_adapter(peft_model, 0.2)  # the edited model's hidden states are spread differently
    with torch.no_grad():
        got = float(heuristic(backbone.forward, batch, torch.tensor(0.0)).r_gen)
        want = float(explicit(backbone.forward, batch, torch.tensor(0.0)).r_gen)
        # precondition: bandwidths measured on the edited model would give another R_gen
        post = ODEditObjective(config, backbone)
        post.prepare(backbone.forward, batch)
        moved = float(post(backbone.forward, batch, torch.tensor(0.0)).r_gen)
    assert post.pre.bandwidths[requests[0].case_id] != pytest.approx(pre_sigmas, rel=1e-3)
    assert abs(moved - want) > 1e-3 * abs(want)
    assert got == pytest.approx(want, rel=1e-6)


# ------------------------------------------------------------------ (5) the generality anchor
@pytest.mark.parametrize("anchor", [True, False])
def test_generality_anchor_blocks_the_gradient_through_the_edit_prompt(anchor: bool, requests) -> None:  # noqa: ANN001
    """With ``gen_anchor_edit`` no gradient of ``R_gen`` reaches the edit prompt's hidden states; the
    rephrases' states get one either way, and without the anchor the edit prompt's do too.

    Caught fault: the anchor's detach inverted (the rephrases frozen, the edit prompt dragged).
    """
    from odedit_hf.methods.odedit import ODEditMethod
    from odedit_hf.methods.odedit.objective import ODEditObjective

    backbone = _backbone()
    method = ODEditMethod(_ftl(), objective={"gen_anchor_edit": anchor})
    peft_model = _wrap(method, backbone)
    config = peft_model.peft_config["default"]
    batch = _edit_batch(backbone, requests[:1], config)
    objective = ODEditObjective(config, backbone)
    with peft_model.disable_adapter():
        objective.prepare(backbone.forward, batch)
    _perturb_adapter(peft_model, 0.05)
    hidden: list[torch.Tensor] = []

    def forward(inputs, **kwargs):  # noqa: ANN001, ANN003, ANN202
        outputs = backbone.forward(inputs, **kwargs)
        if kwargs.get("output_hidden_states"):
            hidden.append(backbone.last_hidden_states(outputs))
        return outputs

    terms = objective(forward, batch, torch.tensor(0.0))
    grads = torch.autograd.grad(terms.r_gen, hidden, allow_unused=True)

    def norm(group: str) -> float:
        b, start, stop = batch.slices[group]
        g = grads[b]
        return 0.0 if g is None else float(g[start:stop].abs().sum())

    assert all(norm(kind) > 0 for kind in config.rephrase_kinds)
    if anchor:
        assert norm("edit") == 0.0
    else:
        assert norm("edit") > 0


# ------------------------------------------------------------------ (6) easyedit m-locality is top-10
def test_easyedit_agreement_compares_k_slots_on_constructed_logits() -> None:
    """Same top-1 everywhere, ranks 2-3 swapped at one of two positions: top-1 says 1, top-10 says 0.9."""
    from odedit_hf.evaluation.metrics import EASYEDIT_IMAGE_TOPK, EASYEDIT_TEXT_TOPK, easyedit_agreement

    assert (EASYEDIT_TEXT_TOPK, EASYEDIT_IMAGE_TOPK) == (1, 10)
    pre = torch.arange(12, 0, -1, dtype=torch.float32).repeat(1, 2, 1)  # (1, 2, 12): id 0 best, id 11 worst
    post = pre.clone()
    post[0, 0, 1], post[0, 0, 2] = pre[0, 0, 2], pre[0, 0, 1]  # position 0: ranks 2 and 3 swapped
    mask = torch.ones(1, 2, dtype=torch.long)
    assert float(easyedit_agreement(pre, post, mask, k=1)[0]) == 1.0
    assert float(easyedit_agreement(pre, post, mask, k=10)[0]) == pytest.approx((8 / 10 + 1) / 2)
    # padding positions do not count
    assert float(easyedit_agreement(pre, post, torch.tensor([[0, 1]]), k=10)[0]) == 1.0


def test_multimodal_easyedit_locality_is_top10_text_is_top1(requests) -> None:  # noqa: ANN001
    """Scored locality (easyedit mode) equals the element-wise top-10 agreement on the m-locality sample
    and top-1 on the text sample, on an adapter where top-1 and top-10 give different numbers.

    Caught fault: M-Locality (easyedit mode) computed with top-1.
    """
    from odedit_hf.editing import model_inputs
    from odedit_hf.editing.samples import eval_samples
    from odedit_hf.evaluation import evaluate_request, locality_reference
    from odedit_hf.evaluation.metrics import easyedit_agreement

    backbone = _backbone()
    peft_model = _wrap(_ftl(), backbone)
    request = requests[0]
    reference = locality_reference(peft_model, backbone, request)
    samples = eval_samples(request)
    batches = {key: backbone.build_batch([samples[f"{key}_locality"]]) for key in ("t", "m")}
    with torch.no_grad(), peft_model.disable_adapter():
        pre = {key: peft_model(**model_inputs(b)).logits.float() for key, b in batches.items()}
    _perturb_adapter(peft_model, 0.02, seed=3)
    scores = evaluate_request(peft_model, backbone, request, reference)
    with torch.no_grad():
        post = {key: peft_model(**model_inputs(b)).logits.float() for key, b in batches.items()}

    def agreement(key: str, k: int) -> float:
        return float(easyedit_agreement(pre[key], post[key], batches[key]["attention_mask"], k=k)[0])

    assert agreement("m", 1) != pytest.approx(agreement("m", 10), abs=1e-3)  # the modes differ here
    assert scores.m_locality_easyedit == pytest.approx(agreement("m", 10), abs=1e-6)
    assert scores.t_locality_easyedit == pytest.approx(agreement("t", 1), abs=1e-6)


# ------------------------------------------------------------------ (7) the final check after unloading
class _CountingChecks:
    """Counts every real hash comparison of :class:`BaseWeights` (a spy, behaviour unchanged)."""

    def __init__(self, monkeypatch) -> None:  # noqa: ANN001
        self.calls = 0
        original = _BaseWeightsClass.check

        def check(this, expected, *, context):  # noqa: ANN001, ANN202
            self.calls += 1
            return original(this, expected, context=context)

        monkeypatch.setattr(_BaseWeightsClass, "check", check)


@pytest.mark.parametrize(("protocol", "batch_size"), [("single", None), ("sequential", None), ("batch", 2)])
def test_rollback_checks_count_the_real_hash_checks(protocol: str, batch_size, requests, monkeypatch) -> None:  # noqa: ANN001
    """``ProtocolRun.rollback_checks`` is the number of hash comparisons actually made, the final one
    after unloading included (a hard-coded ``+ 1`` would hide a dropped check)."""
    counter = _CountingChecks(monkeypatch)
    run = run_protocol(protocol, _ftl(steps=1), _backbone(), requests, seed=0, batch_size=batch_size)
    assert run.rollback_checks == counter.calls
    per_edit = {"single": len(requests), "sequential": 1, "batch": 2}[protocol]
    assert counter.calls == per_edit + 1  # + the check after unloading


def test_an_adapter_merged_at_unload_is_caught_by_the_final_check(requests) -> None:  # noqa: ANN001
    """The unload merges the sequential edits into the base instead of dropping them: only the hash
    check after unloading can see it (every earlier check ran before).

    Caught fault: the final hash check after unloading dropped.
    """
    backbone = _backbone()
    before = BaseWeights(backbone.model).digest()

    def merge_on_unload(peft_model) -> None:  # noqa: ANN001
        peft_model.unload = peft_model.merge_and_unload  # this run's unload now merges

    with pytest.raises(RollbackError, match="after unloading the adapter"):
        run_protocol("sequential", _ftl(steps=2), backbone, requests[:2], seed=0, on_adapter=merge_on_unload)
    assert not hasattr(backbone.model, "peft_config")
    assert BaseWeights(backbone.model).digest() != before  # the base really was written


# ------------------------------------------------------------------ (8) buffers are base weights too
def test_base_weight_hash_covers_buffers() -> None:
    """A changed buffer (a rotary table, a norm's running stats) fails the check and is named.

    Caught fault: the base-weight hash skips buffers.
    """
    backbone = _backbone()
    model = backbone.model
    buffers = dict(model.named_buffers())
    assert "model.language_model.rotary_emb.inv_freq" in buffers
    base = BaseWeights(model)
    digest = base.digest()
    base.check(digest, context="untouched")
    with torch.no_grad():
        buffers["model.language_model.rotary_emb.inv_freq"].mul_(1.5)
    with pytest.raises(RollbackError, match=r"changed: model\.language_model\.rotary_emb\.inv_freq"):
        base.check(digest, context="after touching a buffer")


def test_base_weight_hash_covers_a_plain_module_buffer() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    base = BaseWeights(model)
    digest = base.digest()
    model[1].running_mean.add_(0.25)
    with pytest.raises(RollbackError, match=r"changed: 1\.running_mean"):
        base.check(digest, context="after a BatchNorm update")


# ------------------------------------------------------------------ (9) sibling-prefix image paths
def test_image_path_in_a_sibling_folder_with_the_root_as_prefix_is_rejected(tmp_path) -> None:  # noqa: ANN001
    """``images/../images_evil/x.png`` resolves outside ``images`` although its string starts with it.

    Caught fault: the containment check done with ``startswith(root)``.
    """
    import json

    from odedit_hf.data import DataValidationError, load_mmedit
    from odedit_hf.data.images import resolve_image_path
    from odedit_hf.testing import tiny_image

    root, evil = tmp_path / "images", tmp_path / "images_evil"
    root.mkdir()
    evil.mkdir()
    tiny_image(0).save(evil / "x.png")
    tiny_image(1).save(root / "ok.png")
    real_root = os.path.realpath(root)
    assert resolve_image_path(real_root, "ok.png", root_arg="image_root") == os.path.join(real_root, "ok.png")
    with pytest.raises(DataValidationError, match="outside image_root"):
        resolve_image_path(real_root, "../images_evil/x.png", root_arg="image_root")
    record = {
        "src": "what is this?",
        "pred": "a",
        "alt": "b",
        "image": "../images_evil/x.png",
        "rephrase": "what is it?",
        "image_rephrase": "ok.png",
        "loc": "q?",
        "loc_ans": "a",
        "m_loc": "ok.png",
        "m_loc_q": "q?",
        "m_loc_a": "a",
    }
    path = tmp_path / "edits.json"
    path.write_text(json.dumps([record]))
    with pytest.raises(DataValidationError, match="outside image_root") as info:
        load_mmedit(path, root)
    assert info.value.field == "image" and info.value.index == 0


# ------------------------------------------------------------------ protocols' mutation survivors (session 12)
def test_edit_seed_is_the_documented_function_of_the_run_seed_and_the_case() -> None:
    """The per-edit seed is pinned: changing it silently changes every published row of the single and batch
    protocols. Values by hand from ``(seed * 1_000_003 + case_id) % (2**63 - 1)``."""
    from odedit_hf.evaluation.protocols import edit_seed

    assert edit_seed(0, 0) == 0 and edit_seed(0, 41) == 41
    assert edit_seed(7, 11) == 7_000_032
    assert edit_seed(2**62, 5) == 4_611_686_018_427_887_910  # wraps below torch.manual_seed's bound
    assert isinstance(edit_seed(3, 2), int)


@pytest.mark.parametrize("protocol", ["single", "batch"])
def test_protocol_defaults_callbacks_and_the_batch_name(protocol: str, requests) -> None:  # noqa: ANN001
    """run_single / run_batch called directly: seed 0, adapter 'default', no checkpointing; on_edit gets
    (index, result) for each edit in order, on_adapter the PEFT model once, holding the last edit."""
    from odedit_hf.evaluation.protocols import run_batch, run_single

    edits, adapters = [], []

    def on_adapter(model) -> None:  # noqa: ANN001
        base = model.get_base_model()
        adapters.append((model.active_adapter, bool(getattr(base, "is_activation_checkpointing", False))))

    callbacks = {"on_edit": lambda i, r: edits.append((i, r)), "on_adapter": on_adapter}
    if protocol == "single":
        run = run_single(_ftl(2), _backbone(), requests, **callbacks)
    else:
        run = run_batch(_ftl(2), _backbone(), requests, batch_size=2, **callbacks)
    assert (run.seed, run.protocol, run.batch_size) == (0, protocol, 1 if protocol == "single" else 2)
    assert [r.protocol for r in run.results] == [protocol] * 3
    assert [i for i, _ in edits] == [0, 1, 2]
    assert all(r is s for (_, r), s in zip(edits, run.results))
    assert adapters == [("default", False)]


@pytest.mark.parametrize("protocol", ["single", "batch"])
def test_protocols_pass_gradient_checkpointing_on(protocol: str, requests) -> None:  # noqa: ANN001
    from odedit_hf.evaluation.protocols import run_batch, run_single

    seen = []
    kwargs = {
        "gradient_checkpointing": True,
        "on_adapter": lambda m: seen.append(bool(m.get_base_model().is_activation_checkpointing)),
    }
    if protocol == "single":
        run_single(_ftl(2), _backbone(), requests, **kwargs)
    else:
        run_batch(_ftl(2), _backbone(), requests, batch_size=3, **kwargs)
    assert seen == [True]


@pytest.mark.parametrize("batch_size", [0, -1, True, 1.5, "2"])
def test_batch_size_must_be_a_positive_int(batch_size, requests) -> None:  # noqa: ANN001
    from odedit_hf.evaluation.protocols import run_batch

    with pytest.raises(ValueError) as info:
        run_batch(_ftl(1), _backbone(), requests, batch_size=batch_size)
    assert str(info.value) == f"batch_size must be a positive int, got {batch_size!r}"


@pytest.mark.parametrize(("protocol", "batch_size"), [("single", None), ("sequential", None), ("batch", 2)])
def test_protocol_run_record_and_a_named_adapter(protocol: str, batch_size, requests) -> None:  # noqa: ANN001
    """Every field of the ProtocolRun is the run's own; the adapter carries the name given; on_edit sees the
    edits in order (sequential included) and on_adapter the last one once."""
    backbone = _backbone()
    digest = BaseWeights(backbone.model).digest()
    edits, adapters = [], []
    run = run_protocol(
        protocol,
        _ftl(2),
        backbone,
        requests,
        seed=5,
        batch_size=batch_size,
        adapter_name="edit",
        on_edit=lambda i, r: edits.append((i, r)),
        on_adapter=lambda m: adapters.append(m.active_adapter),
    )
    assert (run.method, run.protocol, run.seed, run.batch_size) == ("ftl", protocol, 5, batch_size or 1)
    assert run.base_weights_hash == digest
    assert run.stopped_early == [False, False, False]  # stop_loss=None: never stops early
    assert sum(r.wall_time_s for r in run.results) <= run.wall_time_s < 600
    assert [r.protocol for r in run.results] == [protocol] * 3
    assert [i for i, _ in edits] == [0, 1, 2] and all(r is s for (_, r), s in zip(edits, run.results))
    assert adapters == ["edit"]
    assert all((r.final is not None) == (protocol == "sequential") for r in run.results)


def test_protocols_refuse_a_model_already_wrapped_and_name_the_final_check(requests) -> None:  # noqa: ANN001
    from peft import get_peft_model

    backbone = _backbone()
    backbone.model = get_peft_model(backbone.model, _ftl().peft_config(backbone))
    with pytest.raises(ValueError) as info:
        run_protocol("single", _ftl(1), backbone, requests[:1])
    assert str(info.value) == (
        "the backbone's model already carries PEFT adapters; protocols wrap the plain model themselves "
        "(pass a Backbone around the unwrapped transformers model)"
    )
    backbone = _backbone()

    def merge_on_unload(peft_model) -> None:  # noqa: ANN001
        peft_model.unload = peft_model.merge_and_unload

    with pytest.raises(RollbackError) as info:
        run_protocol("sequential", _ftl(steps=2), backbone, requests[:2], on_adapter=merge_on_unload)
    # the sequential check before unloading passes; the merge shows at the end
    assert str(info.value).startswith(
        "base weights changed after unloading the adapter at the end of the run"
    )


@pytest.mark.parametrize("images", [(False, False), (True, False, True), (True, True)])
def test_group_accuracy_scores_every_sample_of_an_image_free_or_mixed_group(images, monkeypatch) -> None:  # noqa: ANN001
    """A probe group with no image sample (a text-only unit or portability) is scored too: every slot of the
    result is written (torch.empty is made NaN-filled here, so a slot left unwritten shows)."""
    from odedit_hf.backbones import PromptSample
    from odedit_hf.evaluation import protocols
    from odedit_hf.evaluation.metrics import token_accuracy
    from odedit_hf.testing import tiny_image

    class _NaNEmpty:
        def __getattr__(self, name: str):  # noqa: ANN204
            return getattr(torch, name)

        def empty(self, *size, **kwargs):  # noqa: ANN002, ANN003, ANN202
            return torch.full(size, float("nan"), **kwargs)

    backbone = _backbone()
    group = [
        PromptSample(TEXTS[i], TEXTS[4 + i], tiny_image(30 + i) if with_image else None)
        for i, with_image in enumerate(images)
    ]
    monkeypatch.setattr(protocols, "torch", _NaNEmpty())
    accuracy, exact = protocols._group_accuracy(backbone.model, backbone, group, torch.device("cpu"))
    monkeypatch.undo()
    expected_acc, expected_em = torch.empty(len(group)), torch.empty(len(group))
    for with_image in (True, False):
        idx = [i for i, flag in enumerate(images) if flag == with_image]
        if idx:
            batch = backbone.build_batch([group[i] for i in idx])
            with torch.no_grad():
                acc, em = token_accuracy(
                    backbone.model(**model_inputs(batch)).logits.float(), batch["labels"]
                )
            expected_acc[idx], expected_em[idx] = acc, em
    assert not accuracy.isnan().any() and not exact.isnan().any()
    assert torch.equal(accuracy, expected_acc) and torch.equal(exact, expected_em)


@pytest.mark.parametrize("gradient_checkpointing", [None, True])
def test_run_sequential_defaults_and_checkpointing(gradient_checkpointing, requests) -> None:  # noqa: ANN001
    """run_sequential called directly: seed 0, adapter 'default', checkpointing off unless asked for."""
    from odedit_hf.evaluation.protocols import run_sequential

    seen = []

    def on_adapter(model) -> None:  # noqa: ANN001
        seen.append((model.active_adapter, bool(model.get_base_model().is_activation_checkpointing)))

    kwargs = {} if gradient_checkpointing is None else {"gradient_checkpointing": True}
    run = run_sequential(_ftl(2), _backbone(), requests[:2], on_adapter=on_adapter, **kwargs)
    assert (run.seed, run.protocol, run.batch_size) == (0, "sequential", 1)
    assert seen == [("default", gradient_checkpointing is True)]


def test_a_locality_reference_of_another_length_is_refused_with_both_shapes(requests):  # noqa: ANN001
    from odedit_hf.editing import eval_samples
    from odedit_hf.evaluation.protocols import _agreements

    backbone = _backbone()
    sample = eval_samples(requests[0])["t_locality"]
    length = backbone.build_batch([sample])["input_ids"].shape[1]
    wrong = torch.zeros(1, length + 3, 10, dtype=torch.long)  # a reference built with another tokenisation
    with pytest.raises(ValueError) as info:
        _agreements(
            backbone.model, backbone, sample, wrong, 10, "t_locality", requests[0], torch.device("cpu")
        )
    assert str(info.value) == (
        f"case 0: the t_locality batch changed length between the pre-edit reference (1, {length + 3}) "
        f"and now (1, {length}); build the reference with the same backbone"
    )


# ------------------------------------------------------------------ evaluate_request's columns
class _RuleModel(torch.nn.Module):
    """A stand-in model whose next-token prediction is right exactly where a rule on the tokens says so:
    at position t the prediction of token t+1 is right iff the sum of the attended ids up to t+1 is not a
    multiple of 3. The rule reads only attended tokens, so a sample scores the same alone or in any batch
    (padding excluded), and samples with different prompts get different accuracies."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # model_device() reads the first parameter

    def forward(self, input_ids, attention_mask, **_):  # noqa: ANN001, ANN003, ANN201
        ids = input_ids * attention_mask
        right = (ids.cumsum(dim=1) % 3 != 0)[:, 1:]
        nxt = input_ids[:, 1:]
        guess = torch.where(right, nxt, (nxt + 1) % self.vocab)
        logits = torch.full((*input_ids.shape, self.vocab), -5.0)
        logits[:, :-1].scatter_(-1, guess.unsqueeze(-1), 5.0)
        return SimpleNamespace(logits=logits)


def _alone(model, backbone, sample) -> tuple[float, float]:  # noqa: ANN001
    from odedit_hf.evaluation.metrics import token_accuracy
    from odedit_hf.evaluation.protocols import _logits

    batch = backbone.build_batch([sample])
    accuracy, exact = token_accuracy(_logits(model, batch), batch["labels"])
    return float(accuracy[0]), float(exact[0])


def _rule_reference(model, backbone, samples):  # noqa: ANN001, ANN202
    from odedit_hf.evaluation import LocalityReference
    from odedit_hf.evaluation.metrics import topk_ids
    from odedit_hf.evaluation.protocols import _logits

    def ids(name: str, k: int) -> torch.Tensor:
        return topk_ids(_logits(model, backbone.build_batch([samples[name]])), k)

    return LocalityReference(t_ids=ids("t_locality", 1), m_ids=ids("m_locality", 10))


def test_evaluate_request_scores_each_column_on_its_own_sample(requests) -> None:  # noqa: ANN001
    """Reliability, T-Generality and M-Generality (accuracy and exact match) each equal the metric on that
    sample alone, on a model where the three samples score differently and M-Generality's accuracy is not
    its exact match.

    Caught faults: reliability (or its EM) read from T-Generality's column; M-Generality read from its EM.
    """
    import dataclasses

    from odedit_hf.editing import eval_samples
    from odedit_hf.evaluation import evaluate_request

    backbone = _backbone()
    model = _RuleModel(backbone.model.config.get_text_config().vocab_size)
    names = ("reliability", "t_generality", "m_generality")
    separates = {"rel vs T-Gen": None, "M-Gen acc vs EM": None}
    for alt in ("red blue", "paris cat blue"):
        for src, rephrase in [(a, b) for a in TEXTS[:4] for b in TEXTS[:4] if a != b]:
            request = dataclasses.replace(requests[0], src=src, rephrase=rephrase, alt=alt)
            samples = eval_samples(request)
            cols = {n: _alone(model, backbone, samples[n]) for n in names}
            (rel, rel_em), (tgen, tgen_em), (mgen, mgen_em) = (cols[n] for n in names)
            if rel != tgen and rel_em != tgen_em:
                separates["rel vs T-Gen"] = separates["rel vs T-Gen"] or (request, samples, cols)
            if mgen != mgen_em:
                separates["M-Gen acc vs EM"] = separates["M-Gen acc vs EM"] or (request, samples, cols)
    assert all(separates.values()), f"no prompt pair separates the columns under the rule: {separates}"
    for request, samples, cols in separates.values():
        scores = evaluate_request(model, backbone, request, _rule_reference(model, backbone, samples))
        assert (scores.reliability, scores.reliability_em) == pytest.approx(cols["reliability"], abs=1e-6)
        assert (scores.t_generality, scores.t_generality_em) == pytest.approx(cols["t_generality"], abs=1e-6)
        assert (scores.m_generality, scores.m_generality_em) == pytest.approx(cols["m_generality"], abs=1e-6)
        # the rule model agrees with itself, so both localities are exactly 1 in both modes
        localities = (
            scores.t_locality,
            scores.t_locality_easyedit,
            scores.m_locality,
            scores.m_locality_easyedit,
        )
        assert localities == (1.0, 1.0, 1.0, 1.0)


def test_evaluate_request_names_the_case_and_the_missing_or_mismatched_reference(requests) -> None:  # noqa: ANN001
    """A reference without multimodal-locality ids, or with text-locality ids of another length, is refused
    with a message that names the case, the sample and what to do."""
    import dataclasses

    from odedit_hf.editing import eval_samples
    from odedit_hf.evaluation import evaluate_request

    backbone = _backbone()
    model = _RuleModel(backbone.model.config.get_text_config().vocab_size)
    request = dataclasses.replace(requests[1], case_id=7)
    reference = _rule_reference(model, backbone, eval_samples(request))
    with pytest.raises(ValueError) as info:
        evaluate_request(model, backbone, request, dataclasses.replace(reference, m_ids=None))
    assert str(info.value) == (
        "case 7: the pre-edit reference has no m_locality ids; build it with locality_reference on this very "
        "request"
    )
    longer = torch.zeros(1, reference.t_ids.shape[1] + 2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"^case 7: the t_locality batch changed length between"):
        evaluate_request(model, backbone, request, dataclasses.replace(reference, t_ids=longer))


# ------------------------------------------------------------------ run_sequential's own measurements
def _timed_ftl(monkeypatch, durations: list[float]) -> FTLMethod:  # noqa: ANN001
    """A one-step FT-L whose k-th edit takes ``durations[k]`` seconds on a clock that only its edits advance
    (the protocols module's own ``time``; the global module is left alone)."""
    from odedit_hf.evaluation import protocols

    clock = [100.0]
    monkeypatch.setattr(protocols, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    method = _ftl(1)
    edit, steps = method.edit, iter(durations)

    def timed_edit(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        clock[0] += next(steps)
        return edit(*args, **kwargs)

    monkeypatch.setattr(method, "edit", timed_edit)
    return method


def test_sequential_per_edit_wall_time_is_that_edit_s_own_time(requests, monkeypatch) -> None:  # noqa: ANN001
    """Each sequential row's wall time is the time its own edit took (one edit per row, no share), on a
    clock that only the edits advance."""
    method = _timed_ftl(monkeypatch, [5.0, 7.0])
    run = run_protocol("sequential", method, _backbone(), requests[:2])
    assert [r.wall_time_s for r in run.results] == [5.0, 7.0]
    assert run.wall_time_s == 12.0


def test_a_base_weight_written_during_a_sequential_run_is_caught_before_unloading(requests) -> None:  # noqa: ANN001
    """A base weight that moves during the sequential edits is reported by the check made before the
    adapter is unloaded, with that check's context (how many edits), not only by the final one."""

    def write_a_base_weight(peft_model) -> None:  # noqa: ANN001
        base = next(p for n, p in peft_model.named_parameters() if "lora" not in n and not p.requires_grad)
        with torch.no_grad():
            base.add_(1.0)

    with pytest.raises(RollbackError) as info:
        run_protocol("sequential", _ftl(1), _backbone(), requests[:2], on_adapter=write_a_base_weight)
    assert str(info.value).startswith(
        "base weights changed after 2 sequential edits (the base weights must not move) (changed: "
    )


def test_a_base_weight_under_a_module_named_like_the_adapter_is_still_checked(requests) -> None:  # noqa: ANN001
    """With an adapter named like a base module (``mlp``), the base tensors under that module stay out of the
    adapter snapshot: a base write made during an edit is caught by the check after the roll-back, not
    silently undone by the restore."""
    backbone = _backbone()
    names = [n for n, _ in backbone.model.named_parameters() if "mlp" in n.split(".")]
    assert names  # the tiny model has base weights under an ``mlp`` module

    def write_a_base_mlp_weight(index, result) -> None:  # noqa: ANN001
        model = backbone.model
        base = next(p for n, p in model.named_parameters() if "mlp" in n.split(".") and "base_layer" not in n)
        with torch.no_grad():
            base.add_(1.0)

    with pytest.raises(
        RollbackError, match=r"^base weights changed after rolling back the edit of case\(s\) \[0\]"
    ):
        run_protocol(
            "single", _ftl(1), backbone, requests[:1], adapter_name="mlp", on_edit=write_a_base_mlp_weight
        )


# ------------------------------------------------------------------ run_protocol's arguments, the RSS unit
def test_run_protocol_argument_messages_and_its_seed_default(requests) -> None:  # noqa: ANN001
    """run_protocol's refusals say what to pass; batch_size 1 is accepted by every protocol; seed 0 by default."""
    backbone = _backbone()
    with pytest.raises(ValueError) as info:
        run_protocol("serial", _ftl(1), backbone, requests[:1])
    assert str(info.value) == "unknown protocol 'serial'; choose one of single, sequential, batch"
    with pytest.raises(ValueError) as info:
        run_protocol("batch", _ftl(1), backbone, requests[:1])
    assert str(info.value) == "the batch protocol needs batch_size (edits per optimisation)"
    with pytest.raises(ValueError) as info:
        run_protocol("single", _ftl(1), backbone, requests[:1], batch_size=2)
    assert str(info.value) == "batch_size=2 is only meaningful for the batch protocol, not 'single'"
    run = run_protocol("single", _ftl(1), backbone, requests[:1], batch_size=1)
    assert (run.seed, run.batch_size, len(run.results)) == (0, 1, 1)


@pytest.mark.parametrize(
    ("platform", "maxrss", "expected"), [("linux", 3 * 1024 * 512, 1536.0), ("darwin", 5 * 2**20, 5.0)]
)
def test_peak_rss_is_read_in_the_platform_s_unit(platform, maxrss, expected, monkeypatch) -> None:  # noqa: ANN001
    """ru_maxrss is KiB on Linux and bytes on macOS; both become MiB."""
    from odedit_hf.evaluation import protocols

    monkeypatch.setattr(protocols, "sys", SimpleNamespace(platform=platform))  # this module only
    fake = SimpleNamespace(RUSAGE_SELF=0, getrusage=lambda who: SimpleNamespace(ru_maxrss=maxrss))
    monkeypatch.setattr(protocols, "resource", fake)
    assert protocols._peak_rss_mb() == expected


def test_batch_rows_share_their_edit_s_wall_time(requests, monkeypatch) -> None:  # noqa: ANN001
    """In the batch protocol each request's row carries its share of the one optimisation's time."""
    method = _timed_ftl(monkeypatch, [6.0, 6.0])
    run = run_protocol("batch", method, _backbone(), requests[:3], batch_size=2)
    assert [r.wall_time_s for r in run.results] == [3.0, 3.0, 6.0]


def test_measure_reads_the_cuda_peak_on_a_cuda_device(monkeypatch) -> None:  # noqa: ANN001
    """On a CUDA device the block's peak is the device's peak allocation in MiB, after a synchronise and a
    reset of the peak counter on that very device (stand-ins for the CUDA calls; no GPU here)."""
    from odedit_hf.evaluation import protocols

    calls = []
    device = torch.device("cuda", 1)
    monkeypatch.setattr(protocols.torch.cuda, "synchronize", lambda d: calls.append(("sync", d)))
    monkeypatch.setattr(protocols.torch.cuda, "reset_peak_memory_stats", lambda d: calls.append(("reset", d)))
    monkeypatch.setattr(
        protocols.torch.cuda, "max_memory_allocated", lambda d: 3 * 2**20 if d == device else 0
    )
    with protocols._measure(device) as m:
        calls.append(("block", None))
    assert calls == [("sync", device), ("reset", device), ("block", None), ("sync", device)]
    assert m["peak_memory_mb"] == 3.0 and m["wall_time_s"] >= 0.0
    with protocols._measure(torch.device("cpu")) as m:
        pass
    assert m["peak_memory_mb"] == pytest.approx(protocols._peak_rss_mb(), rel=0.01)


def test_text_only_model_refuses_image_records_with_the_cases_and_the_source(requests) -> None:  # noqa: ANN001
    import dataclasses

    from odedit_hf.evaluation.protocols import check_requests_fit

    check_requests_fit(requests, True, "llava")  # a multimodal model takes them
    many = [dataclasses.replace(requests[0], case_id=i) for i in range(7)]
    with pytest.raises(ValueError) as info:
        check_requests_fit(many, False, "llama")
    assert str(info.value) == (
        "the 'llama' model is text-only but 7 of 7 edit records of in-memory carry images (case ids "
        "[0, 1, 2, 3, 4] ...); edit them with a multimodal model, or give text-only records (ZsRE / "
        "CounterFact layouts, or MMEdit records without image, image_rephrase, m_loc, m_loc_q, m_loc_a)"
    )
    with pytest.raises(ValueError, match=r"of in-memory carry images \(case ids \[0, 1\]\); edit them"):
        check_requests_fit([requests[0], dataclasses.replace(requests[1], source="other")], False, "llama")
    for n, tail in ((5, "[0, 1, 2, 3, 4])"), (6, "[0, 1, 2, 3, 4] ...)")):  # the " ..." from the sixth on
        with pytest.raises(
            ValueError, match=rf"^the 'llama' model is text-only but {n} of {n} .*ids {re.escape(tail)};"
        ):
            check_requests_fit(many[:n], False, "llama")


def test_protocols_refuse_no_requests_a_bad_seed_and_name_the_text_only_model(requests) -> None:  # noqa: ANN001
    from odedit_hf.testing import tiny_backbone

    backbone = _backbone()
    with pytest.raises(ValueError) as info:
        run_protocol("single", _ftl(1), backbone, [])
    assert str(info.value) == "no edit requests given; load some with odedit_hf.data.load_edits"
    for seed in (True, "1", 1.0):
        with pytest.raises(ValueError) as info:
            run_protocol("single", _ftl(1), backbone, requests[:1], seed=seed)
        assert str(info.value) == f"seed must be an int, got {seed!r}"
    text = tiny_backbone("llama", texts=TEXTS)
    with pytest.raises(ValueError, match=r"^the 'llama' model is text-only but 1 of 1 edit records"):
        run_protocol("single", _ftl(1), text, requests[:1])

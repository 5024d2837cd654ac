"""ODEditMethod (the per-edit primal-dual loop) on a tiny LLaVA, its CLI flags, and adapter saving."""

from __future__ import annotations

import os

import pytest
import torch

import odedit_hf  # noqa: F401
from odedit_hf.editors.ftl import FTLMethod
from odedit_hf.editors.lora import LoRAMethod
from odedit_hf.methods.odedit.method import ODEditDivergedError, ODEditMethod

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
def requests(tmp_path_factory):  # noqa: ANN001
    from odedit_hf.data import EditRequest
    from odedit_hf.testing import tiny_image

    root = tmp_path_factory.mktemp("images")
    paths = []
    for i in range(4):
        path = os.path.join(root, f"img{i}.png")
        tiny_image(i).save(path)
        paths.append(path)
    common = {
        "task": "vqa",
        "source": "in-memory",
        "pred": "red",
        "rephrase": "which colour has the cube",
        "loc": "what is the capital of france",
        "loc_ans": "paris",
        "m_loc": paths[3],
        "m_loc_q": "what animal is this",
        "m_loc_a": "cat",
    }
    return [
        EditRequest(
            case_id=0,
            src="what color is the cube",
            alt="blue",
            image=paths[0],
            image_rephrase=paths[1],
            **common,
        ),
        EditRequest(
            case_id=1,
            src="what color is the cube",
            alt="paris",
            image=paths[2],
            image_rephrase=paths[0],
            **common,
        ),
    ]


def _backbone():  # noqa: ANN202
    from odedit_hf.testing import tiny_backbone

    return tiny_backbone("llava", texts=TEXTS)


def _editor(kind: str, steps: int = 12):  # noqa: ANN202

    if kind == "lora":
        return LoRAMethod(steps=steps, lr=2e-2, stop_loss=None, rank=4)
    return FTLMethod(steps=steps, lr=2e-3, stop_loss=None)


def build_edit_batch(backbone, requests, config):  # noqa: ANN001, ANN201
    """The environment batch ODEditMethod.edit builds for ``config``."""
    from odedit_hf.editing.environments import build_edit_batch as build
    from odedit_hf.methods.odedit.risks import needed_groups

    return build(backbone, requests, needed_groups(config), num_rephrases=config.num_rephrases)


def _wrap(method, backbone):  # noqa: ANN001, ANN202
    from peft import get_peft_model

    from odedit_hf.editing import BaseWeights

    base = BaseWeights(backbone.model)
    digest = base.digest()
    return get_peft_model(backbone.model, method.peft_config(backbone)), base, digest


@pytest.mark.parametrize("kind", ["ft", "lora"])
@pytest.mark.parametrize("lambda_mode", ["params", "sketch"])
def test_edit_lowers_the_reliability_risk_and_keeps_the_base(kind: str, lambda_mode: str, requests) -> None:  # noqa: ANN001
    backbone = _backbone()
    method = ODEditMethod(_editor(kind), objective={"lambda_mode": lambda_mode})
    peft_model, base, digest = _wrap(method, backbone)
    stats = method.edit(peft_model, backbone, requests[:1])
    # no early stop (stop_loss None): the warm-up schedule's whole budget, the editor's 12 steps + 10
    assert stats.steps == 12 + 10 and len(stats.losses) == 23
    assert stats.losses[-1] < stats.losses[0]
    assert all(torch.isfinite(torch.tensor(stats.losses)))
    base.check(digest, context="after an ODEdit edit")
    assert method.name == f"odedit+{method.editor.name}"


def test_the_loop_uses_the_same_objective_as_the_trainer(requests, tmp_path) -> None:  # noqa: ANN001
    """The per-edit loop's first loss equals ``ODEditTrainer.compute_loss`` on an identical model and
    batch; the adapter is not the identity, so ``R_loc``, ``R_gen`` and ``λ·P`` all enter both."""
    from peft import get_peft_model

    from odedit_hf.methods.odedit import ODEditTrainer, ODEditTrainingArguments

    method = ODEditMethod(
        _editor("lora", steps=1),
        # the Trainer applies the penalty from the first step: so does the "from_start" schedule
        objective={"lambda_mode": "sketch", "alpha": 0.5, "lambda_init": 0.2, "schedule": "from_start"},
    )
    models = []
    for _ in range(2):  # two identical models: one for the loop, one for the Trainer
        backbone = _backbone()
        peft_model = get_peft_model(backbone.model, method.peft_config(backbone))
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in peft_model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        models.append((backbone, peft_model))
    (loop_backbone, loop_model), (trainer_backbone, trainer_model) = models
    stats = method.edit(loop_model, loop_backbone, requests)
    args = ODEditTrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=len(requests),
        use_cpu=True,
        report_to="none",
    )
    trainer = ODEditTrainer(
        model=trainer_model,
        args=args,
        train_dataset=requests,
        backbone=trainer_backbone,
        editor=method.editor,
    )
    trainer_model.eval()
    with torch.no_grad():
        loss, terms = trainer.compute_loss(
            trainer_model, trainer.data_collator(requests), return_outputs=True
        )
    assert stats.losses[0] == pytest.approx(float(loss), rel=1e-5)
    floats = terms.as_floats()
    assert min(floats["r_loc"], floats["r_gen"], floats["penalty"]) > 0, floats
    assert floats["lambda"] == pytest.approx(0.2, rel=1e-4)
    assert set(terms.omega_grads) == {"in_distribution", "neighbours", "ood"}


@pytest.mark.parametrize(
    ("objective", "present", "absent"),
    [
        ({"loc_risk": False}, ["r_gen", "penalty"], ["r_loc"]),
        ({"gen_risk": False}, ["r_loc", "penalty"], ["r_gen"]),
        ({"irm_penalty": False}, ["r_loc", "r_gen"], ["penalty", "lambda"]),
        ({"irm_penalty": False, "loc_risk": False, "gen_risk": False}, [], ["r_loc", "r_gen", "penalty"]),
    ],
)
def test_ablation_switches_drop_their_terms(objective, present, absent, requests) -> None:  # noqa: ANN001
    from odedit_hf.methods.odedit.objective import ODEditObjective

    backbone = _backbone()
    method = ODEditMethod(_editor("lora"), objective=objective)
    peft_model, _, _ = _wrap(method, backbone)
    config = peft_model.peft_config["default"]
    obj = ODEditObjective(config, backbone)
    batch = build_edit_batch(backbone, requests[:1], config)
    with peft_model.disable_adapter():
        obj.prepare(backbone.forward, batch)
    with torch.no_grad():
        terms = obj(backbone.forward, batch, torch.tensor(1.0)).as_floats()
    for name in present:
        assert name in terms
    for name in absent:
        assert name not in terms
    if not present:  # everything off: ODEdit's loss is the plain editors' loss
        from odedit_hf.editing import target_nll

        plain = backbone.build_batch(
            [__import__("odedit_hf.editing", fromlist=["edit_sample"]).edit_sample(requests[0])]
        )
        with torch.no_grad():
            assert terms["loss"] == pytest.approx(float(target_nll(peft_model, backbone, plain)), rel=1e-5)


class _PoisoningEditor(FTLMethod):
    """FT-L whose own loss term turns NaN at the fourth step (a diverging edit), through the extra_loss hook."""

    def extra_loss(self, peft_model):  # noqa: ANN001, ANN201
        self.calls = getattr(self, "calls", 0) + 1
        return {"poison": torch.tensor(float("nan") if self.calls == 4 else 0.0)}


def test_a_diverging_edit_stops_with_a_clear_error_and_restores_the_adapter(requests) -> None:  # noqa: ANN001
    backbone = _backbone()
    method = ODEditMethod(_PoisoningEditor(steps=6, lr=2e-3, stop_loss=None))
    peft_model, base, digest = _wrap(method, backbone)
    with torch.no_grad():  # a previous edit's state, which the failed edit must give back
        for p in peft_model.parameters():
            if p.requires_grad:
                p.fill_(0.01)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    with pytest.raises(ODEditDivergedError, match="loss is nan at step 3.*poison.*the adapter was restored"):
        method.edit(peft_model, backbone, requests[:1])
    for name, param in peft_model.named_parameters():
        if name in before:
            assert torch.equal(param, before[name]), name
    base.check(digest, context="after a diverged ODEdit edit")


def test_get_method_splits_editor_and_objective_hyperparameters() -> None:
    from odedit_hf.editing import get_method

    method = get_method(
        "odedit", editor="lora", rank=2, alpha=4.0, steps=3, lambda_mode="fixed", odedit_alpha=0.5
    )
    assert method.editor.rank == 2 and method.editor.alpha == 4.0 and method.loop.steps == 3
    assert method.objective == {"lambda_mode": "fixed", "alpha": 0.5}
    via_registry = get_method("odedit", editor="ft", steps=2, num_rephrases=2)
    assert via_registry.editor.name == "ftl" and via_registry.objective == {"num_rephrases": 2}
    namespaced = get_method("odedit+lora", odedit={"alpha": 0.3}, lora={"rank": 3})
    assert namespaced.objective == {"alpha": 0.3} and namespaced.editor.rank == 3
    with pytest.raises(ValueError, match="unknown ODEdit hyperparameters"):
        ODEditMethod(method.editor, objective={"gamma": 1.0})
    with pytest.raises(ValueError, match="needs a base editor"):
        get_method("odedit", editor="odedit")
    with pytest.raises(ValueError, match="base editor and cannot wrap"):
        get_method("lora+ftl")


def test_generated_cli_options_build_the_method() -> None:
    from odedit_hf.cli.options import OptionError, parse_method_options
    from odedit_hf.editing import build_method

    options = parse_method_options(
        "odedit+lora",
        [
            "--odedit.gen-risk", "false",
            "--odedit.lambda_mode", "sketch",
            "--odedit.num-rephrases=2",
            "--odedit.alpha", "0.5",
            "--odedit.mmd-bandwidth-multipliers", "1,2",
            "--odedit.irm-environments", "ood",
            "--lora.rank", "2",
            "--lora.stop-loss", "none",
        ],
    )  # fmt: skip
    method = build_method("odedit+lora", options)
    assert method.editor.name == "lora" and method.editor.rank == 2 and method.editor.stop_loss is None
    assert method.objective == {
        "alpha": 0.5,
        "num_rephrases": 2,
        "lambda_mode": "sketch",
        "mmd_bandwidth_multipliers": [1.0, 2.0],
        "irm_environments": ["ood"],
        "gen_risk": False,
    }
    assert method.peft_config(_backbone()).irm_environments == ("ood",)
    with pytest.raises(ValueError, match="lambda_mode must be one of"):
        build_method("odedit+lora", parse_method_options("odedit+lora", ["--odedit.lambda-mode", "dense"]))
    with pytest.raises(
        OptionError, match="--odedit.alpha is an option of method 'odedit', which --method ftl"
    ):
        parse_method_options("ftl", ["--odedit.alpha", "5"])
    with pytest.raises(OptionError, match="method 'lora' has no option 'depth'"):
        parse_method_options("odedit+lora", ["--lora.depth", "5"])
    with pytest.raises(OptionError, match="expected an integer"):
        parse_method_options("lora", ["--lora.rank", "two"])


def test_save_adapter_writes_a_standard_peft_folder(requests, tmp_path) -> None:  # noqa: ANN001
    from peft import PeftModel

    from odedit_hf.editing.saving import save_adapter

    backbone = _backbone()
    method = ODEditMethod(_editor("lora", steps=3))
    peft_model, _, _ = _wrap(method, backbone)
    method.edit(peft_model, backbone, requests[:1])
    occupied = tmp_path / "notes"
    occupied.mkdir()
    (occupied / "stale.txt").write_text("old")
    with pytest.raises(ValueError, match="not empty"):  # a user's folder is never emptied
        save_adapter(peft_model, occupied)
    assert (occupied / "stale.txt").read_text() == "old"
    target = tmp_path / "edits"
    save_adapter(peft_model, target)
    path = save_adapter(peft_model, target, overwrite=True)  # replaces the earlier adapter folder
    assert sorted(os.listdir(path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(_backbone().model, path)
    batch = {k: v for k, v in backbone.build_batch([_edit_sample(requests[0])]).items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, peft_model(**batch).logits)


def _edit_sample(request):  # noqa: ANN001, ANN202
    from odedit_hf.editing import edit_sample

    return edit_sample(request)


@pytest.mark.parametrize("kind", ["ft", "lora"])
def test_adapter_is_identity_until_the_first_step(kind: str, requests) -> None:  # noqa: ANN001
    backbone = _backbone()
    editor = _editor(kind, steps=1)
    peft_model = _wrap(editor, backbone)[0]
    assert editor.adapter_is_identity(peft_model)
    editor.edit(peft_model, backbone, requests[:1])
    assert not editor.adapter_is_identity(peft_model)


@pytest.mark.parametrize("kind", ["ft", "lora"])
def test_step_zero_records_the_same_pre_edit_state_as_the_disabled_pass(kind: str, requests) -> None:  # noqa: ANN001
    """With an identity adapter, step 0's forward gives the very pre-edit state prepare() measures."""
    from odedit_hf.methods.odedit.objective import ODEditObjective

    backbone = _backbone()
    method = ODEditMethod(_editor(kind))
    peft_model, _, _ = _wrap(method, backbone)
    config = peft_model.peft_config["default"]
    batch = build_edit_batch(backbone, requests, config)
    prepared, from_step = ODEditObjective(config, backbone), ODEditObjective(config, backbone)
    with peft_model.disable_adapter():
        prepared.prepare(backbone.forward, batch)
    with pytest.raises(ValueError, match="no pre-edit state"):
        from_step(backbone.forward, batch, torch.tensor(0.001))
    with torch.no_grad():
        terms = from_step(backbone.forward, batch, torch.tensor(0.001), pre_edit=True)
    assert prepared.pre.loc_rows.keys() == from_step.pre.loc_rows.keys() and prepared.pre.loc_rows
    for key, rows in prepared.pre.loc_rows.items():
        assert torch.equal(rows, from_step.pre.loc_rows[key])
    assert prepared.pre.bandwidths == from_step.pre.bandwidths
    assert float(terms.r_loc) == pytest.approx(0.0, abs=1e-7)


def test_an_adapter_that_already_edits_gets_a_separate_pre_edit_pass(requests) -> None:  # noqa: ANN001
    """Sequential editing: the adapter holds earlier edits, so step 0 is not the pre-edit model."""
    from odedit_hf.methods.odedit import objective as objective_module

    backbone = _backbone()
    method = ODEditMethod(_editor("ft", steps=2))
    peft_model, _, _ = _wrap(method, backbone)
    calls = []
    original = objective_module.ODEditObjective.prepare

    def spy(self, forward, edit_batch):  # noqa: ANN001, ANN202
        calls.append(edit_batch.case_ids)
        return original(self, forward, edit_batch)

    objective_module.ODEditObjective.prepare = spy
    try:
        method.edit(peft_model, backbone, requests[:1])  # fresh adapter: no separate pass
        assert calls == []
        method.edit(peft_model, backbone, requests[1:])  # adapter now edits: separate pass
        assert calls == [[1]]
    finally:
        objective_module.ODEditObjective.prepare = original


def test_run_groups_gathers_the_answer_rows_of_every_group(requests) -> None:  # noqa: ANN001
    from odedit_hf.editing.environments import run_groups
    from odedit_hf.methods.odedit.risks import answer_rows, gen_samples

    backbone = _backbone()
    method = ODEditMethod(_editor("ft"))
    peft_model, _, _ = _wrap(method, backbone)
    config = peft_model.peft_config["default"]
    batch = build_edit_batch(backbone, requests, config)
    with torch.no_grad():
        outputs = run_groups(backbone.forward, backbone, batch, hidden_groups=("edit", "rephrase"))
    assert set(outputs) == {"edit", "rephrase", "image_rephrase", "loc", "m_loc"}
    for name, group in outputs.items():
        rows, targets = answer_rows(group.logits, group.labels)
        assert torch.equal(group.answer_logits, rows) and torch.equal(group.answer_targets, targets)
        assert sum(group.answer_counts) == rows.shape[0] and len(group.answer_counts) == group.logits.shape[0]
        if name in ("edit", "rephrase"):
            for mode in ("answer", "last_prompt"):
                expected = gen_samples(group.hidden, group.labels, mode)
                got = group.answer_hidden_per_row(mode)
                assert len(got) == len(expected)
                assert all(torch.equal(a, b) for a, b in zip(got, expected))
        else:
            assert group.answer_hidden is None


def test_irm_environments_choose_the_penalty_terms(requests) -> None:  # noqa: ANN001
    from odedit_hf.methods.odedit import ODEditConfig
    from odedit_hf.methods.odedit.objective import ODEditObjective

    backbone = _backbone()
    method = ODEditMethod(_editor("ft", steps=3))
    peft_model, _, _ = _wrap(method, backbone)
    method.edit(peft_model, backbone, requests[:1])  # a non-trivial adapter: every g_e != 0
    config = peft_model.peft_config["default"]
    batch = build_edit_batch(backbone, requests[1:], config)
    results = {}
    for envs in (("in_distribution", "neighbours", "ood"), ("ood",), ("in_distribution", "neighbours")):
        config.irm_environments = envs
        obj = ODEditObjective(config, backbone)
        with peft_model.disable_adapter():
            obj.prepare(backbone.forward, batch)
        with torch.no_grad():
            results[envs] = obj(backbone.forward, batch, torch.tensor(1.0))
    g = results[("ood",)].omega_grads
    assert all(abs(float(v)) > 0 for v in g.values())
    for envs, terms in results.items():
        expected = sum(abs(float(g[e])) for e in envs) ** 2
        assert float(terms.penalty) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="irm_environments"):
        ODEditConfig(editor=config.editor, irm_environments=("everything",))
    with pytest.raises(ValueError, match="irm_environments"):
        ODEditConfig(editor=config.editor, irm_environments=())


# ----------------------------------------------------------------------------------------------------
# issue 20, session 8 part 2: mutation survivors of objective.py (the groups and the pre-edit state)
# ----------------------------------------------------------------------------------------------------


def _objective(**options):  # noqa: ANN202
    from peft import LoraConfig

    from odedit_hf.methods.odedit import ODEditConfig
    from odedit_hf.methods.odedit.objective import ODEditObjective

    return ODEditObjective(ODEditConfig(editor=LoraConfig(target_modules=["x"]), **options), backbone=None)


def test_objective_groups_follow_the_config() -> None:
    every = _objective()
    assert every._hidden_groups() == ("edit", "rephrase", "image_rephrase")
    assert every._loc_groups() == ("loc", "m_loc")
    assert _objective(hard_negatives=True)._loc_groups() == ("loc", "m_loc", "hard_loc", "hard_m_loc")
    assert _objective(gen_risk=False)._hidden_groups() == ()
    assert _objective(loc_risk=False, irm_penalty=False)._loc_groups() == ()
    assert _objective(loc_risk=False)._loc_groups() == ("loc", "m_loc")  # the penalty needs the OOD rows


def test_objective_missing_and_reset() -> None:
    from types import SimpleNamespace

    from odedit_hf.methods.odedit.risks import PreEditState

    objective = _objective()
    # a text-only request: no m_loc rows in the batch (owners has no such group)
    batch = SimpleNamespace(case_ids=["c0"], owners={"edit": [0], "loc": [0]})
    assert objective._missing(batch)
    objective.pre.loc_rows[("loc", "c0")] = torch.zeros(1, 3)
    assert objective._missing(batch)  # bandwidths still missing
    objective.pre.bandwidths["c0"] = (1.0,)
    assert not objective._missing(batch)
    # absolute bandwidths need no pre-edit median
    fixed = _objective(mmd_bandwidths=(2.0,))
    fixed.pre.loc_rows[("loc", "c0")] = torch.zeros(1, 3)
    assert not fixed._missing(batch)
    objective.reset()
    assert isinstance(objective.pre, PreEditState)
    assert objective.pre.loc_rows == {} and objective.pre.bandwidths == {}
    assert objective._missing(batch)


# ----------------------------------------------------------------------------------------------------
# issue 20, session 10: the rest of objective.py's survivors (loc_positions="all", the backend, the
# messages, terms.risk)
# ----------------------------------------------------------------------------------------------------


def _edited_objective(requests, **objective):  # noqa: ANN001, ANN202
    """A tiny LLaVA whose FT-L adapter already edits (one edit of requests[0]), and an objective for requests[1:]."""
    from odedit_hf.methods.odedit.objective import ODEditObjective

    backbone = _backbone()
    method = ODEditMethod(_editor("ft", steps=3), objective=objective)
    peft_model, _, _ = _wrap(method, backbone)
    method.edit(peft_model, backbone, requests[:1])
    config = peft_model.peft_config["default"]
    return peft_model, backbone, config, ODEditObjective(config, backbone)


def _text_rows(group, row: int) -> torch.Tensor:  # noqa: ANN001
    """Row ``row``'s logits at every position whose own and next token are text (by hand)."""
    text = group.attention_mask[row].bool()
    if group.image_mask is not None:
        text = text & ~group.image_mask[row].bool()
    keep = text[:-1] & text[1:]
    return group.logits[row, :-1][keep]


def _kl_rows(pre: torch.Tensor, post: torch.Tensor) -> float:
    p = torch.softmax(pre.double(), dim=-1)
    return float(
        (p * (torch.log_softmax(pre.double(), -1) - torch.log_softmax(post.double(), -1))).sum(-1).mean()
    )


def test_loc_positions_all_compares_every_text_position_of_each_row(requests) -> None:  # noqa: ANN001
    from odedit_hf.editing.environments import run_groups

    peft_model, backbone, config, obj = _edited_objective(requests, loc_positions="all", gen_risk=False)
    two = [requests[1], requests[0]]
    batch = build_edit_batch(backbone, two, config)
    with torch.no_grad():
        with peft_model.disable_adapter():
            obj.prepare(backbone.forward, batch)
            before = run_groups(backbone.forward, backbone, batch)
        after = run_groups(backbone.forward, backbone, batch)
        terms = obj(backbone.forward, batch, torch.tensor(1.0))
    pre, post = [], []
    for g in ("loc", "m_loc"):
        assert len(batch.owners[g]) == 2
        for row, owner in enumerate(batch.owners[g]):
            expected = _text_rows(before[g], row)
            stored = obj.pre.loc_rows[(g, batch.case_ids[owner])]
            assert stored.dtype == torch.float32 and stored.shape == expected.shape
            assert torch.allclose(stored, expected.float(), atol=1e-6)
            pre.append(expected)
            post.append(_text_rows(after[g], row))
    # "all" gathers more rows than the answer positions alone
    assert (
        sum(r.shape[0] for r in pre)
        > before["loc"].answer_logits.shape[0] + before["m_loc"].answer_logits.shape[0]
    )
    r_loc = float(terms.r_loc)
    assert r_loc > 1e-6
    assert r_loc == pytest.approx(_kl_rows(torch.cat(pre), torch.cat(post)), rel=2e-3)  # float32 KL


def _group(logits: torch.Tensor, attention_mask: torch.Tensor):  # noqa: ANN202
    from types import SimpleNamespace

    labels = torch.full(attention_mask.shape, -100)
    labels[:, -1] = 0
    return SimpleNamespace(
        logits=logits,
        labels=labels,
        attention_mask=attention_mask,
        image_mask=None,
        answer_logits_per_row=lambda: [logits[r, -2:-1] for r in range(logits.shape[0])],
    )


@pytest.mark.parametrize("positions", ["all", "answer"])
def test_record_skips_a_missing_group_and_keeps_the_next(positions: str) -> None:
    """A batch without ``loc`` rows (only ``m_loc``): the ``m_loc`` rows are still recorded."""
    from types import SimpleNamespace

    objective = _objective(loc_positions=positions, gen_risk=False)
    logits = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    batch = SimpleNamespace(case_ids=["a", "b"], owners={"m_loc": [1, 0]})
    objective._record({"m_loc": _group(logits, mask)}, batch)
    assert set(objective.pre.loc_rows) == {("m_loc", "a"), ("m_loc", "b")}
    row0, row1 = objective.pre.loc_rows[("m_loc", "b")], objective.pre.loc_rows[("m_loc", "a")]
    assert row0.dtype == torch.float32 and row1.dtype == torch.float32
    if positions == "all":
        assert torch.equal(row0, logits[0, :3].float())  # every position of the full row
        assert torch.equal(row1, logits[1, 1:3].float())  # the padded row: positions 1, 2
    else:
        assert torch.equal(row0, logits[0, 2:3].float()) and torch.equal(row1, logits[1, 2:3].float())


def test_kernel_backend_reaches_every_kernel_call(requests, monkeypatch) -> None:  # noqa: ANN001
    from odedit_hf.methods.odedit import objective as objective_module

    peft_model, backbone, config, obj = _edited_objective(requests, kernel_backend="torch")
    batch = build_edit_batch(backbone, requests[1:], config)
    with peft_model.disable_adapter():
        obj.prepare(backbone.forward, batch)
    seen = []
    for name in ("reliability_risk_rows", "locality_risk", "generality_risk"):
        original = getattr(objective_module, name)

        def spy(*args, _name=name, _original=original, **kwargs):  # noqa: ANN002, ANN003, ANN202
            seen.append((_name, kwargs.get("backend")))
            return _original(*args, **kwargs)

        monkeypatch.setattr(objective_module, name, spy)
    with torch.no_grad():
        obj(backbone.forward, batch, torch.tensor(1.0))
    assert seen == [
        ("reliability_risk_rows", "torch"),
        ("locality_risk", "torch"),
        ("generality_risk", "torch"),
        ("reliability_risk_rows", "torch"),
    ]


def test_objective_error_messages(requests) -> None:  # noqa: ANN001
    peft_model, backbone, config, obj = _edited_objective(requests)
    batch = build_edit_batch(backbone, requests[1:], config)
    with pytest.raises(ValueError) as missing:
        obj(backbone.forward, batch, torch.tensor(1.0))
    assert str(missing.value) == (
        "ODEditObjective: no pre-edit state for these requests; call prepare() with the adapter disabled first"
    )
    with peft_model.disable_adapter():
        obj.prepare(backbone.forward, batch)
    with pytest.raises(ValueError) as no_lambda, torch.no_grad():
        obj(backbone.forward, batch)
    assert str(no_lambda.value) == "ODEditObjective: irm_penalty is on but no lambda was given"


@pytest.mark.parametrize("irm_penalty", [True, False])
def test_terms_risk_is_the_total_without_the_penalty(irm_penalty: bool, requests) -> None:  # noqa: ANN001
    peft_model, backbone, config, obj = _edited_objective(requests, irm_penalty=irm_penalty)
    batch = build_edit_batch(backbone, requests[1:], config)
    with peft_model.disable_adapter():
        obj.prepare(backbone.forward, batch)
    with torch.no_grad():
        terms = obj(backbone.forward, batch, torch.tensor(0.7))
    total, risk = float(terms.total), float(terms.risk)
    parts = float(terms.r_rel) + config.alpha * float(terms.r_loc) + config.beta * float(terms.r_gen)
    assert risk == pytest.approx(parts, rel=1e-5)
    if irm_penalty:
        assert float(terms.penalty) > 1e-8
        assert risk == pytest.approx(total - 0.7 * float(terms.penalty), rel=1e-5)
        assert total > risk
    else:
        assert terms.penalty is None and risk == total


# ----------------------------------------------------------------------------------------------------
# issue 20, session 11: the pre-edit rows follow the post-edit logits' device
# ----------------------------------------------------------------------------------------------------


def test_pre_edit_rows_move_to_the_post_edit_device(monkeypatch) -> None:  # noqa: ANN001
    """Pre-edit rows held on the CPU, post-edit logits elsewhere (``meta``, the stand-in for an accelerator).

    The kernels refuse rows on two devices, so R_loc needs the pre-edit rows moved to the logits' device.
    (``loc_positions="all"`` cannot run on ``meta``: ``locality_rows`` reads its mask's values.)
    """
    from types import SimpleNamespace

    from odedit_hf.methods.odedit import objective as objective_module

    objective = _objective(gen_risk=False, irm_penalty=False, kernel_backend="torch")
    outputs = {
        "edit": SimpleNamespace(
            answer_logits=torch.randn(2, 5, generator=torch.Generator().manual_seed(0)),
            answer_targets=torch.tensor([1, 2]),
        ),
        "loc": SimpleNamespace(answer_logits=torch.randn(3, 5, device="meta")),
    }
    monkeypatch.setattr(objective_module, "run_groups", lambda *args, **kwargs: outputs)
    objective.pre.loc_rows[("loc", "a")] = torch.randn(2, 5)  # on the CPU
    objective.pre.loc_rows[("loc", "b")] = torch.randn(1, 5)
    batch = SimpleNamespace(case_ids=["a", "b"], owners={"loc": [0, 1]})
    terms = objective(None, batch)
    assert terms.r_loc.device.type == "meta" and terms.r_loc.shape == ()
    assert terms.r_rel.device.type == "cpu"

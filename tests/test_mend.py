"""MEND: the hypernetwork (identity at init, normalisation), the reversible adapter (finite guard, exact
rollback), meta-training through ``transformers.Trainer`` and ``odedit-hf train-editor`` on the micro world,
the artefact's base-model check, and 24 sequential edits that stay finite.

The shared matrix row (tests/editor_cases.py, ``mend-llava``) runs the untrained identity-initialised
network (no artefact: a tiny random model has no train split); the trained network is tested here.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from peft import get_peft_model

import odedit_hf  # noqa: F401  registers the PEFT types
from odedit_hf.cli.main import main
from odedit_hf.editing import BaseWeights, eval_samples, get_method, model_inputs

TRAIN = ["--train.num-train-epochs", "1", "--train.eval-steps", "4", "--train.logging-steps", "4"]


@pytest.fixture(scope="session")
def micro_backbone(micro_world):  # noqa: ANN001
    from odedit_hf.cli.edit import load_backbone

    return load_backbone(micro_world.model_dir, device="cpu", progress=False)


@pytest.fixture(scope="session")
def mend_artefact(micro_world, tmp_path_factory):  # noqa: ANN001
    """A MEND hypernetwork trained by the CLI on 12 micro-world train records (one epoch)."""
    out = tmp_path_factory.mktemp("mend") / "artefact"
    argv = ["train-editor", "--method", "mend", "--model", micro_world.model_dir, "--data", micro_world.root]
    argv += ["--out", str(out), "--n", "12", "--device", "cpu", "--no-progress", *TRAIN]
    assert main(argv) == 0
    return str(out)


@pytest.fixture(scope="session")
def micro_requests(micro_world):  # noqa: ANN001
    from odedit_hf.data import load_mmedit

    roots = (micro_world.image_root, micro_world.rephrase_image_root)
    return [r for path in (micro_world.vqa_eval, micro_world.caption_eval) for r in load_mmedit(path, *roots)]


# ------------------------------------------------------------------ the hypernetwork
def test_untrained_network_is_the_identity_and_a_descent_step():
    from odedit_hf.editors.mend import MENDNet, MENDNetConfig

    net = MENDNet(MENDNetConfig(modules=["a", "b"], shapes=[[6, 4], [6, 4]], rank=3, edit_lr=0.5))
    assert len(net.transforms) == 1, "same-shape modules share one transform"
    u, d = torch.randn(5, 6), torch.randn(5, 4)
    with torch.no_grad():
        a, b = net.factors(1, u, d)
    rms = lambda t: t.pow(2).mean().sqrt()  # noqa: E731
    torch.testing.assert_close(a, u / rms(u), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b, -(0.5 * d / rms(d)).T, rtol=1e-5, atol=1e-6)
    # the update is -η Σ δ̃ ũᵀ: a positive multiple of the negative weight gradient Σ δ uᵀ
    grad = d.T @ u
    assert float(((b @ a) * grad).sum()) < 0


def test_running_statistics_match_the_data_and_normalise():
    from odedit_hf.editors.mend.hypernet import RunningStats

    stats = RunningStats(3)
    data = torch.randn(50, 3) * torch.tensor([1.0, 10.0, 0.1]) + torch.tensor([5.0, -2.0, 0.0])
    for chunk in data.split(7):
        stats.update(chunk)
    torch.testing.assert_close(stats.mean.float(), data.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.std().float(), data.std(0), rtol=1e-4, atol=1e-5)
    normed = stats.normalise(data)
    torch.testing.assert_close(normed.std(0), torch.ones(3), rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------ the adapter
def test_a_non_finite_update_is_refused_and_changes_nothing():
    from odedit_hf.editors.mend import MENDLayer
    from odedit_hf.testing import tiny_backbone

    backbone = tiny_backbone("llava", seed=0)
    method = get_method("mend")
    peft_model = get_peft_model(backbone.model, method.peft_config(backbone))
    layer = next(m for m in peft_model.modules() if isinstance(m, MENDLayer))
    a = torch.randn(2, layer.in_features)
    b = torch.randn(layer.out_features, 2)
    layer.append_factors("default", a, b)
    before = layer.factor_state("default")
    b[0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        layer.append_factors("default", a, b)
    assert torch.equal(layer.mend_a["default"], before["mend_a"])
    assert layer.rank("default") == 2


# ------------------------------------------------------------------ training and the artefact
def test_train_editor_writes_the_artefact(mend_artefact, micro_backbone):  # noqa: ANN001
    from safetensors.torch import load_file

    from odedit_hf.editors.mend import load_net

    names = set(os.listdir(mend_artefact))
    assert {"mend_config.json", "model.safetensors", "training_args.json", "training_history.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth"))], "safetensors and JSON only"
    with open(os.path.join(mend_artefact, "mend_config.json")) as f:
        config = json.load(f)
    assert config["base_model"]["model_type"] == "llava"
    assert config["extra"]["objective"] == "mend" and "odedit_config" not in config["extra"]
    assert config["net"]["modules"] == get_method("mend").modules(micro_backbone)
    with open(os.path.join(mend_artefact, "training_history.json")) as f:
        history = json.load(f)
    evals = [h for h in history if "eval_loss" in h]
    assert len(evals) >= 2 and all(h["eval_loss"] == h["eval_loss"] for h in evals)
    with open(os.path.join(mend_artefact, "training_args.json")) as f:
        assert json.load(f)["num_train_epochs"] == 1
    state = load_file(os.path.join(mend_artefact, "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    net = load_net(mend_artefact, micro_backbone.base_model)
    assert net.trained, "the normalisation statistics were filled before training"
    assert not torch.allclose(net.edit_lrs, torch.full_like(net.edit_lrs, 1e-3)), "η was not trained"
    assert not all(bool((layer.u == 0).all()) for t in net.transforms.values() for layer in t.mlp.layers), (
        "the hypernetwork's output layers never moved from their zero init"
    )


def test_out_dir_is_never_overwritten_without_overwrite(mend_artefact, micro_world, tmp_path, capsys):  # noqa: ANN001
    argv = ["train-editor", "--method", "mend", "--model", micro_world.model_dir, "--data", micro_world.root]
    argv += ["--n", "4", "--device", "cpu", "--no-progress", "--train.num-train-epochs", "1"]
    argv += ["--train.eval-steps", "2"]
    copy = tmp_path / "copy"
    shutil.copytree(mend_artefact, copy)
    before = (copy / "model.safetensors").read_bytes()
    assert main([*argv, "--out", str(copy)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (copy / "model.safetensors").read_bytes() == before
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    assert main([*argv, "--out", str(user), "--overwrite"]) == 2
    assert "never" in capsys.readouterr().err and (user / "notes.txt").read_text() == "mine"
    assert main([*argv, "--out", str(copy), "--overwrite"]) == 0
    assert (copy / "model.safetensors").read_bytes() != before
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith(".")]
    assert not leftovers, f"temporary folders left behind: {leftovers}"


def test_ike_and_untrained_editors_say_why_they_are_not_trained(micro_world, tmp_path, capsys):  # noqa: ANN001
    common = ["--model", micro_world.model_dir, "--data", micro_world.root, "--out", str(tmp_path / "x")]
    assert main(["train-editor", "--method", "ftl", *common]) == 2
    assert "learns nothing before editing" in capsys.readouterr().err
    assert main(["train-editor", "--method", "ike", *common]) == 2
    assert "edit time" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_an_artefact_for_another_base_model_is_refused(mend_artefact, micro_world, tmp_path):  # noqa: ANN001
    from odedit_hf.cli.edit import load_backbone
    from odedit_hf.testing import tiny_backbone

    other = tiny_backbone("llava", seed=0)  # another LLaVA (a random tiny one)
    with pytest.raises(ValueError, match="trained for another base model"):
        get_method("mend", editor_weights=mend_artefact).peft_config(other)
    # the same model with one edited weight changed
    backbone = load_backbone(micro_world.model_dir, device="cpu", progress=False)
    module = backbone.base_model.get_submodule(get_method("mend").modules(backbone)[-1])
    with torch.no_grad():
        module.weight[0, 0] += 1e-3
    with pytest.raises(ValueError, match="weights of the edited modules differ"):
        get_method("mend", editor_weights=mend_artefact).peft_config(backbone)
    with pytest.raises(ValueError, match="not a MEND artefact"):
        get_method("mend", editor_weights=str(tmp_path))


def test_edit_cli_loads_the_artefact(mend_artefact, micro_world, tmp_path):  # noqa: ANN001
    out = tmp_path / "r.json"
    argv = ["edit", "--model", micro_world.model_dir, "--data", micro_world.root, "--method", "mend"]
    argv += ["--mend.editor-weights", mend_artefact, "--protocol", "single", "--n", "3"]
    argv += ["--out", str(out), "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["config"]["method"]["options"]["editor_weights"] == os.path.abspath(mend_artefact)
    assert len(report["edits"] if "edits" in report else report["rows"]) == 3


def test_sequential_edits_stay_finite_and_roll_back_exactly(mend_artefact, micro_world, micro_requests):  # noqa: ANN001
    from odedit_hf.cli.edit import load_backbone
    from odedit_hf.editors.mend import MENDLayer

    backbone = load_backbone(micro_world.model_dir, device="cpu", progress=False)
    requests = micro_requests[:24]
    assert len(requests) >= 20
    probe = backbone.build_batch([eval_samples(r)["t_locality"] for r in requests[:4]])
    with torch.no_grad():
        base_logits = backbone.model(**model_inputs(probe)).logits
    base = BaseWeights(backbone.model)
    digest = base.digest()
    method = get_method("mend", editor_weights=mend_artefact)
    peft_model = get_peft_model(backbone.model, method.peft_config(backbone))
    snapshot = method.snapshot(peft_model, "default", base=base)
    layers = [m for m in peft_model.modules() if isinstance(m, MENDLayer)]
    for i, request in enumerate(requests):
        stats = method.edit(peft_model, backbone, [request])
        assert stats.final_loss is not None and stats.final_loss == stats.final_loss
        with torch.no_grad():
            logits = peft_model(**model_inputs(probe)).logits
        assert torch.isfinite(logits).all(), f"non-finite logits after edit {i + 1}"
    assert all(torch.isfinite(layer.delta_weight("default")).all() for layer in layers)
    assert all(layer.rank("default") > 0 for layer in layers)
    with torch.no_grad():
        assert not torch.equal(peft_model(**model_inputs(probe)).logits, base_logits)
    snapshot.restore()
    with torch.no_grad():
        assert torch.equal(peft_model(**model_inputs(probe)).logits, base_logits)
    base.check(digest, context="after 24 MEND edits and a rollback")


def test_a_batch_edit_takes_every_request_s_tokens(mend_artefact, micro_world, micro_requests):  # noqa: ANN001
    from odedit_hf.cli.edit import load_backbone
    from odedit_hf.editors.mend import MENDLayer

    backbone = load_backbone(micro_world.model_dir, device="cpu", progress=False)
    method = get_method("mend", editor_weights=mend_artefact)
    peft_model = get_peft_model(backbone.model, method.peft_config(backbone))
    snapshot = method.snapshot(peft_model, "default")
    layers = [m for m in peft_model.modules() if isinstance(m, MENDLayer)]
    singles = []
    for request in micro_requests[:2]:
        method.edit(peft_model, backbone, [request])
        singles.append([layer.rank("default") for layer in layers])
        snapshot.restore()
    stats = method.edit(peft_model, backbone, micro_requests[:2])  # padded to one batch: padding drops out
    assert stats.steps == 1
    assert [layer.rank("default") for layer in layers] == [a + b for a, b in zip(*singles)]


# ------------------------------------------------------------------ ODEdit+MEND: the hypernetwork under ODEdit's objective
def _odedit_mend_trainer(backbone, requests, tmp_path, **training):  # noqa: ANN001, ANN202
    from odedit_hf.editors.mend import MENDConfig, MENDNet, MENDNetConfig
    from odedit_hf.editors.mend.odedit_trainer import ODEditMENDTrainer
    from odedit_hf.editors.mend.trainer import MENDTrainingArguments
    from odedit_hf.methods.odedit.config import ODEditConfig

    modules = get_method("mend").modules(backbone)
    shapes = [[backbone.base_model.get_submodule(m).in_features, backbone.base_model.get_submodule(m).out_features]
              for m in modules]  # fmt: skip
    torch.manual_seed(0)
    net = MENDNet(MENDNetConfig(modules=modules, shapes=shapes))
    args = MENDTrainingArguments(
        output_dir=str(tmp_path / "trainer"), use_cpu=True, eval_strategy="no", early_stopping_patience=0,
        disable_tqdm=True, norm_samples=4, report_to="none", **training,
    )  # fmt: skip
    config = ODEditConfig(editor=MENDConfig(target_modules=modules))
    return ODEditMENDTrainer(net, args, backbone, requests, odedit_config=config)


@pytest.fixture(scope="module")
def train_requests(micro_world):  # noqa: ANN001
    from odedit_hf.training import load_train_requests

    return load_train_requests(micro_world.root, limit=6)


def _grads(net) -> torch.Tensor:  # noqa: ANN001
    return torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])


def test_odedit_objective_reaches_the_hypernetwork(micro_backbone, train_requests, tmp_path):  # noqa: ANN001
    trainer = _odedit_mend_trainer(micro_backbone, train_requests, tmp_path, max_steps=1)
    try:
        batch = trainer.data_collator(train_requests[:1])
        terms = trainer.odedit_terms(batch)
        assert terms.r_loc is not None and terms.r_gen is not None and terms.penalty is not None
        terms.total.backward()
        odedit = _grads(trainer.net)
        assert torch.isfinite(odedit).all() and odedit.abs().sum() > 0
        assert trainer.lambda_net.dual_signal is not None, "the backward of λ·P did not reach λ"
        assert trainer.lambda_net.dual_signal == pytest.approx(float(terms.penalty.detach()), rel=1e-5)
        trainer.net.zero_grad(set_to_none=True)
        trainer.mend_terms(batch)["loss"].backward()
        plain = _grads(trainer.net)
        assert plain.shape == odedit.shape
        assert not torch.allclose(plain, odedit, rtol=1e-3, atol=1e-8), (
            "ODEdit's terms left the gradient as MEND's"
        )
    finally:
        trainer.close()


def test_one_dual_step_per_optimizer_step_under_accumulation(micro_backbone, train_requests, tmp_path):  # noqa: ANN001
    trainer = _odedit_mend_trainer(
        micro_backbone, train_requests, tmp_path, max_steps=2, gradient_accumulation_steps=2, logging_steps=1
    )
    calls = []
    loss = trainer.compute_loss

    def counted(*a, **k):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        return loss(*a, **k)

    trainer.compute_loss = counted
    before = [p.detach().clone() for p in trainer.lambda_net.parameters()]
    try:
        trainer.train()
    finally:
        trainer.close()
    assert len(calls) == 4, "2 optimiser steps × 2 accumulated micro-batches"
    assert trainer.state.global_step == 2
    assert trainer.dual_steps == 2, "one dual step per optimiser step, not per micro-batch"
    after = list(trainer.lambda_net.parameters())
    assert any(not torch.equal(b, a.detach()) for b, a in zip(before, after)), "the λ-network never moved"
    logs = [h for h in trainer.state.log_history if "odedit/lambda" in h]
    assert logs and all(h["odedit/penalty"] == h["odedit/penalty"] for h in logs)


def test_odedit_mend_artefact_records_its_objective(micro_world, micro_backbone, micro_requests, tmp_path):  # noqa: ANN001
    out = tmp_path / "odedit-mend"
    argv = [
        "train-editor",
        "--method",
        "odedit+mend",
        "--model",
        micro_world.model_dir,
        "--data",
        micro_world.root,
    ]
    argv += ["--out", str(out), "--n", "8", "--device", "cpu", "--no-progress", "--odedit.alpha", "0.2"]
    argv += ["--train.max-steps", "2", "--train.eval-steps", "1", "--train.logging-steps", "1"]
    assert main(argv) == 0
    with open(out / "mend_config.json") as f:
        extra = json.load(f)["extra"]
    assert extra["objective"] == "odedit"
    assert extra["odedit_config"]["alpha"] == 0.2 and extra["odedit_config"]["irm_penalty"] is True
    assert extra["odedit_config_version"] and extra["dual_steps"] == 2
    with open(out / "training_history.json") as f:
        history = json.load(f)
    assert any("eval_penalty" in h and "eval_edit_acc" in h for h in history)
    with pytest.raises(
        ValueError, match=r"--method mend --mend.editor-weights .*meta-trained under the 'odedit'"
    ):
        get_method("odedit+mend", editor_weights=str(out))
    method = get_method("mend", editor_weights=str(out))  # the artefact edits as MEND
    peft_model = get_peft_model(micro_backbone.model, method.peft_config(micro_backbone))
    try:
        method.edit(peft_model, micro_backbone, micro_requests[:1])
        assert not method.adapter_is_identity(peft_model)
    finally:
        peft_model.unload()

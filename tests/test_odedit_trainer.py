"""ODEditTrainer: batch edits under transformers.Trainer with the dual step on the λ-network."""

from __future__ import annotations

import os

import pytest
import torch

import odedit_hf  # noqa: F401
from odedit_hf.methods.odedit import ODEditConfig, ODEditTrainer, ODEditTrainingArguments

TEXTS = [
    "what color is the cube",
    "which colour has the cube",
    "what is the capital of france",
    "what animal is this",
]
TEXTS += ["red", "blue", "paris", "cat"]


@pytest.fixture(scope="module")
def requests(tmp_path_factory):  # noqa: ANN001
    from odedit_hf.data import EditRequest
    from odedit_hf.testing import tiny_image

    root = tmp_path_factory.mktemp("trainer-images")
    paths = []
    for i in range(4):
        paths.append(os.path.join(root, f"img{i}.png"))
        tiny_image(10 + i).save(paths[-1])
    out = []
    for i, alt in enumerate(["blue", "cat", "paris", "red"]):
        out.append(
            EditRequest(
                case_id=i,
                task="vqa",
                source="in-memory",
                src="what color is the cube",
                pred="red",
                alt=alt,
                image=paths[i],
                rephrase="which colour has the cube",
                image_rephrase=paths[(i + 1) % 4],
                loc="what is the capital of france",
                loc_ans="paris",
                m_loc=paths[(i + 2) % 4],
                m_loc_q="what animal is this",
                m_loc_a="cat",
            )
        )
    return out


def _trainer(tmp_path, requests, train_args=None, **config):  # noqa: ANN001, ANN202
    from peft import get_peft_model

    from odedit_hf.editors.lora import lora_config_for
    from odedit_hf.testing import tiny_backbone

    backbone = tiny_backbone("llava", texts=TEXTS)
    peft_model = get_peft_model(
        backbone.model, ODEditConfig(editor=lora_config_for(backbone, rank=4), **config)
    )
    args = ODEditTrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,  # one batch edit of all four requests
        max_steps=6,
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        logging_steps=3,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        **(train_args or {}),
    )
    return ODEditTrainer(model=peft_model, args=args, train_dataset=requests, backbone=backbone), backbone


@pytest.mark.parametrize("lambda_mode", ["sketch", "params"])
def test_trainer_batch_edit_descends_and_the_dual_step_raises_lambda(
    lambda_mode: str, requests, tmp_path
) -> None:  # noqa: ANN001
    trainer, _ = _trainer(
        tmp_path,
        requests,
        lambda_mode=lambda_mode,
        lambda_lr=5e-2,
        lambda_init=1.0,
        lambda_param="softplus",  # no slack (config version 1): P > 0 can only raise λ
        dual_slack=0.0,
    )
    lam0 = trainer.current_lambda()
    out = trainer.train()
    assert out.global_step == 6
    logs = [h for h in trainer.state.log_history if "odedit/r_rel" in h]
    assert len(logs) == 2
    assert logs[-1]["odedit/loss"] < logs[0]["odedit/loss"]
    assert all(logs[0][f"odedit/{k}"] > 0 for k in ("penalty", "r_gen"))
    assert trainer.current_lambda() > lam0  # P > 0 throughout, so ascent raised lambda
    # the primal optimiser holds the edit parameters only, not the lambda network
    primal = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not primal & {id(p) for p in trainer.lambda_net.parameters()}


def test_trainer_fixed_lambda_has_no_dual_step(requests, tmp_path) -> None:  # noqa: ANN001
    trainer, _ = _trainer(tmp_path, requests, lambda_mode="fixed", lambda_init=0.5)
    trainer.train()
    assert trainer.dual_optimizer is None
    assert trainer.current_lambda() == pytest.approx(0.5)


def test_trainer_saves_a_standard_adapter(requests, tmp_path) -> None:  # noqa: ANN001
    from peft import PeftModel

    from odedit_hf.testing import tiny_backbone

    trainer, backbone = _trainer(tmp_path, requests, gen_risk=False)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "odedit/r_rel" in h]
    assert logs[-1]["odedit/r_rel"] < logs[0]["odedit/r_rel"]
    trainer.save_model(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(tiny_backbone("llava", texts=TEXTS).model, str(tmp_path / "adapter"))
    from odedit_hf.editing import edit_sample

    batch = {k: v for k, v in backbone.build_batch([edit_sample(requests[0])]).items() if k != "labels"}
    trainer.model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, trainer.model(**batch).logits, atol=1e-6)


def test_trainer_rejects_bad_setups(requests, tmp_path) -> None:  # noqa: ANN001
    from peft import LoraConfig, get_peft_model

    from odedit_hf.testing import tiny_backbone

    with pytest.raises(ValueError, match="remove_unused_columns must be False"):
        ODEditTrainingArguments(output_dir=str(tmp_path), remove_unused_columns=True, use_cpu=True)
    backbone = tiny_backbone("llava", texts=TEXTS)
    plain = get_peft_model(backbone.model, LoraConfig(target_modules=["down_proj"]))
    args = ODEditTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="must be an ODEditConfig adapter"):
        ODEditTrainer(model=plain, args=args, train_dataset=requests, backbone=backbone)


# ---------------------------------------------------------------- mixed precision and replicas (issue 12)
class _FakeScaler:
    """The parts of ``torch.amp.GradScaler`` accelerate calls, with a fixed scale (a power of two: exact)."""

    def __init__(self, scale: float, overflow: bool = False) -> None:
        self._scale = scale
        self.overflow = overflow
        self._unscaled: set[int] = set()
        self.skipped = 0

    def is_enabled(self) -> bool:
        return True

    def get_scale(self) -> float:
        return self._scale

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self._scale

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        if id(optimizer) in self._unscaled:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.div_(self._scale)
        self._unscaled.add(id(optimizer))

    def step(self, optimizer: torch.optim.Optimizer, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        if self.overflow:  # as GradScaler on inf/NaN gradients: no optimiser step
            self._unscaled.clear()
            self.skipped += 1
            return None
        self.unscale_(optimizer)
        self._unscaled.clear()
        return optimizer.step(*args, **kwargs)

    def update(self) -> None:
        pass


def _lambda_state(trainer) -> list[torch.Tensor]:  # noqa: ANN001
    return [p.detach().clone() for p in trainer.lambda_net.parameters()]


def test_trainer_dual_step_unscales_the_penalty_under_a_loss_scaler(requests, tmp_path) -> None:  # noqa: ANN001
    # no clipping: without fp16 autocast accelerate clips before the (fake) scaler unscales
    kwargs = {
        "lambda_lr": 5e-2,
        "lambda_init": 1.0,
        "lambda_param": "log",
        "train_args": {"max_grad_norm": 0.0},
    }
    torch.manual_seed(0)  # LoRA's init draws from the global RNG before the Trainer reseeds it
    plain, _ = _trainer(tmp_path / "plain", requests, **kwargs)
    plain.train()
    torch.manual_seed(0)
    scaled, _ = _trainer(tmp_path / "scaled", requests, **kwargs)
    scaled.accelerator.scaler = _FakeScaler(1024.0)  # picked up by accelerate's optimizer wrapper in train()
    scaled.train()
    assert plain.current_lambda() != pytest.approx(1.0)  # the dual did move λ
    # the primal steps are the same (the scaler unscales them); so must the dual steps be
    for a, b in zip(plain._edit_params, scaled._edit_params):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(_lambda_state(plain), _lambda_state(scaled)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert scaled.current_lambda() == pytest.approx(plain.current_lambda(), rel=1e-5)


def test_trainer_skips_the_dual_step_when_the_primal_step_was_skipped(requests, tmp_path) -> None:  # noqa: ANN001
    trainer, _ = _trainer(tmp_path, requests, lambda_lr=5e-2, lambda_init=1.0)
    before = _lambda_state(trainer)
    scaler = _FakeScaler(1024.0, overflow=True)
    trainer.accelerator.scaler = scaler
    trainer.train()
    assert scaler.skipped == 6
    for a, b in zip(before, _lambda_state(trainer)):
        assert torch.equal(a, b)


def test_trainer_lambda_network_starts_identical_whatever_each_process_rng(
    requests, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    import transformers.trainer

    # as replicas whose RNG states differ: no Trainer-wide reseed, a different global state per "process"
    monkeypatch.setattr(transformers.trainer, "set_seed", lambda *a, **k: None)
    states = []
    for rank in range(2):
        torch.manual_seed(100 + rank)
        trainer, _ = _trainer(tmp_path / str(rank), requests, lambda_mode="sketch")
        states.append(_lambda_state(trainer))
    for a, b in zip(*states):
        assert torch.equal(a, b)

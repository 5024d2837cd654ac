"""The Trainer path honours the same editor hooks as the per-edit loop: the adapter layers' post-step
constraints (FT-L's norm clamp, which ``ODEditTrainer`` once ignored) and the editor's own loss terms."""

from __future__ import annotations

import torch

import odedit_hf  # noqa: F401
from odedit_hf.editors.ftl import FTLMethod
from odedit_hf.methods.odedit import ODEditTrainer, ODEditTrainingArguments

from .test_odedit_trainer import TEXTS, requests  # noqa: F401  (the module-scoped fixture)


class _CountingFTL(FTLMethod):
    """FT-L with an own loss term that counts its calls and pulls the delta towards zero."""

    def extra_loss(self, peft_model):  # noqa: ANN001, ANN201
        self.calls = getattr(self, "calls", 0) + 1
        deltas = [p for n, p in peft_model.named_parameters() if "ftl_delta" in n]
        return {"l2": 0.0 * sum((d**2).sum() for d in deltas)}


def _trainer(tmp_path, requests, editor):  # noqa: ANN001, ANN202, F811
    from peft import get_peft_model

    from odedit_hf.editing import get_method
    from odedit_hf.testing import tiny_backbone

    backbone = tiny_backbone("llava", texts=TEXTS)
    method = get_method("odedit", editor=editor)
    peft_model = get_peft_model(backbone.model, method.peft_config(backbone))
    args = ODEditTrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=5e-2,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = ODEditTrainer(
        model=peft_model, args=args, train_dataset=requests, backbone=backbone, editor=method.editor
    )
    return trainer, peft_model


def test_the_trainer_applies_the_layers_post_step_constraint(requests, tmp_path) -> None:  # noqa: ANN001, F811
    bound = 1e-3
    trainer, peft_model = _trainer(tmp_path, requests, FTLMethod(norm_constraint=bound))
    trainer.train()
    deltas = [p for n, p in peft_model.named_parameters() if "ftl_delta" in n]
    largest = max(d.abs().max().item() for d in deltas)
    assert largest <= bound + 1e-9, largest
    assert largest > bound / 2, "lr 5e-2 for 4 steps moves entries far past the bound: the clamp did the work"


def test_without_the_constraint_the_same_training_goes_past_the_bound(requests, tmp_path) -> None:  # noqa: ANN001, F811
    trainer, peft_model = _trainer(tmp_path, requests, FTLMethod())
    trainer.train()
    largest = max(p.abs().max().item() for n, p in peft_model.named_parameters() if "ftl_delta" in n)
    assert largest > 1e-2  # so the bound in the test above is binding


def test_the_trainer_adds_the_editors_own_loss_terms(requests, tmp_path) -> None:  # noqa: ANN001, F811
    editor = _CountingFTL()
    trainer, _ = _trainer(tmp_path, requests, editor)
    trainer.train()
    assert getattr(editor, "calls", 0) == 4  # once per training step
    assert torch.is_grad_enabled()

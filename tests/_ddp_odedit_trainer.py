"""Run by tests/test_distributed.py under torchrun: ODEditTrainer on two processes (gloo), each rank prints
its lambda and a digest of its adapter parameters into OUT_DIR/rank<r>.json (not stdout: two ranks'
lines can interleave in one pipe)."""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch

import odedit_hf  # noqa: F401
from odedit_hf.data import EditRequest
from odedit_hf.editors.lora import lora_config_for
from odedit_hf.methods.odedit import ODEditConfig, ODEditTrainer, ODEditTrainingArguments
from odedit_hf.testing import tiny_backbone, tiny_image

TEXTS = ["what color is the cube", "which colour has the cube", "what is the capital of france"]
TEXTS += ["what animal is this", "red", "blue", "paris", "cat"]


def main(out_dir: str) -> None:
    from peft import get_peft_model

    paths = []
    for i in range(4):
        paths.append(os.path.join(out_dir, f"img{i}.png"))
        if int(os.environ.get("RANK", "0")) == 0 and not os.path.exists(paths[-1]):
            tiny_image(10 + i).save(paths[-1])
    torch.distributed.init_process_group("gloo") if not torch.distributed.is_initialized() else None
    torch.distributed.barrier()
    requests = [
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
        for i, alt in enumerate(["blue", "cat", "paris", "red"])
    ]
    backbone = tiny_backbone("llava", texts=TEXTS)
    config = ODEditConfig(editor=lora_config_for(backbone, rank=4), lambda_init=0.1)
    peft_model = get_peft_model(backbone.model, config)
    args = ODEditTrainingArguments(
        output_dir=os.path.join(out_dir, "out"),
        per_device_train_batch_size=2,  # each rank edits two of the four requests per step
        max_steps=3,
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = ODEditTrainer(model=peft_model, args=args, train_dataset=requests, backbone=backbone)
    lam0 = trainer.current_lambda()
    trainer.train()
    digest = hashlib.sha256()
    for name, param in sorted(peft_model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    lam_net = hashlib.sha256(
        b"".join(p.detach().float().numpy().tobytes() for p in trainer.lambda_net.parameters())
    ).hexdigest()
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as fh:
        fh.write(
            json.dumps(
                {
                    "rank": int(os.environ.get("RANK", "0")),
                    "world": torch.distributed.get_world_size(),
                    "lambda_start": lam0,
                    "lambda_end": trainer.current_lambda(),
                    "adapter": digest.hexdigest(),
                    "lambda_net": lam_net,
                }
            )
        )


if __name__ == "__main__":
    main(sys.argv[1])
    from odedit_hf.cli.main import close_process_group

    close_process_group()  # as the odedit-hf command does: gloo can abort at exit otherwise

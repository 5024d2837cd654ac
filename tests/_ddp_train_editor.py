"""Run by tests/test_distributed.py under torchrun: ``odedit-hf train-editor`` for each METHOD on two processes
(gloo), then every rank loads the artefact the main process wrote and edits with it. Each rank writes what
it ended with into OUT_DIR/<method>-rank<r>.json (not stdout: two ranks' lines can interleave in one pipe):
digests of the trained weights (MEND: the hypernetwork with its statistics; ODEdit+MEND: also the
λ-network, and λ before and after; SERAC: the classifier and counterfactual tensors), of the artefact, and
how many times this rank wrote an artefact.

Usage: _ddp_train_editor.py MODEL_DIR DATA OUT_DIR METHOD[,METHOD...] [train-editor arguments...]
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch

import odedit_hf  # noqa: F401  registers the PEFT types
from odedit_hf.editors.mend.odedit_trainer import ODEditMENDTrainer
from odedit_hf.editors.mend.trainer import MENDTrainer

STATE: dict[str, object] = {}
BACKBONE: dict[str, object] = {}  # loaded once per rank for the edit checks


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().to(torch.float64).numpy().tobytes())
    return h.hexdigest()


def _patch() -> None:
    close = MENDTrainer.close
    init = ODEditMENDTrainer.__init__

    def recording_close(self) -> None:  # noqa: ANN001
        # the end of training, on every rank: the best network is restored, the artefact not written yet
        STATE["net"] = digest(self.net.state_dict())
        STATE["stats"] = digest({k: v for k, v in self.net.state_dict().items() if "stats_" in k})
        if isinstance(self, ODEditMENDTrainer):
            STATE["lambda_net"] = digest(dict(self.lambda_net.named_parameters()))
            STATE["lambda_end"] = self.current_lambda()
            STATE["dual_steps"] = self.dual_steps
        close(self)

    def recording_init(self, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        init(self, *args, **kwargs)
        STATE["lambda_start"] = self.current_lambda()

    MENDTrainer.close = recording_close
    ODEditMENDTrainer.__init__ = recording_init

    from odedit_hf.editors.mend import hypernet
    from odedit_hf.editors.serac import trainer as serac_trainer

    def counted(write):  # noqa: ANN001, ANN202
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            STATE["writes"] = int(STATE.get("writes", 0)) + 1  # artefact writes on this rank
            return write(*args, **kwargs)

        return wrapper

    hypernet.save_net = counted(hypernet.save_net)
    serac_trainer.save_artefact = counted(serac_trainer.save_artefact)
    adapter_tensors = serac_trainer.adapter_tensors

    def recording_tensors(model, adapter):  # noqa: ANN001, ANN202
        tensors = adapter_tensors(model, adapter)  # after the best evaluation's weights are restored
        STATE["serac"] = digest(tensors)
        return tensors

    serac_trainer.adapter_tensors = recording_tensors


def _artefact_digest(path: str) -> str:
    from safetensors.torch import load_file

    name = "serac_weights.safetensors" if os.path.exists(os.path.join(path, "serac_config.json")) else None
    return digest(load_file(os.path.join(path, name or "model.safetensors")))


def _edits(method: str, model_dir: str, data: str, artefact: str) -> bool:
    """Whether the artefact, loaded on this rank, changes the model on one edit."""
    from peft import get_peft_model

    from odedit_hf.cli.edit import load_backbone
    from odedit_hf.editing import get_method
    from odedit_hf.training import load_train_requests

    if "backbone" not in BACKBONE:
        BACKBONE["backbone"] = load_backbone(model_dir, device="cpu", progress=False)
    backbone = BACKBONE["backbone"]
    name = "serac" if method == "serac" else "mend"
    edit_method = get_method(name, editor_weights=artefact)
    requests = load_train_requests(data, limit=2)
    peft_model = get_peft_model(backbone.model, edit_method.peft_config(backbone))
    try:
        before = peft_model(**_inputs(backbone, requests[0])).logits
        edit_method.edit(peft_model, backbone, requests[:1])
        after = peft_model(**_inputs(backbone, requests[0])).logits
        return not torch.allclose(before, after)
    finally:
        peft_model.unload()


@torch.no_grad()
def _inputs(backbone, request):  # noqa: ANN001, ANN202
    from odedit_hf.editing import eval_samples, model_inputs

    return model_inputs(backbone.build_batch([eval_samples(request)["reliability"]]))


def main(model_dir: str, data: str, out_dir: str, methods: str, extra: list[str]) -> None:
    from odedit_hf.cli.main import main as cli

    _patch()
    for method in methods.split(","):
        STATE.clear()
        artefact = os.path.join(out_dir, method.replace("+", "-"))
        argv = ["train-editor", "--method", method, "--model", model_dir, "--data", data, "--out", artefact]
        argv += ["--device", "cpu", "--no-progress", *extra]
        if method == "serac":
            argv += ["--train.rank", "2", "--train.proj-dim", "8", "--train.copy-dim", "4"]
            argv += ["--train.per-device-train-batch-size", "2", "--train.per-device-eval-batch-size", "2"]
        else:
            argv += ["--train.norm-samples", "6"]
        assert cli(argv) == 0, f"train-editor --method {method} failed"
        rank = torch.distributed.get_rank()
        row = {
            "rank": rank,
            "world": torch.distributed.get_world_size(),
            "artefact": _artefact_digest(artefact),  # every rank returns once the artefact is written
            "edits": _edits(method, model_dir, data, artefact),
            "writes": 0,
            **STATE,
        }
        with open(os.path.join(out_dir, f"{method}-rank{rank}.json"), "w", encoding="utf-8") as fh:
            json.dump(row, fh)
        torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
    from odedit_hf.cli.main import close_process_group

    close_process_group()  # as the odedit-hf command does: gloo can abort at exit otherwise

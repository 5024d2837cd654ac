"""WISE sequential routing probe on SmolLM2-135M: per edit, the loss parts over the steps and, after the
edit, the side memory's routing distance on every edited request's prompt / rephrase / locality prompt,
the threshold tau and the path each prompt takes.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.wise_routing_probe --n-edits 6 [--options '{...}']
"""

from __future__ import annotations

import argparse
import json
import os


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-edits", type=int, default=6)
    parser.add_argument("--spread-n", type=int, default=100)
    parser.add_argument("--options", default="{}")
    parser.add_argument(
        "--sgd-lr", type=float, default=None, help="diagnostic: SGD at this lr instead of Adam"
    )
    parser.add_argument("--out", default=None, help="write the per-edit records as JSON lines here")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from peft import get_peft_model

    from benchmarks.text_edit import spread
    from odedit_hf.data import load_text_edits
    from odedit_hf.data.facts import load_fact_prompts
    from odedit_hf.editing import get_method
    from odedit_hf.editing.samples import eval_samples
    from odedit_hf.editing.saving import write_bytes_atomic
    from odedit_hf.editors.wise.method import wise_layers
    from odedit_hf.evaluation import token_accuracy
    from odedit_hf.models import get_model

    torch.manual_seed(0)
    if args.sgd_lr is not None:  # diagnostic only: the shared loop builds torch.optim.Adam
        sgd_lr = args.sgd_lr
        torch.optim.Adam = lambda params, lr, weight_decay=0.0: torch.optim.SGD(
            params, lr=sgd_lr, weight_decay=weight_decay
        )
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    model_dir = get_model("smollm2")
    all_requests = list(load_text_edits(os.path.join(out_dir, "zsre_facts-smollm2-raw.json")))
    requests = spread(all_requests, args.spread_n)[
        : args.n_edits
    ]  # the first of text_edit.py's --spread edits
    backbone = load_fact_prompts(model_dir, "raw").backbone
    method = get_method("wise", **json.loads(args.options))
    config = method.peft_config(backbone)
    print("target", config.target_modules, "act_fn", config.act_fn)
    peft_model = get_peft_model(backbone.model, config)
    peft_model.eval()
    layer = wise_layers(peft_model, peft_model.active_adapter)[0][1]
    adapter = peft_model.active_adapter

    trace: list[dict] = []
    original = method.extra_loss

    def extra_loss(model):
        terms = original(model)
        if terms:
            with torch.no_grad():
                d_edit, d_loc = method.distances(model)
            trace.append(
                {
                    "d_edit": [round(float(v), 2) for v in d_edit],
                    "d_loc": [round(float(v), 2) for v in d_loc],
                    "act": round(float(terms["wise_act"]), 2),
                }
            )
        return terms

    method.extra_loss = extra_loss

    def probe(sample):
        batch = backbone.build_batch([sample])
        with torch.no_grad():
            logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        acc, _ = token_accuracy(logits.float(), batch["labels"])
        d = layer.last_distances[adapter]
        c = layer.last_choice[adapter]
        return (round(float(d[0, 0]), 2) if d.numel() else None), int(c[0]), round(float(acc[0]), 2)

    records = []
    for i, request in enumerate(requests):
        trace.clear()
        stats = method.edit(peft_model, backbone, [request])
        tau = float(layer.wise_min_act[adapter]) * method.act_ratio
        delta = layer.side_delta(adapter).detach()
        rec = {
            "edit": i,
            "steps": stats.steps,
            "loss_first_last": [round(stats.losses[0], 2), round(stats.losses[-1], 2)],
            "nll_first_last": [
                round(stats.losses[0] - trace[0]["act"], 3),
                round(stats.losses[-1] - trace[-1]["act"], 3),
            ],
            "train_first": trace[0],
            "train_last": trace[-1],
            "min_act": round(float(layer.wise_min_act[adapter]), 2),
            "tau": round(tau, 2),
            "delta_abs_mean_on_mask": round(float(delta.abs().sum() / layer.wise_mask[adapter].sum()), 4),
            "delta_at_clamp_frac": round(
                float(
                    (delta.abs() >= 0.999 * (method.norm_constraint or 1e9)).sum()
                    / layer.wise_mask[adapter].sum()
                ),
                4,
            ),
            "probe": {},
        }
        for j, r in enumerate(requests[: i + 1]):
            s = eval_samples(r)
            rec["probe"][j] = {k: probe(s[k]) for k in ("reliability", "t_generality", "t_locality")}
        records.append(rec)
        print(json.dumps(rec))
    if args.out:
        write_bytes_atomic(args.out, "".join(json.dumps(rec) + "\n" for rec in records).encode("utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Train SERAC's scope classifier and counterfactual model on an embedded world and plot the validation curve.

Writes the artefact (``--out``, default ``benchmarks/out/serac/<world>-seed<seed>``), prints the training
time, and draws ``eval_loss`` / ``eval_scope_acc`` / ``eval_cf_acc`` against the step into a PNG (matplotlib)
or, without matplotlib, a CSV. Example::

    OMP_NUM_THREADS=1 python -m benchmarks.serac_train --world tiny --seed 0 \\
        --figure benchmarks/figures/serac_validation_tiny_seed0.png
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", default="vqa", choices=("vqa", "caption"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="artefact folder")
    parser.add_argument("--figure", help="PNG of the validation curve (a .csv beside it without matplotlib)")
    parser.add_argument(
        "--max-steps", type=int, default=-1, help="cap the steps (default: the preset's epochs)"
    )
    opts = parser.parse_args(argv)

    import torch

    torch.set_num_threads(opts.threads)
    from odedit_hf.data import load_mmedit
    from odedit_hf.data.world import build_world
    from odedit_hf.editors.serac import SERACTrainingArguments, SERACTrainingConfig, train_serac

    world = build_world(opts.world, opts.seed, progress=False)
    backbone = world.load_backbone()
    records = list(load_mmedit(world.vqa_train if opts.task == "vqa" else world.caption_train))
    out = opts.out or os.path.join("benchmarks", "out", "serac", f"{opts.world}-seed{opts.seed}-{opts.task}")
    trainer_dir = os.path.join(os.path.dirname(os.path.abspath(out)), "trainer")
    args = SERACTrainingArguments(output_dir=trainer_dir, max_steps=opts.max_steps, seed=opts.seed)
    start = time.perf_counter()
    path = train_serac(backbone, records, out, SERACTrainingConfig(), args)
    seconds = time.perf_counter() - start
    with open(os.path.join(path, "serac_config.json"), encoding="utf-8") as f:
        meta = json.load(f)
    evals = [h for h in meta["history"] if "eval_loss" in h]
    train = [h for h in meta["history"] if "loss" in h and "eval_loss" not in h]
    info = meta["training"]
    print(
        f"SERAC {opts.world}/seed {opts.seed}/{opts.task}: {len(records)} train records "
        f"({info['train_records']} train, {info['val_records']} val), {info['steps']} steps, "
        f"train {info['train_seconds']:.1f} s (call {seconds:.1f} s), best eval_loss "
        f"{info['best_eval_loss']:.4f} at step {info['best_step']}"
    )
    for h in evals:
        print(
            f"  step {h['step']:4d}  eval_loss {h['eval_loss']:.4f}  scope_acc {h.get('eval_scope_acc', float('nan')):.3f}"
            f"  cf_acc {h.get('eval_cf_acc', float('nan')):.3f}"
        )
    if opts.figure:
        os.makedirs(os.path.dirname(os.path.abspath(opts.figure)), exist_ok=True)
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            csv_path = os.path.splitext(opts.figure)[0] + ".csv"
            with open(csv_path, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(["step", "eval_loss", "eval_scope_acc", "eval_cf_acc"])
                for h in evals:
                    writer.writerow(
                        [h["step"], h["eval_loss"], h.get("eval_scope_acc"), h.get("eval_cf_acc")]
                    )
            print(f"no matplotlib: wrote {csv_path}")
        else:
            fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
            left.plot([h["step"] for h in train], [h["loss"] for h in train], label="train loss", alpha=0.6)
            left.plot(
                [h["step"] for h in evals], [h["eval_loss"] for h in evals], label="eval loss", marker="o"
            )
            left.set_xlabel("step")
            left.set_ylabel("loss")
            left.legend()
            right.plot(
                [h["step"] for h in evals], [h.get("eval_scope_acc") for h in evals], label="scope acc"
            )
            right.plot(
                [h["step"] for h in evals], [h.get("eval_cf_acc") for h in evals], label="in-scope token acc"
            )
            right.set_xlabel("step")
            right.set_ylim(0, 1.02)
            right.legend()
            fig.suptitle(f"SERAC validation, {opts.world} world seed {opts.seed} ({opts.task})")
            fig.tight_layout()
            fig.savefig(opts.figure, dpi=110)
            print(f"wrote {opts.figure}")
    print(f"artefact: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

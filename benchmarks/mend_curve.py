"""MEND's validation curve: plot the Trainer history of a ``train-editor --method mend`` artefact.

Example::

    odedit-hf train-editor --method mend --model W/model --data world:tiny:0 --out mend-tiny
    python -m benchmarks.mend_curve mend-tiny --png benchmarks/figures/mend_tiny_val.png --csv mend_tiny_val.csv

Reads ``training_history.json`` (the Trainer's log history) and draws, against the optimiser step, the
validation loss and its two parts (edit NLL, locality KL) and the validation accuracies (post-edit token
accuracy of the edit and rephrase prompts, top-1 agreement on the locality prompts), with the training loss
(logged every ``logging_steps``) beside them. Needs matplotlib; without it, ``--csv`` still works.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

EVAL_KEYS = (
    "eval_loss",
    "eval_edit_loss",
    "eval_loc_loss",
    "eval_edit_acc",
    "eval_rephrase_acc",
    "eval_loc_agree",
)


def read_history(folder: str) -> tuple[list[dict], list[dict]]:
    """``(evaluations, training logs)`` of an artefact folder."""
    with open(os.path.join(folder, "training_history.json"), encoding="utf-8") as f:
        history = json.load(f)
    evals = [h for h in history if "eval_loss" in h]
    train = [h for h in history if "loss" in h and "eval_loss" not in h]
    return evals, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artefact", help="the --out folder of train-editor --method mend")
    parser.add_argument("--png", help="write the figure here")
    parser.add_argument("--csv", help="write the evaluations as CSV here")
    args = parser.parse_args(argv)
    evals, train = read_history(args.artefact)
    if not evals:
        print(f"{args.artefact}: the history holds no evaluation", file=sys.stderr)
        return 2
    for h in evals:
        print(
            f"step {int(h['step']):5d}  "
            + "  ".join(f"{k[5:]} {h.get(k, float('nan')):.4f}" for k in EVAL_KEYS)
        )
    if args.csv:
        with open(args.csv, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["step", *EVAL_KEYS])
            for h in evals:
                writer.writerow([int(h["step"]), *(h.get(k, "") for k in EVAL_KEYS)])
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        steps = [h["step"] for h in evals]
        left.plot([h["step"] for h in train], [h["loss"] for h in train], color="0.7", label="train loss")
        for key, style in (("eval_loss", "-o"), ("eval_edit_loss", "--"), ("eval_loc_loss", ":")):
            left.plot(steps, [h[key] for h in evals], style, label=key[5:].replace("_", " ") + " (val)")
        left.set_yscale("log")
        left.set_xlabel("optimiser step")
        left.set_title("MEND meta-training: losses")
        left.legend()
        for key in ("eval_edit_acc", "eval_rephrase_acc", "eval_loc_agree"):
            right.plot(steps, [h[key] for h in evals], "-o", label=key[5:].replace("_", " "))
        right.set_ylim(0, 1.05)
        right.set_xlabel("optimiser step")
        right.set_title("validation (post-edit)")
        right.legend()
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
        fig.savefig(args.png, dpi=110)
        print(f"figure: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

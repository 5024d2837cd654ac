"""Prototype (issue 12, not a library option): ODEdit's ``alpha * R_loc`` gradient taken out of Adam and
applied as a plain gradient step (learning rate ``KAPPA`` x the editor's) after Adam's step on the rest of
the objective, to test whether Adam's per-coordinate normalisation is what keeps ``R_loc`` from protecting
the locality prompts. Runs ``odedit-hf edit`` with the edit loop replaced::

    OMP_NUM_THREADS=1 python benchmarks/odedit_loc_decoupled.py 100 edit --model WORLD/model --data WORLD \
        --method odedit+ftl --protocol single --n 100 --no-progress --out dec100.json

Measured in benchmarks/RESULTS.md ("The single-edit M-Loc gap, diagnosed"): it does not close the gap.
"""

from __future__ import annotations

import sys

import torch

import odedit_hf.methods.odedit.method as method_module
from odedit_hf.editing import loop as loop_module
from odedit_hf.editing.editor import apply_constraints, constrained_layers

STASH: dict = {}
_objective_call = method_module.ODEditObjective.__call__


def _call(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
    terms = _objective_call(self, *args, **kwargs)
    STASH["r_loc"], STASH["alpha"] = terms.r_loc, self.config.alpha
    return terms


def make_loop(kappa: float):  # noqa: ANN201
    def run(model, params, config, objective, *, snapshot=None):  # noqa: ANN001, ANN202, ARG001
        trainable = [p for p in params if p.requires_grad]
        layers = constrained_layers(model)
        optimizer = torch.optim.Adam(trainable, lr=config.lr, weight_decay=config.weight_decay)
        losses, steps, early = [], 0, False
        for step in range(config.steps + 1):
            STASH.clear()
            total, stop_value, _ = objective(step)
            losses.append(float(total.detach()))
            if objective.should_stop(step, stop_value):
                early = True
                break
            if step == config.steps:
                break
            optimizer.zero_grad(set_to_none=True)
            r_loc = STASH.get("r_loc")
            grads = None
            if r_loc is not None and r_loc.requires_grad:
                loc = STASH["alpha"] * r_loc
                grads = torch.autograd.grad(loc, trainable, retain_graph=True, allow_unused=True)
                (total - loc).backward()
            else:
                total.backward()
            optimizer.step()
            if grads is not None:
                with torch.no_grad():
                    for p, g in zip(trainable, grads):
                        if g is not None:
                            p.sub_(kappa * config.lr * g)
            objective.after_optimizer_step(step)
            if layers:
                apply_constraints(model, layers)
            steps += 1
        optimizer.zero_grad(set_to_none=True)
        return loop_module.EditStats(steps=steps, final_loss=losses[-1], losses=losses, stopped_early=early)

    return run


if __name__ == "__main__":
    method_module.ODEditObjective.__call__ = _call
    method_module.run_edit_loop = make_loop(float(sys.argv[1]))
    from odedit_hf.cli.main import main

    sys.exit(main(sys.argv[2:]))

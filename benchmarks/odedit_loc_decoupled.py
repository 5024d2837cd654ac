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

KAPPA = 1.0
STASH: dict = {}
_objective_call = method_module.ODEditObjective.__call__
_step_call = method_module.PrimalDualObjective.__call__


def _terms(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
    terms = _objective_call(self, *args, **kwargs)
    STASH["r_loc"], STASH["alpha"] = terms.r_loc, self.config.alpha
    return terms


def _step(self, step):  # noqa: ANN001, ANN202
    """The step's loss without alpha * R_loc; that term's gradient is kept for the plain step."""
    STASH.clear()
    total, stop_value, named = _step_call(self, step)
    r_loc = STASH.get("r_loc")
    if r_loc is not None and r_loc.requires_grad:
        loc = STASH["alpha"] * r_loc
        params = [p for p in self.params if p.requires_grad]
        STASH["grads"] = (params, torch.autograd.grad(loc, params, retain_graph=True, allow_unused=True))
        total = total - loc
    return total, stop_value, named


class DecoupledAdam(torch.optim.Adam):
    """Adam on the rest of the objective, then ``p -= KAPPA * lr * d(alpha * R_loc)/dp``."""

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        out = super().step(closure)
        params, grads = STASH.pop("grads", ((), ()))
        lr = self.param_groups[0]["lr"]
        for p, g in zip(params, grads):
            if g is not None:
                p.sub_(KAPPA * lr * g)
        return out


if __name__ == "__main__":
    KAPPA = float(sys.argv[1])
    method_module.ODEditObjective.__call__ = _terms
    method_module.PrimalDualObjective.__call__ = _step
    torch.optim.Adam = DecoupledAdam  # the edit loop builds its optimiser as torch.optim.Adam
    from odedit_hf.cli.main import main

    sys.exit(main(sys.argv[2:]))

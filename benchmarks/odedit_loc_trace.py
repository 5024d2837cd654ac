"""Trace ODEdit's locality KL step by step on chosen single edits, for several weights of ``R_loc``.

Answers "does the ``R_loc`` gradient lower the KL it minimises?" (benchmarks/RESULTS.md, issue 5): for
each case and each ``alpha`` it runs one ODEdit+FT-L single edit and prints, after every step, the
largest KL(pre ‖ post) over the ``loc`` / ``m_loc`` answer rows, then the edit's M-Locality. ``--optimizer sgd``
swaps the primal Adam for plain SGD (learning rate x ``--sgd-scale``) to separate the gradient's
direction from Adam's per-coordinate normalisation::

    OMP_NUM_THREADS=1 python benchmarks/odedit_loc_trace.py --world ~/.cache/odedit_hf/worlds/tiny-seed0-v3 \
        --cases 21 34 --alphas 0 0.1 1 10
    ... --cases 21 --alphas 0 1 10 100 --optimizer sgd --sgd-scale 1
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", help="world folder from `odedit-hf world` (default: the cached tiny world)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--n", type=int, default=100, help="requests loaded (the cases are picked among them)")
    p.add_argument("--cases", type=int, nargs="+", required=True, help="case ids to edit")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.1, 1.0, 10.0], help="0 = R_loc off")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--sgd-scale", type=float, default=1.0, help="--optimizer sgd: lr = editor lr x this")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    import torch

    import odedit_hf.methods.odedit.objective as objective_module
    from odedit import _method, _world  # benchmarks/odedit.py
    from odedit_hf.evaluation import run_protocol
    from odedit_kernels.kl import kl_with_omega_reference

    if args.optimizer == "sgd":

        class _SGDAsAdam(torch.optim.SGD):
            def __init__(self, params: Any, lr: float = 1e-3, weight_decay: float = 0.0, **_: Any) -> None:
                super().__init__(params, lr=lr * args.sgd_scale, weight_decay=weight_decay)

        # only ODEdit's primal optimiser is an Adam in this run (its dual is SGD, the editor's own loop unused)
        torch.optim.Adam = _SGDAsAdam
    trace: list[list[float]] = []
    original = objective_module.locality_risk

    def traced(pre: torch.Tensor, post: torch.Tensor, *, backend: str = "auto") -> Any:
        out = original(pre, post, backend=backend)
        with torch.no_grad():
            rows = kl_with_omega_reference(pre.float(), post.float())[0]
        trace.append([float(x) for x in rows])
        return out

    objective_module.locality_risk = traced
    make_backbone, requests = _world(args)
    chosen = [r for r in requests[: args.n] if r.case_id in set(args.cases)]
    if len(chosen) != len(set(args.cases)):
        raise SystemExit(
            f"cases {args.cases}: only {[r.case_id for r in chosen]} are among the first {args.n}"
        )
    print(
        f"primal optimiser: {args.optimizer}"
        + (f" (lr x {args.sgd_scale})" if args.optimizer == "sgd" else "")
    )
    print(
        "| case | alpha | largest KL(pre‖post) over the loc/m_loc answer rows, step by step | M-Loc | steps |"
    )
    print("|---|---|---|---|---|")
    for request in chosen:
        for alpha in args.alphas:
            trace.clear()
            objective = {"loc_risk": False} if alpha == 0 else {"alpha": alpha}
            torch.manual_seed(0)
            run = run_protocol(
                "single", _method("odedit+ft", {}, objective), make_backbone(), [request], seed=0
            )
            result = run.results[0]
            kls = " → ".join(f"{max(step):.4f}" for step in trace)
            print(
                f"| {request.case_id} | {alpha:g} | {kls} | {result.post.m_locality:.2f} | {result.steps} |"
            )


if __name__ == "__main__":
    main()

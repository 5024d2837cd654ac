"""Trace ODEdit's IRM-TV primal–dual game step by step: ω-derivatives, penalty, λ, risks, and who pulls where.

Each edit runs through a copy of ``ODEditMethod._edit`` (same objective, same Adam primal step, same SGD dual
step, same early stop on ``R_rel``) that records, at every step and *before* the step is taken:

- the risks ``r_rel`` / ``r_loc`` / ``r_gen``, the environments' ω-derivatives ``g_in`` / ``g_nb`` / ``g_ood``,
  ``S = Σ_e |g_e|``, the penalty ``P = S²``, ``λ``, and ``p_tgt`` (the edit prompt's target probability,
  geometric mean over target tokens);
- with ``--decompose`` (default on), the pull of every term of the loss on ``R_rel``: the projection of the
  term's gradient w.r.t. the edit parameters onto ``∇R_rel``, in units of ``|∇R_rel|²``
  (``<∇term, ∇R_rel> / |∇R_rel|²``: ``R_rel`` itself is 1; a negative value means that descending the term
  *raises* ``R_rel`` to first order). The penalty is split per environment:
  ``∇(λP) = 2λS Σ_e sign(g_e) ∇g_e`` (λ held fixed) plus ``P ∇λ`` (the λ-network's own path to θ).
  ``tot`` is the sum (the full primal gradient); ``zy_*`` is the same split for the pull on the target
  logits of the edit prompt (mean over target tokens of ``-∂term/∂z_y``: positive raises the target).

The edit runs under the config's own schedule (``ODEditConfig.schedule``, e.g. ``--objective
'{"schedule": "warmup"}'``); ``--schedule '{"warmup_steps": 5, "penalty_steps": 10}'`` gives
:class:`odedit_hf.methods.odedit.schedule.EditSchedule` arguments directly instead. As in ODEditMethod, the
stop test of a step runs before its penalty weight is read (the step whose forward first shows the edit in
is already a primal–dual step).

Usage (world folder from ``odedit-hf world``; without ``--world`` the cached tiny world)::

    OMP_NUM_THREADS=1 python benchmarks/odedit_irm_trace.py --world ~/.cache/odedit_hf/worlds/tiny-seed0-v3 \
        --editors ft lora --lambda-inits 0.001 0.01 0.1 --protocol single --n 20 --json trace_single.json
    ... --protocol sequential --n 50 --editors ft --json trace_seq.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ENV_SHORT = {"in_distribution": "in", "neighbours": "nb", "ood": "ood"}
PULLS = ("rel", "loc", "gen", "pen_in", "pen_nb", "pen_ood", "lam_path", "tot")


def _flat_dot(a: Sequence[Any], b: Sequence[Any]) -> float:
    return float(sum((x * y).sum() for x, y in zip(a, b) if x is not None and y is not None))


_TRACED: list[type] = []


def _traced_method_class() -> type:
    """The traced ODEditMethod subclass (built once: it patches the objective's ``reliability_risk_rows``)."""
    if _TRACED:
        return _TRACED[0]
    import torch

    import odedit_hf.methods.odedit.objective as objective_module
    from odedit_hf.methods.odedit.method import ODEditDivergedError, ODEditMethod
    from odedit_hf.methods.odedit.objective import ODEditObjective, build_lambda_network, dual_step

    captured: list[tuple[Any, Any]] = []
    original_rows = objective_module.reliability_risk_rows

    def capture(rows: Any, targets: Any, *, backend: str = "auto") -> Any:
        captured.append((rows, targets))
        return original_rows(rows, targets, backend=backend)

    objective_module.reliability_risk_rows = capture  # the edit prompt's rows are the first call of a step

    class TracedODEdit(ODEditMethod):
        """ODEditMethod whose per-edit loop records one row per step (a copy of ``ODEditMethod._edit``)."""

        rows: list[dict[str, Any]]
        decompose: bool = True
        schedule_kwargs: dict[str, Any] | None = None
        edit_index: int = 0

        def edit(self, peft_model, backbone, requests):  # noqa: ANN001, ANN202
            from odedit_hf.editing.editor import model_device
            from odedit_hf.editing.environments import build_edit_batch
            from odedit_hf.methods.odedit.risks import needed_groups

            adapter = peft_model.active_adapter
            config = peft_model.peft_config[adapter]
            device = model_device(peft_model)
            edit_batch = build_edit_batch(
                backbone, requests, needed_groups(config), num_rephrases=config.num_rephrases, device=device
            )
            self.before_edit(peft_model, backbone, requests)
            with backbone.frozen_vision_cache():
                stats = self._edit(peft_model, backbone, edit_batch, config, adapter, device)
            self.after_edit(peft_model, backbone, requests, stats)
            return stats

        def _edit(self, peft_model, backbone, edit_batch, config, adapter, device):  # noqa: ANN001, ANN202
            from odedit_hf.editing import EditStats

            loop = self.loop
            objective = ODEditObjective(config, backbone)
            forward = backbone.forward
            first_is_pre_edit = self.adapter_is_identity(peft_model)
            if not first_is_pre_edit:
                with peft_model.disable_adapter():
                    objective.prepare(forward, edit_batch)
            params = self.edit_parameters(peft_model)
            lambda_net, dual_optimizer = build_lambda_network(config, params, device=device)
            snapshot = self.snapshot(peft_model, adapter)
            optimizer = torch.optim.Adam(params, lr=loop.lr, weight_decay=loop.weight_decay)
            from odedit_hf.editing.editor import apply_constraints

            def post_step(
                step: int,
            ) -> None:  # the adapter layers' constraints, as the shared loop applies them
                apply_constraints(peft_model)

            from odedit_hf.methods.odedit.method import edit_schedule
            from odedit_hf.methods.odedit.schedule import EditSchedule

            if self.schedule_kwargs is not None:
                schedule = EditSchedule(**{"stop_rel": loop.stop_loss, **self.schedule_kwargs})
            else:  # the config's own schedule (ODEditConfig.schedule), as ODEditMethod runs it
                schedule = edit_schedule(config, loop)
            budget = schedule.total_steps
            losses: list[float] = []
            stopped_early = False
            steps = 0
            case_id = edit_batch.case_ids[0]
            try:
                for step in range(budget + 1):
                    captured.clear()
                    lam = lambda_net(params) if config.irm_penalty else None
                    terms = objective(forward, edit_batch, lam, pre_edit=first_is_pre_edit and step == 0)
                    r_rel = float(terms.r_rel.detach())
                    penalty = float(terms.penalty.detach()) if terms.penalty is not None else None
                    # the stop test first (it ends the warm-up), then the step's penalty weight, as
                    # PrimalDualObjective does
                    stop = schedule.should_stop(step, r_rel, penalty)
                    weight = schedule.penalty_weight(step)
                    loss = terms.total if weight else terms.risk
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise ODEditDivergedError(f"loss {value} at step {step}: {terms.as_floats()}")
                    losses.append(value)
                    row = self._row(terms, config, params, captured[0] if captured else None, lam, weight)
                    row.update(case_id=case_id, edit=self.edit_index, step=step)
                    self.rows.append(row)
                    if hasattr(lambda_net, "clear_dual_record"):
                        lambda_net.clear_dual_record(
                            keep_input=True
                        )  # the split's autograd passes went through λ too
                    if stop:
                        stopped_early = schedule.stopped_by_rule
                        break
                    if step == budget:
                        break
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if loop.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, loop.max_grad_norm)
                    optimizer.step()
                    dual_step(
                        lambda_net,
                        dual_optimizer,
                        skip=not schedule.dual_active(step),
                    )
                    steps += 1
                    if post_step is not None:
                        post_step(step)
            except BaseException:
                snapshot.restore()
                raise
            finally:
                optimizer.zero_grad(set_to_none=True)
            self.edit_index += 1
            return EditStats(steps=steps, final_loss=losses[-1], losses=losses, stopped_early=stopped_early)

        def _row(self, terms, config, params, edit_rows, lam, weight) -> dict[str, Any]:  # noqa: ANN001
            f = terms.as_floats()
            g = {ENV_SHORT[e]: float(v.detach()) for e, v in terms.omega_grads.items()}
            envs = [e for e in config.irm_environments if e in terms.omega_grads]
            s = sum(abs(float(terms.omega_grads[e].detach())) for e in envs)
            row: dict[str, Any] = {
                "r_rel": f["r_rel"],
                "p_tgt": math.exp(-f["r_rel"]),
                "r_loc": f.get("r_loc"),
                "r_gen": f.get("r_gen"),
                "g_in": g.get("in"),
                "g_nb": g.get("nb"),
                "g_ood": g.get("ood"),
                "S": s,
                "P": f.get("penalty"),
                "lambda": float(lam.detach()) if lam is not None else None,
                "weight": weight,
                "loss": f["loss"] if weight else float(terms.risk.detach()),
            }
            if not self.decompose:
                return row
            # each term of the loss, its gradient w.r.t. θ and the edit prompt's target-logit rows
            parts: dict[str, Any] = {"rel": terms.r_rel}
            if terms.r_loc is not None:
                parts["loc"] = config.alpha * terms.r_loc
            if terms.r_gen is not None:
                parts["gen"] = config.beta * terms.r_gen
            if terms.penalty is not None and lam is not None:
                lam_d = lam.detach() * weight
                for e in envs:
                    parts[f"pen_{ENV_SHORT[e]}"] = 2.0 * lam_d * s * terms.omega_grads[e].abs()
                if lam.requires_grad:
                    parts["lam_path"] = terms.penalty.detach() * lam * weight
            inputs = list(params) + ([edit_rows[0]] if edit_rows is not None else [])
            grads = {}
            for name, value in parts.items():
                if not value.requires_grad:
                    grads[name] = [None] * len(inputs)
                    continue
                grads[name] = torch.autograd.grad(value, inputs, retain_graph=True, allow_unused=True)
            n = len(params)
            ref = grads["rel"][:n]
            ref_sq = _flat_dot(ref, ref) or float("nan")
            total = 0.0
            for name in parts:
                pull = _flat_dot(grads[name][:n], ref) / ref_sq
                row[f"pull_{name}"] = pull
                total += pull
            row["pull_tot"] = total
            row["grad_rel_norm"] = math.sqrt(ref_sq)
            if edit_rows is not None:
                rows_t, targets = edit_rows
                idx = targets.long().unsqueeze(-1)
                tot = 0.0
                for name in parts:
                    gz = grads[name][n]
                    if gz is None:
                        row[f"zy_{name}"] = 0.0
                        continue
                    val = -float(gz.gather(-1, idx).mean()) * len(targets)  # per target token
                    row[f"zy_{name}"] = val
                    tot += val
                row["zy_tot"] = tot
            return row

    _TRACED.append(TracedODEdit)
    return TracedODEdit


def _edit_summaries(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_edit: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_edit.setdefault(r["edit"], []).append(r)
    out = []
    for edit, steps in sorted(by_edit.items()):
        out.append(
            {
                "edit": edit,
                "case_id": steps[0]["case_id"],
                "steps": len(steps) - 1,
                "r_rel_first": steps[0]["r_rel"],
                "r_rel_last": steps[-1]["r_rel"],
                "lambda_first": steps[0]["lambda"],
                "lambda_last": steps[-1]["lambda"],
                "P_max": max((s["P"] or 0.0) for s in steps),
            }
        )
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
            return f"{v:.2e}"
        return f"{v:.4g}"
    return str(v)


def _step_table(rows: list[dict[str, Any]], decompose: bool) -> str:
    cols = ["step", "r_rel", "p_tgt", "g_in", "g_nb", "g_ood", "P", "lambda", "r_loc", "r_gen"]
    if decompose:
        cols += [f"pull_{p}" for p in PULLS] + ["zy_rel", "zy_pen_in", "zy_tot"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def _run(
    args: argparse.Namespace, editor: str, lambda_init: float, make_backbone: Any, requests: list
) -> Any:
    import torch

    from odedit import _method  # benchmarks/odedit.py
    from odedit_hf.evaluation import run_protocol
    from odedit_hf.evaluation.results import aggregate

    objective = {"lambda_init": lambda_init, **args.objective}
    base = _method(f"odedit+{editor}", args.editor_args, objective)
    cls = _traced_method_class()
    method = cls(editor=base.editor, objective=base.objective)
    method.rows = []
    method.decompose = args.decompose
    method.schedule_kwargs = args.schedule
    torch.manual_seed(args.seed)
    run = run_protocol(args.protocol, method, make_backbone(), requests, seed=args.seed)
    which = "final" if args.protocol == "sequential" else "post"
    scores = aggregate(run.results, which)
    return method.rows, scores, run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", help="world folder from `odedit-hf world` (default: the cached tiny world)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--n", type=int, default=20, help="first n E-VQA eval records")
    p.add_argument("--protocol", choices=("single", "sequential"), default="single")
    p.add_argument("--editors", nargs="+", default=["ft", "lora"])
    p.add_argument("--lambda-inits", type=float, nargs="+", default=[0.001, 0.01, 0.1])
    p.add_argument("--objective", type=json.loads, default={}, help="extra ODEdit hyperparameters (JSON)")
    p.add_argument("--editor-args", type=json.loads, default={}, help="editor hyperparameters (JSON)")
    p.add_argument("--schedule", type=json.loads, default=None, help="EditSchedule kwargs (JSON)")
    p.add_argument("--no-decompose", dest="decompose", action="store_false", help="skip the gradient split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--show", type=int, default=2, help="per-step tables for the N longest edits of a run")
    p.add_argument("--stall-steps", type=int, default=8, help="an edit with at least this many steps stalled")
    p.add_argument("--stall-from", type=int, default=3, help="stalled edits: average from this step on")
    p.add_argument("--json", help="write every per-step row and the summaries here (atomic)")
    args = p.parse_args()

    import torch

    from odedit import _header, _world  # benchmarks/odedit.py

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    make_backbone, requests = _world(args)
    requests = requests[: args.n]
    print(f"# {_header()}")
    print(
        f"# protocol {args.protocol}, n {len(requests)}, seed {args.seed}, objective {args.objective}, "
        f"schedule {args.schedule}"
    )
    out: dict[str, Any] = {"header": _header(), "args": {k: v for k, v in vars(args).items()}, "runs": []}
    summary_lines = [
        "| editor | λ_init | rel | M-Gen | M-Loc | steps/edit | max steps | edits at budget | "
        "λ first→last (median) | P max (median) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for editor in args.editors:
        for lambda_init in args.lambda_inits:
            rows, scores, run = _run(args, editor, lambda_init, make_backbone, requests)
            edits = _edit_summaries(rows)
            budget = max(e["steps"] for e in edits)
            at_budget = sum(1 for stopped in run.stopped_early if not stopped)
            lam_first = statistics.median(e["lambda_first"] or 0.0 for e in edits)
            lam_last = statistics.median(e["lambda_last"] or 0.0 for e in edits)
            p_max = statistics.median(e["P_max"] for e in edits)
            mean_steps = statistics.mean(r.steps for r in run.results)
            summary_lines.append(
                f"| {editor} | {lambda_init:g} | {scores['reliability']:.3f} | {scores['m_generality']:.3f} | "
                f"{scores['m_locality']:.3f} | {mean_steps:.1f} | {budget} | {at_budget} | "
                f"{_fmt(lam_first)} → {_fmt(lam_last)} | {_fmt(p_max)} |"
            )
            print(f"\n## {editor}, λ_init {lambda_init:g}: {len(edits)} edits, {mean_steps:.1f} steps/edit")
            for e in sorted(edits, key=lambda e: -e["steps"])[: args.show]:
                print(f"\nedit {e['edit']} (case {e['case_id']}), {e['steps']} steps:\n")
                print(_step_table([r for r in rows if r["edit"] == e["edit"]], args.decompose))
            sys.stdout.flush()
            out["runs"].append(
                {
                    "editor": editor,
                    "lambda_init": lambda_init,
                    "scores": scores,
                    "edits": edits,
                    "stopped_early": run.stopped_early,
                    "rows": rows,
                }
            )
    print("\n" + "\n".join(summary_lines))
    if args.decompose:
        print(
            f"\nMean pulls on R_rel (units |∇R_rel|²) over the steps >= {args.stall_from} of the edits that took "
            f">= {args.stall_steps} steps (the stalled ones), and over every step of the others:\n"
        )
        cols = ["g_in", "g_nb", "g_ood", "P", "lambda", "r_rel"] + [f"pull_{p}" for p in PULLS]
        print("| editor | λ_init | edits | steps | " + " | ".join(cols) + " |")
        print("|---|---|---|---|" + "---|" * len(cols))
        for run in out["runs"]:
            long_edits = {e["edit"] for e in run["edits"] if e["steps"] >= args.stall_steps}
            for label, chosen in (
                (
                    "stalled",
                    [r for r in run["rows"] if r["edit"] in long_edits and r["step"] >= args.stall_from],
                ),
                ("others", [r for r in run["rows"] if r["edit"] not in long_edits]),
            ):
                if not chosen:
                    continue
                n_edits = len({r["edit"] for r in chosen})
                means = [statistics.mean(r.get(c) or 0.0 for r in chosen) for c in cols]
                print(
                    f"| {run['editor']} | {run['lambda_init']:g} {label} | {n_edits} | {len(chosen)} | "
                    + " | ".join(_fmt(m) for m in means)
                    + " |"
                )
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(out, fh)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()

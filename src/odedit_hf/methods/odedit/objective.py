"""The ODEdit objective of one step, shared by the per-edit loop and the Trainer.

``loss = R_rel + alpha·R_loc + beta·R_gen + λ·P`` with ``P = (Σ_e |dR_e/dω|)²`` over the three
environments. The primal step descends on ``loss`` over the edit parameters; the dual step ascends on
it over the λ-network's parameters (:func:`dual_step`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from odedit_hf.editing.environments import EditBatch, ForwardFn, run_groups

from .penalty import irm_tv_penalty
from .risks import (
    ENVIRONMENTS,
    PreEditState,
    gen_pairs,
    generality_risk,
    locality_risk,
    locality_rows,
    median_bandwidths,
    reliability_risk_rows,
)

if TYPE_CHECKING:
    from odedit_hf.backbones import Backbone

    from .config import ODEditConfig
    from .lambda_net import LambdaNetwork

logger = logging.getLogger(__name__)

__all__ = ["LossTerms", "ODEditObjective", "dual_step"]


@dataclass
class LossTerms:
    """The terms of one step (tensors, still attached to the graph); ``risk`` is ``total`` without ``λ·P``."""

    total: torch.Tensor
    r_rel: torch.Tensor
    risk: torch.Tensor | None = None
    r_loc: torch.Tensor | None = None
    r_gen: torch.Tensor | None = None
    penalty: torch.Tensor | None = None
    lam: torch.Tensor | None = None
    omega_grads: dict[str, torch.Tensor] = field(default_factory=dict)

    def as_floats(self) -> dict[str, float]:
        """Detached values, for logs: ``loss``, ``r_rel``, ``r_loc``, ``r_gen``, ``penalty``, ``lambda``, ``g_<env>``."""
        out = {"loss": float(self.total.detach()), "r_rel": float(self.r_rel.detach())}
        for name, value in (
            ("r_loc", self.r_loc),
            ("r_gen", self.r_gen),
            ("penalty", self.penalty),
            ("lambda", self.lam),
        ):
            if value is not None:
                out[name] = float(value.detach())
        for env, g in self.omega_grads.items():
            out[f"g_{env}"] = float(g.detach())
        return out


class ODEditObjective:
    """Computes :class:`LossTerms` for an :class:`~odedit_hf.editing.environments.EditBatch`.

    Args:
        config: the ODEdit config (risk switches, weights, positions, bandwidths, backend).
        backbone: the model's backbone (hidden-state extraction, image-token mask).
    """

    def __init__(self, config: ODEditConfig, backbone: Backbone) -> None:
        self.config = config
        self.backbone = backbone
        self.pre = PreEditState()

    # ------------------------------------------------------------------ pre-edit pass
    def _hidden_groups(self) -> tuple[str, ...]:
        return ("edit", *self.config.rephrase_kinds) if self.config.gen_risk else ()

    def _loc_groups(self) -> tuple[str, ...]:
        if not (self.config.loc_risk or self.config.irm_penalty):
            return ()
        return ("loc", "m_loc", "hard_loc", "hard_m_loc") if self.config.hard_negatives else ("loc", "m_loc")

    def _missing(self, edit_batch: EditBatch) -> bool:
        cfg = self.config
        for g in self._loc_groups():
            if any(
                (g, edit_batch.case_ids[o]) not in self.pre.loc_rows for o in edit_batch.owners.get(g, ())
            ):
                return True
        for cid in edit_batch.case_ids:
            if cfg.gen_risk and cfg.mmd_bandwidths is None and cid not in self.pre.bandwidths:
                return True
        return False

    @torch.no_grad()
    def prepare(self, forward: ForwardFn, edit_batch: EditBatch) -> None:
        """Record the pre-edit logits rows of ``loc``/``m_loc`` and the MMD bandwidths of each request.

        Call with the adapter disabled (``with peft_model.disable_adapter():``). Requests already
        recorded (by ``case_id``) are kept: the pre-edit state is computed once per edit.
        """
        if not self._missing(edit_batch):
            return
        self._record(
            run_groups(forward, self.backbone, edit_batch, hidden_groups=self._hidden_groups()), edit_batch
        )

    @torch.no_grad()
    def _record(self, outputs: dict[str, Any], edit_batch: EditBatch) -> None:
        """Store the pre-edit state of ``edit_batch`` from outputs of the pre-edit model."""
        cfg = self.config
        for g in self._loc_groups():
            if g not in outputs:
                continue  # no request of the batch has this group (text-only requests have no m_loc)
            group = outputs[g]
            if cfg.loc_positions == "answer":
                per_row = group.answer_logits_per_row()
            else:
                per_row = [
                    locality_rows(
                        group.logits[row : row + 1],
                        group.labels[row : row + 1],
                        group.attention_mask[row : row + 1],
                        None if group.image_mask is None else group.image_mask[row : row + 1],
                        cfg.loc_positions,
                    )
                    for row in range(len(edit_batch.owners[g]))
                ]
            for rows, owner in zip(per_row, edit_batch.owners[g]):
                self.pre.loc_rows[(g, edit_batch.case_ids[owner])] = rows.detach().float()
        if cfg.gen_risk and cfg.mmd_bandwidths is None:
            _, per_request = gen_pairs(outputs, edit_batch, cfg, None)
            for owner, samples in per_request.items():
                self.pre.bandwidths[edit_batch.case_ids[owner]] = median_bandwidths(
                    samples, cfg.mmd_bandwidth_multipliers
                )

    def reset(self) -> None:
        """Forget the pre-edit state (a new edit starts)."""
        self.pre = PreEditState()

    # ------------------------------------------------------------------ one step
    def __call__(
        self,
        forward: ForwardFn,
        edit_batch: EditBatch,
        lam: torch.Tensor | None = None,
        *,
        pre_edit: bool = False,
    ) -> LossTerms:
        """The loss of one step on the current (edited) model.

        Args:
            forward: ``forward(batch, **kwargs) -> model outputs`` (the adapter enabled).
            edit_batch: the step's prompts.
            lam: λ from the λ-network (ignored when ``irm_penalty`` is off).
            pre_edit: the model *is* the pre-edit model (its adapter is still the identity, e.g. FT-L's zero
                delta or LoRA's zero ``B`` before the first step): the pre-edit state missing for these
                requests is recorded from this very forward pass, which saves :meth:`prepare`'s pass.

        Raises:
            ValueError: no pre-edit state for these requests (call :meth:`prepare`, or pass ``pre_edit``).
        """
        cfg = self.config
        backend = cfg.kernel_backend
        missing = self._missing(edit_batch)
        if missing and not pre_edit:
            raise ValueError(
                "ODEditObjective: no pre-edit state for these requests; call prepare() with the adapter disabled first"
            )
        outputs = run_groups(forward, self.backbone, edit_batch, hidden_groups=self._hidden_groups())
        if missing:
            self._record(outputs, edit_batch)
        edit = outputs["edit"]
        r_rel, g_in = reliability_risk_rows(edit.answer_logits, edit.answer_targets, backend=backend)
        total = r_rel
        terms = LossTerms(total=r_rel, r_rel=r_rel)
        omega: dict[str, torch.Tensor] = {"in_distribution": g_in}

        if self._loc_groups():
            pre_rows, post_rows = [], []
            for g in (g for g in self._loc_groups() if g in outputs):
                group = outputs[g]
                pre_rows += [self.pre.loc_rows[(g, edit_batch.case_ids[o])] for o in edit_batch.owners[g]]
                if cfg.loc_positions == "answer":
                    post_rows.append(group.answer_logits)
                else:
                    post_rows.append(
                        locality_rows(
                            group.logits,
                            group.labels,
                            group.attention_mask,
                            group.image_mask,
                            cfg.loc_positions,
                        )
                    )
            post = torch.cat(post_rows)
            pre = torch.cat(pre_rows).to(device=post.device, dtype=post.dtype)
            r_loc, g_ood = locality_risk(pre, post, backend=backend)
            omega["ood"] = g_ood
            if cfg.loc_risk:
                terms.r_loc = r_loc
                total = total + cfg.alpha * r_loc

        if cfg.gen_risk:
            bandwidths = {i: self.pre.bandwidths.get(cid) for i, cid in enumerate(edit_batch.case_ids)}
            pairs, _ = gen_pairs(outputs, edit_batch, cfg, bandwidths)
            if pairs:  # none when only image rephrases are asked for and the batch is text-only
                terms.r_gen = generality_risk(pairs, backend=backend)
                total = total + cfg.beta * terms.r_gen

        if cfg.irm_penalty:
            neighbour = [outputs[k] for k in cfg.rephrase_kinds if k in outputs]
            if neighbour:
                # one environment: the mean ω-derivative over every target token of every rephrase kind
                rows = torch.cat([n.answer_logits for n in neighbour])
                targets = torch.cat([n.answer_targets for n in neighbour])
                omega["neighbours"] = reliability_risk_rows(rows, targets, backend=backend)[1]
            terms.penalty = irm_tv_penalty(
                {e: omega[e] for e in ENVIRONMENTS if e in omega and e in cfg.irm_environments}
            )
            if lam is None:
                raise ValueError("ODEditObjective: irm_penalty is on but no lambda was given")
            terms.lam = lam
            terms.risk = total
            total = total + lam * terms.penalty
        terms.omega_grads = omega
        terms.total = total
        if terms.risk is None:
            terms.risk = total
        return terms


def dual_step(
    lambda_net: LambdaNetwork,
    optimizer: torch.optim.Optimizer | None,
    *,
    reduce: Any | None = None,
    penalty: float | torch.Tensor | None = None,
    loss_scale: float = 1.0,
    skip: bool = False,
) -> bool:
    """Gradient *ascent* on the λ-network's dual objective ``ψ · (P − ε)``, then clear its gradients.

    ``P`` is the ``∂loss/∂λ`` the λ-network recorded during the primal backward(s) since the last dual step
    (``P`` itself for ``loss = R + λ·P``), divided by ``loss_scale``; see
    :meth:`~odedit_hf.methods.odedit.lambda_net.LambdaNetwork.dual_backward` for ψ and ε (``dual_slack``).

    Args:
        lambda_net: the λ-network (its last forward fed the primal loss).
        optimizer: its optimiser, built with ``maximize=True`` (SGD: gradient ascent) (``None`` in ``fixed``
            mode: nothing to do).
        reduce: optional ``reduce(tensor) -> tensor`` averaging gradients across processes (multi-GPU). Every
            process then steps, with zero gradients where it had nothing to ascend on, so that the collective
            calls match.
        penalty: ``P`` to use instead of the recorded signal.
        loss_scale: the factor the primal loss was multiplied by before its backward (a mixed-precision
            ``GradScaler``'s scale): the recorded signal is divided by it.
        skip: do not step (the primal step was skipped, e.g. for inf/NaN gradients under a loss scaler): the
            record and the gradients are dropped.

    Returns:
        Whether the optimiser stepped.
    """
    if optimizer is None or lambda_net.net is None:
        return False
    if skip:
        lambda_net.clear_dual_record()
        optimizer.zero_grad(set_to_none=True)
        return False
    used = lambda_net.dual_backward(penalty=penalty, loss_scale=loss_scale)
    if reduce is not None:
        for p in lambda_net.parameters():
            p.grad = reduce(torch.zeros_like(p) if p.grad is None else p.grad)
    elif used is None:
        optimizer.zero_grad(set_to_none=True)
        return False
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return True


def build_lambda_network(
    config: ODEditConfig,
    edit_params: Sequence[torch.Tensor],
    device: torch.device | str | None = None,
    *,
    init_seed: int | None = None,
) -> tuple[LambdaNetwork, torch.optim.Optimizer | None]:
    """The λ-network for ``edit_params`` under ``config`` and its dual (ascent) optimiser.

    ``init_seed`` seeds its initial weights; ``None`` draws one from torch's global generator (which the
    protocols seed per run), so runs with different seeds start the dual from different networks while
    the sketch projection stays the one ``config.sketch_seed`` fixes. Several processes that must hold the
    same network (multi-GPU) pass a seed they share.
    """
    from .lambda_net import LambdaNetwork

    if init_seed is None:
        init_seed = int(torch.randint(0, 2**31 - 1, (1,)).item())

    n = sum(p.numel() for p in edit_params)
    net = LambdaNetwork(
        config.lambda_mode if config.irm_penalty else "fixed",
        n,
        hidden_size=config.lambda_hidden_size,
        sketch_dim=config.sketch_dim,
        seed=config.sketch_seed,
        lambda_init=config.lambda_init,
        lambda_max=config.lambda_max,
        lambda_min=config.lambda_min,
        init_seed=init_seed,
        lambda_param=config.lambda_param,
        dual_slack=config.dual_slack,
        device=device,
    )
    if net.net is None:
        return net, None
    # plain gradient ascent: the step is proportional to P - epsilon (an Adam step would move lambda at a
    # constant pace whatever P is, 1 -> 1e3 in 30 steps on the tiny world)
    return net, torch.optim.SGD(net.parameters(), lr=config.lambda_lr, maximize=True)

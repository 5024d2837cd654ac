"""``ASAMMethod``: ASAM as a wrapper method (``--method asam+EDITOR`` for the intrinsic editors ftl, lora,
tpatcher), with its objective stepped by the shared edit loop.

Per edit (:meth:`ASAMMethod.edit`): the editor's ``before_edit``; the knowledge unit's prompts
(:func:`~odedit_hf.editing.environments.build_edit_batch`: the edit prompt, ``num_rephrases`` text and
image rephrases, the locality prompts) and ``n_variants`` copies of the edit prompt for LAR; one pass with
the adapter disabled for the pre-edit locality logits and the LAR radii; then
:func:`~odedit_hf.editing.run_edit_loop` on :class:`ASAMObjective` with the editor's loop (steps, lr, early
stop on the clean edit prompt's NLL, so that ASAM+X and X stop at the same reliability).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from odedit_hf.editing.editor import Editor, model_device
from odedit_hf.editing.environments import build_edit_batch, run_groups
from odedit_hf.editing.loop import run_edit_loop
from odedit_hf.editing.loss import model_inputs, nll_from_logits
from odedit_hf.editing.samples import edit_samples
from odedit_hf.editing.wrapper import Wrapper
from odedit_hf.methods.odedit.risks import locality_risk, locality_rows, reliability_risk_rows

from .config import ASAMConfig
from .subspace import (
    captured_output,
    lar_perturbations,
    lar_radius,
    last_prompt_positions,
    perturbed_input,
    rcsl_penalty,
    unit_matrix,
)

if TYPE_CHECKING:
    from peft import PeftModel

    from odedit_hf.backbones import Backbone
    from odedit_hf.data import EditRequest
    from odedit_hf.editing import EditStats
    from odedit_hf.editing.environments import EditBatch, GroupOutput

logger = logging.getLogger(__name__)

__all__ = ["SUPPORTED_EDITORS", "ASAMMethod", "ASAMObjective", "edit_layers"]

#: The editors ASAM wraps: intrinsic editors whose edit is a trained weight change at the edit layer.
SUPPORTED_EDITORS: tuple[str, ...] = ("ftl", "lora", "tpatcher")
_UNIT_GROUPS = ("rephrase", "image_rephrase")
_LOC_GROUPS = ("loc", "m_loc")


def edit_layers(backbone: Backbone) -> tuple[int, int]:
    """``(lowest, highest)`` decoder-layer index holding the adapter's layers: LAR perturbs the input of
    the lowest, RCSL reads the output of the highest.

    Raises:
        ValueError: no adapter layer inside the decoder layers.
    """
    found = [
        i
        for i, layer in enumerate(backbone.decoder_layers())
        if any(isinstance(m, BaseTunerLayer) for m in layer.modules())
    ]
    if not found:
        raise ValueError(
            "ASAM: the wrapped editor created no adapter layer inside the decoder layers; ASAM perturbs and "
            "reads the edit layer's hidden states, so the editor must edit decoder-layer modules"
        )
    return min(found), max(found)


def _loc_rows(outputs: dict[str, GroupOutput], mode: str) -> torch.Tensor:
    rows = []
    for g in _LOC_GROUPS:
        if g not in outputs:  # a batch of text-only requests may have no ``m_loc`` group
            continue
        group = outputs[g]
        if mode == "answer":
            rows.append(group.answer_logits)
        else:
            rows.append(
                locality_rows(group.logits, group.labels, group.attention_mask, group.image_mask, mode)
            )
    return torch.cat(rows)


class ASAMObjective:
    """One ASAM step for :func:`run_edit_loop`: ``(total, clean edit NLL, named terms)``.

    ``total = NLL(edit) + variant_weight·NLL(variants) + rcsl_weight·mean_unit RCSL + loc_weight·KL +
    the editor's extra_loss``. Per step: one forward over the unit's prompts (the representation layer's
    output recorded), LAR's PGD passes on the edit prompt's copies, one forward of the variants (their
    perturbations fixed, gradient to the edit parameters).

    Attributes:
        last_terms: the detached terms of the last step.
        last_units: the RCSL matrices of the last step, one per request (rows: anchor, rephrases,
            variants), attached to the graph; the anchor row is a constant under asymmetric flow.
        last_anchors: the clean edit prompts' representations of the last step as the model computed them
            (before the asymmetric detach), one per request.
        trace: per-edit means of the terms over the steps taken (``steps``, ``nll``, ``variant_nll``,
            ``rcsl``, ``loc``).
    """

    def __init__(
        self,
        config: ASAMConfig,
        editor: Editor,
        peft_model: PeftModel,
        backbone: Backbone,
        edit_batch: EditBatch,
        *,
        enter_layer: int,
        rep_layer: int,
        pre_loc: torch.Tensor | None = None,
        variant_batch: dict[str, torch.Tensor] | None = None,
        variant_owners: Sequence[int] = (),
        radius: torch.Tensor | None = None,
    ) -> None:
        self.config = config
        self.editor = editor
        self.peft_model = peft_model
        self.backbone = backbone
        self.edit_batch = edit_batch
        layers = backbone.decoder_layers()
        #: (edit layer, representation layer) indices
        self.layers = (enter_layer, rep_layer)
        self.enter = layers[enter_layer]
        self.rep = layers[rep_layer]
        self.hidden_size = int(backbone.base_model.config.get_text_config().hidden_size)
        self.pre_loc = pre_loc
        self.variant_batch = variant_batch
        self.variant_owners = list(variant_owners)
        self.radius = radius
        if config.loc and pre_loc is None:
            raise ValueError("ASAMObjective: the locality term is on but no pre-edit logits were given")
        if config.lar and (variant_batch is None or radius is None):
            raise ValueError("ASAMObjective: LAR is on but no variant batch / radii were given")
        self.last_terms: dict[str, float] = {}
        self.last_units: list[torch.Tensor] = []
        self.last_anchors: list[torch.Tensor] = []
        self._sums: dict[str, float] = {}
        self._steps = 0

    def _reps(
        self, captured: list[torch.Tensor], batches: Sequence[dict[str, torch.Tensor]]
    ) -> list[torch.Tensor]:
        """Per batch, the representation layer's output at each row's last prompt token ``(B, H)``."""
        if len(captured) != len(batches):
            raise ValueError(
                f"ASAM: the representation layer ran {len(captured)} times for {len(batches)} batches; "
                "expected once per forward pass"
            )
        out = []
        for hidden, batch in zip(captured, batches):
            pos = last_prompt_positions(batch["labels"]).to(hidden.device)
            out.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), pos])
        return out

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        cfg = self.config
        forward = self.backbone.forward
        eb = self.edit_batch
        captured: list[torch.Tensor] = []
        with captured_output(self.rep, captured):
            outputs = run_groups(forward, self.backbone, eb)
        reps = self._reps(captured, eb.batches)
        edit = outputs["edit"]
        nll, _ = reliability_risk_rows(edit.answer_logits, edit.answer_targets)
        total = nll
        named: dict[str, Any] = {"nll": nll}

        if cfg.loc:
            post = _loc_rows(outputs, cfg.loc_positions)
            loc, _ = locality_risk(self.pre_loc.to(device=post.device, dtype=post.dtype), post)
            named["loc"] = loc
            total = total + cfg.loc_weight * loc

        variant_reps = None
        if cfg.lar:
            delta = lar_perturbations(
                forward,
                self.enter,
                self.variant_batch,
                self.radius,
                self.hidden_size,
                steps=cfg.pgd_steps,
                step_size=cfg.pgd_step_size,
            )
            vcaptured: list[torch.Tensor] = []
            with perturbed_input(self.enter, delta), captured_output(self.rep, vcaptured):
                vout = forward(model_inputs(self.variant_batch))
            variant_nll = nll_from_logits(vout.logits, self.variant_batch["labels"])
            named["variant_nll"] = variant_nll
            total = total + cfg.variant_weight * variant_nll
            variant_reps = self._reps(vcaptured, [self.variant_batch])[0]

        self.last_units = []
        self.last_anchors = []
        if cfg.rcsl:
            penalties = []
            for owner in range(eb.num_requests):
                anchor = self._group_rows("edit", reps, owner)[0]
                others = [self._group_rows(g, reps, owner) for g in _UNIT_GROUPS if g in eb.slices]
                others = [o for o in others if len(o)]
                if variant_reps is not None:
                    others.append(variant_reps[[i for i, o in enumerate(self.variant_owners) if o == owner]])
                if not others:
                    continue  # a unit of the edit prompt alone has nothing to align
                matrix = unit_matrix(anchor, torch.cat(others), symmetric=cfg.symmetric)
                self.last_anchors.append(anchor)
                self.last_units.append(matrix)
                penalties.append(rcsl_penalty(matrix, cfg.rank, cfg.rcsl_norm))
            if penalties:
                rcsl = torch.stack(penalties).mean()
                named["rcsl"] = rcsl
                total = total + cfg.rcsl_weight * rcsl

        extra = self.editor.extra_loss(self.peft_model)
        for value in extra.values():
            total = total + value
        floats = {k: float(v.detach()) for k, v in named.items()}
        self.last_terms = floats
        if cfg.lar or cfg.rcsl or cfg.loc:
            for k, v in floats.items():
                self._sums[k] = self._sums.get(k, 0.0) + v
            self._steps += 1
        named.update(extra)
        return total, nll, named

    def _group_rows(self, group: str, reps: list[torch.Tensor], owner: int) -> torch.Tensor:
        b, lo, hi = self.edit_batch.slices[group]
        rows = [lo + i for i, o in enumerate(self.edit_batch.owners[group]) if o == owner]
        if not rows and group == "edit":
            raise ValueError(f"ASAM: request {owner} has no edit prompt in the batch")
        return reps[b][rows]  # (0, H) for a request without this group (a text-only one: no image rephrase)

    def after_optimizer_step(self, step: int) -> None:
        """Nothing: ASAM has no dual variables."""

    @property
    def trace(self) -> dict[str, float]:
        """Means of the terms over the forwards of this edit, and how many there were (``forwards``)."""
        out = {k: v / self._steps for k, v in self._sums.items()} if self._steps else {}
        out["forwards"] = self._steps
        return out


class ASAMMethod(Wrapper):
    """ASAM around an intrinsic editor method (``ftl``, ``lora``, ``tpatcher``).

    Args:
        editor: the wrapped editing method (e.g. ``get_method("ftl")``); its loop (step budget, learning
            rate, early stop on the clean edit prompt's NLL) is ASAM's too.
        **options: :class:`ASAMConfig` hyperparameters (``lar``, ``rcsl``, ``symmetric``, ``epsilon``, ...).

    Attributes:
        last_edit_trace: what the last edit's objective saw (:attr:`ASAMObjective.trace`) plus the edit and
            representation layers.

    Raises:
        ValueError: an editor ASAM does not support (the message names the supported ones and why), or an
            unknown or invalid option.
    """

    name: ClassVar[str] = "asam"
    config_class: ClassVar[type[ASAMConfig]] = ASAMConfig
    #: The editors this wrapper accepts (read by the shared wrapper matrix in tests/test_editors.py).
    supported_editors: ClassVar[tuple[str, ...]] = SUPPORTED_EDITORS

    def __init__(self, editor: Editor, **options: Any) -> None:
        self.editor = editor
        allowed = set(ASAMConfig.option_names())
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ValueError(f"ASAMMethod: unknown ASAM hyperparameters {unknown}; known: {sorted(allowed)}")
        self._options = dict(options)
        self._check_editor()
        self.last_edit_trace: dict[str, Any] = {}

    def _check_editor(self) -> None:
        editor = self.editor
        if isinstance(editor, Editor) and editor.kind == "editor" and editor.name not in SUPPORTED_EDITORS:
            raise ValueError(
                f"asam cannot wrap {editor.name!r}: ASAM is a method for intrinsic editors, whose edit is a "
                "weight change trained at the edit layer, where it perturbs the hidden states (LAR) and aligns "
                "the knowledge unit's representations (RCSL). Supported: "
                + ", ".join(f"asam+{n}" for n in SUPPORTED_EDITORS)
                + ". Memory-routing editors (grace, wise) decide per input whether their memory applies, "
                "in-context editors (ike) train nothing, and trained editors (mend) edit through a "
                "hypernetwork; use odedit+EDITOR or ldke+EDITOR with those."
            )
        super()._check_editor()

    def __repr__(self) -> str:
        return f"ASAMMethod(editor={self.editor!r}, options={self._options!r})"

    def options(self) -> dict[str, Any]:
        return {"editor": self.editor, **self._options}

    def config_options(self) -> dict[str, Any]:
        return dict(self._options)

    def _config(self, peft_model: PeftModel) -> ASAMConfig:
        adapter = peft_model.active_adapter
        config = peft_model.peft_config[adapter]
        if not isinstance(config, ASAMConfig):
            raise ValueError(
                f"ASAMMethod: adapter {adapter!r} is a {type(config).__name__}; wrap the model with "
                "get_peft_model(model, method.peft_config(backbone))"
            )
        return config

    def prepare_objective(
        self, peft_model: PeftModel, backbone: Backbone, requests: Sequence[EditRequest]
    ) -> ASAMObjective:
        """The :class:`ASAMObjective` of one edit of ``requests`` (after the editor's ``before_edit``).

        Builds the knowledge unit's prompts and LAR's copies of the edit prompt, and runs one pass with the
        adapter disabled for the pre-edit locality logits and the LAR radii (the edit layer's input does
        not depend on the adapter: no adapter layer lies below it).
        """
        config = self._config(peft_model)
        device = model_device(peft_model)
        groups = ("edit", *(_UNIT_GROUPS if config.rcsl else ()), *(_LOC_GROUPS if config.loc else ()))
        edit_batch = build_edit_batch(
            backbone, requests, groups, num_rephrases=config.num_rephrases, device=device
        )
        enter, rep = edit_layers(backbone)
        variant_batch = None
        owners: list[int] = []
        if config.lar:
            samples = edit_samples(requests)
            flat = [s for s in samples for _ in range(config.n_variants)]
            owners = [i for i in range(len(samples)) for _ in range(config.n_variants)]
            variant_batch = backbone.build_batch(flat, device=device)
        pre_loc = radius = None
        with torch.no_grad(), peft_model.disable_adapter():
            if config.loc:
                pre_loc = _loc_rows(run_groups(backbone.forward, backbone, edit_batch), config.loc_positions)
            if variant_batch is not None:
                radius = lar_radius(
                    backbone.forward, backbone.decoder_layers()[enter], variant_batch, config.epsilon
                )
        return ASAMObjective(
            config,
            self.editor,
            peft_model,
            backbone,
            edit_batch,
            enter_layer=enter,
            rep_layer=rep,
            pre_loc=pre_loc,
            variant_batch=variant_batch,
            variant_owners=owners,
            radius=radius,
        )

    def edit(self, peft_model: PeftModel, backbone: Backbone, requests: Sequence[EditRequest]) -> EditStats:
        """Edit ``requests`` (one optimisation) into the active adapter with ASAM's objective.

        Raises:
            EditDivergedError: the loss became NaN/inf; the adapter is back to its state before this call.
        """
        self._config(peft_model)
        if len(requests) > 1 and not self.editor.supports_batch:
            raise ValueError(
                f"{self.name}: the editor {self.editor.name!r} edits one request at a time (got {len(requests)})"
            )
        snapshot = self.snapshot(peft_model, peft_model.active_adapter)
        self.before_edit(peft_model, backbone, requests)
        with backbone.frozen_vision_cache():
            try:
                objective = self.prepare_objective(peft_model, backbone, requests)
            except BaseException:
                snapshot.restore()  # the editor's before_edit may have grown the adapter
                raise
            stats = run_edit_loop(
                peft_model, self.edit_parameters(peft_model), self.loop, objective, snapshot=snapshot
            )
        enter, rep = objective.layers
        self.last_edit_trace = {**objective.trace, "edit_layer": enter, "representation_layer": rep}
        logger.debug("ASAM: %d steps, last terms %s", stats.steps, objective.last_terms)
        self.after_edit(peft_model, backbone, requests, stats)
        return stats

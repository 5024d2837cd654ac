"""``ODEditMethod``: ODEdit as an :class:`~odedit_hf.editing.EditMethod`, with the per-edit primal–dual loop.

Plug-and-play: the wrapped editor method (FT-L, LoRA, any later one) supplies the PEFT config of the
edit parameters (``editor.peft_config(backbone)``) and, optionally, a hook run after every optimiser
step (``editor.post_step(peft_model)``, e.g. FT-L's norm clamp); ODEdit supplies the objective. The
loop is light (a Trainer's start-up would dominate one edit) and uses the very loss of
:class:`~odedit_hf.odedit.trainer.ODEditTrainer` (:class:`~odedit_hf.odedit.objective.ODEditObjective`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch

from .config import ODEditConfig
from .objective import ODEditObjective, build_lambda_network, dual_step
from .risks import build_edit_batch

if TYPE_CHECKING:
    from peft import PeftModel

    from odedit_hf.backbones import Backbone
    from odedit_hf.data import EditRequest
    from odedit_hf.editing import EditLoopConfig, EditStats

    from .risks import EditBatch

logger = logging.getLogger(__name__)

__all__ = ["ODEditDivergedError", "ODEditMethod", "objective_field_names"]


class ODEditDivergedError(ValueError):
    """An ODEdit step produced a NaN/inf loss; the adapter was restored to its state before the edit."""


def objective_field_names() -> list[str]:
    """The :class:`ODEditConfig` fields that are ODEdit's own hyperparameters (not peft bookkeeping)."""
    from peft.config import PeftConfig

    base = {f.name for f in fields(PeftConfig)}
    return [f.name for f in fields(ODEditConfig) if f.name not in base and f.name != "editor"]


@dataclass
class ODEditMethod:
    """ODEdit around a base editor method.

    Args:
        editor: the wrapped editing method (e.g. ``FTMethod()``, ``LoRAMethod()``, or any object with
            ``peft_config(backbone)`` and optionally ``post_step(peft_model)`` and ``loop``).
        objective: :class:`ODEditConfig` hyperparameters (``alpha``, ``beta``, ``lambda_mode``, ...).
        loop: steps, learning rate, early stop; default: the editor's own ``loop`` (same budget as the
            plain editor), else :class:`~odedit_hf.editing.EditLoopConfig` defaults. The early stop looks
            at ``R_rel`` (the edit's NLL, the plain editors' loss), so ODEdit and its editor stop at the
            same reliability.
        adapter_name: unused unless the PEFT model has several adapters; default the active one.
    """

    editor: Any
    objective: Mapping[str, Any] = field(default_factory=dict)
    loop: EditLoopConfig | None = None

    name = "odedit"

    def __post_init__(self) -> None:
        if not hasattr(self.editor, "peft_config"):
            raise ValueError(
                f"ODEditMethod.editor must be an editing method with peft_config(backbone), got {type(self.editor).__name__}"
            )
        allowed = set(objective_field_names())
        unknown = sorted(set(self.objective) - allowed)
        if unknown:
            raise ValueError(
                f"ODEditMethod.objective: unknown ODEdit hyperparameters {unknown}; known: {sorted(allowed)}"
            )
        self.objective = dict(self.objective)
        if self.loop is None:
            from odedit_hf.editing import EditLoopConfig

            self.loop = getattr(self.editor, "loop", None) or EditLoopConfig()
        self.name = f"odedit+{getattr(self.editor, 'name', type(self.editor).__name__)}"

    def peft_config(self, backbone: Backbone) -> ODEditConfig:
        """``ODEditConfig(editor=<the editor's config>, **objective)``."""
        return ODEditConfig(editor=self.editor.peft_config(backbone), **self.objective)

    def edit(self, peft_model: PeftModel, backbone: Backbone, requests: Sequence[EditRequest]) -> EditStats:
        """Edit ``requests`` (one optimisation) into the active adapter with the primal–dual loop.

        Raises:
            ODEditDivergedError: the loss became NaN/inf; the adapter is back to its state before this
                call (the base weights are never written).
        """
        from odedit_hf.editing import model_device

        adapter = peft_model.active_adapter
        config = peft_model.peft_config[adapter]
        if not isinstance(config, ODEditConfig):
            raise ValueError(
                f"ODEditMethod.edit: adapter {adapter!r} is a {type(config).__name__}; wrap the model with "
                "get_peft_model(model, method.peft_config(backbone))"
            )
        device = model_device(peft_model)
        edit_batch = build_edit_batch(backbone, requests, config, device=device)
        # the frozen vision tower runs once per image batch of this edit (prepare pass and every step)
        with backbone.frozen_vision_cache():
            return self._edit(peft_model, backbone, edit_batch, config, adapter, device)

    def _edit(
        self,
        peft_model: PeftModel,
        backbone: Backbone,
        edit_batch: EditBatch,
        config: ODEditConfig,
        adapter: str,
        device: torch.device,
    ) -> EditStats:
        from odedit_hf.editing import AdapterSnapshot, EditStats, trainable_parameters

        loop = self.loop
        objective = ODEditObjective(config, backbone)
        forward = backbone.forward
        # the pre-edit reference (loc/m_loc distributions, MMD bandwidths) comes from the adapter-disabled
        # model; while the editor's fresh adapter is still the identity, step 0's forward is that model
        is_identity = getattr(self.editor, "adapter_is_identity", None)
        first_is_pre_edit = bool(is_identity is not None and is_identity(peft_model))
        if not first_is_pre_edit:
            with peft_model.disable_adapter():
                objective.prepare(forward, edit_batch)
        params = trainable_parameters(peft_model)
        lambda_net, dual_optimizer = build_lambda_network(config, params, device=device)
        snapshot = AdapterSnapshot(peft_model, adapter)
        optimizer = torch.optim.Adam(params, lr=loop.lr, weight_decay=loop.weight_decay)
        post_step = self.editor.post_step(peft_model) if hasattr(self.editor, "post_step") else None

        losses: list[float] = []
        stopped_early = False
        steps = 0
        try:
            for step in range(loop.steps + 1):
                lam = lambda_net(params) if config.irm_penalty else None
                terms = objective(forward, edit_batch, lam, pre_edit=first_is_pre_edit and step == 0)
                value = float(terms.total.detach())
                if not math.isfinite(value):
                    raise ODEditDivergedError(
                        f"ODEdit: the loss is {value} at step {step} (terms: {terms.as_floats()}); the adapter was "
                        f"restored to its state before this edit. Lower the learning rate (now {loop.lr}) or "
                        f"lambda_lr (now {config.lambda_lr})"
                    )
                losses.append(value)
                if loop.stop_loss is not None and float(terms.r_rel.detach()) < loop.stop_loss:
                    stopped_early = True
                    break
                if step == loop.steps:
                    break
                optimizer.zero_grad(set_to_none=True)
                terms.total.backward()
                if loop.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, loop.max_grad_norm)
                optimizer.step()
                dual_step(lambda_net, dual_optimizer)
                steps += 1
                if post_step is not None:
                    post_step(step)
        except BaseException:
            snapshot.restore()
            raise
        finally:
            optimizer.zero_grad(set_to_none=True)
        logger.debug(
            "ODEdit: %d steps, loss %.4g -> %.4g, last terms %s",
            steps,
            losses[0],
            losses[-1],
            terms.as_floats(),
        )
        return EditStats(steps=steps, final_loss=losses[-1], losses=losses, stopped_early=stopped_early)


def odedit_method(editor: str | Any = "ft", **kwargs: Any) -> ODEditMethod:
    """Build ODEdit around an editor named in the editing registry (``"ft"``, ``"lora"``, ...).

    Keyword arguments that are ODEdit hyperparameters (``alpha``/``beta`` excepted: pass
    ``odedit_alpha``/``odedit_beta``, since LoRA has its own ``alpha``) go to the objective; the rest
    go to the editor (``steps``, ``lr``, ``layers``, ``rank``, ...). This is the factory behind
    ``get_method("odedit", editor="lora", lambda_mode="sketch", steps=20)``.
    """
    from odedit_hf.editing import get_method

    names = set(objective_field_names())
    objective: dict[str, Any] = {}
    editor_kwargs: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in ("odedit_alpha", "odedit_beta"):
            objective[key.removeprefix("odedit_")] = value
        elif key in names and key not in ("alpha", "beta"):
            objective[key] = value
        else:
            editor_kwargs[key] = value
    if isinstance(editor, str):
        if editor == "odedit":
            raise ValueError(
                "odedit_method: ODEdit cannot wrap itself; choose a base editor such as 'ft' or 'lora'"
            )
        editor = get_method(editor, **editor_kwargs)
    elif editor_kwargs:
        raise ValueError(
            f"odedit_method: editor hyperparameters {sorted(editor_kwargs)} given with an editor object"
        )
    return ODEditMethod(editor=editor, objective=objective)


def _register_with_editing() -> None:
    from odedit_hf.editing import register_method

    register_method("odedit", "odedit_hf.odedit.method:odedit_method")


# `get_method("odedit", editor="lora", ...)` once this module is imported (idempotent).
_register_with_editing()

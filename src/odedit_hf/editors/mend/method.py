"""MEND as an :class:`~odedit_hf.editing.Editor` (``get_method("mend")``): one forward/backward on the edit
prompt, the rank-1 gradient factors through the hypernetwork, the update appended to the adapter."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from odedit_hf.editing.editor import Editor, model_device
from odedit_hf.editing.protocol import EditStats

if TYPE_CHECKING:
    from peft import PeftModel

    from odedit_hf.backbones import Backbone
    from odedit_hf.data import EditRequest
    from odedit_hf.editing.rollback import BaseWeights

    from .config import MENDConfig
    from .hypernet import MENDNet
    from .layer import MENDLayer

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LAYERS",
    "MENDMethod",
    "MENDSnapshot",
    "default_mend_modules",
    "mend_layers",
    "token_rows",
]

#: MEND edits the last three decoder layers by default (EasyEdit's MEND configs: the last 3).
DEFAULT_LAYERS: tuple[int, ...] = (-3, -2, -1)
_PEFT_PREFIX = "base_model.model."


def default_mend_modules(
    backbone: Backbone, layers: Sequence[int] | None = None, projections: Sequence[str] | None = None
) -> list[str]:
    """The modules MEND edits: ``projections`` (default: the family's FFN projections except gates, i.e.
    up and down for Llama-style MLPs, fc1 and fc2 for OPT, as EasyEdit's MEND configs) of ``layers``
    (default :data:`DEFAULT_LAYERS`, those that exist)."""
    n = backbone.num_layers()
    if layers is None:
        layers = [i for i in DEFAULT_LAYERS if -n <= i < n] or [-1]
    if projections is None:
        projections = [p for p in backbone.spec.ffn_projections if "gate" not in p.rsplit(".", 1)[-1]]
        projections = projections or list(backbone.spec.ffn_projections)
    return backbone.ffn_module_names(layers, projections)


def mend_layers(peft_model: Any, modules: Sequence[str]) -> list[MENDLayer]:
    """The MEND layers of ``modules`` (names relative to the transformers model), in that order.

    Raises:
        ValueError: a module is not wrapped by a MEND adapter.
    """
    from .layer import MENDLayer

    found: dict[str, MENDLayer] = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, MENDLayer):
            found[name.removeprefix(_PEFT_PREFIX)] = module
    missing = [m for m in modules if m not in found]
    if missing:
        raise ValueError(
            f"MEND: the model has no MEND adapter on {', '.join(missing)}; wrap it with "
            "get_peft_model(model, get_method('mend', ...).peft_config(backbone))"
        )
    return [found[m] for m in modules]


def token_rows(
    backbone: Backbone, batch: dict[str, torch.Tensor], layers: Sequence[MENDLayer]
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], float]:
    """One forward/backward of the target NLL on ``batch``: per layer, the input ``u`` and the output gradient
    ``δ`` of every token through which the loss depends on the layer (``(n, in)``, ``(n, out)``, detached),
    and the NLL itself.

    Tokens whose ``δ`` or ``u`` is exactly zero (padding, positions after the target) are left out, as MEND does.
    """
    from odedit_hf.editing.loss import model_inputs, nll_from_logits

    with contextlib.ExitStack() as stack:
        captures = [stack.enter_context(layer.capture()) for layer in layers]
        with torch.enable_grad():
            logits = backbone.forward(model_inputs(batch)).logits
            nll = nll_from_logits(logits, batch["labels"])
            probes = [c.probe for c in captures]
            if any(p is None for p in probes):
                raise ValueError("MEND: an edited module did not run in the forward pass of the edit prompt")
            grads = torch.autograd.grad(nll, probes, allow_unused=True)
    out = []
    for layer, capture, grad in zip(layers, captures, grads):
        u = capture.inputs.reshape(-1, layer.in_features).to(torch.float32)
        if grad is None:
            grad = torch.zeros(u.shape[0], layer.out_features, dtype=torch.float32, device=u.device)
        d = grad.reshape(-1, layer.out_features).to(torch.float32)
        keep = (d != 0).any(-1) & (u != 0).any(-1)
        out.append((u[keep], d[keep]))
    return out, float(nll.detach())


class MENDSnapshot:
    """The factors of one adapter at a point in time; :meth:`restore` puts them back exactly (the edits
    appended since are gone)."""

    def __init__(self, peft_model: Any, adapter_name: str) -> None:
        from .layer import MENDLayer

        self.adapter_name = adapter_name
        self._states = [
            (m, m.factor_state(adapter_name))
            for m in peft_model.modules()
            if isinstance(m, MENDLayer) and adapter_name in m.mend_a
        ]
        if not self._states:
            raise ValueError(
                f"MEND: the model has no MEND layer holding adapter {adapter_name!r}; wrap it with "
                "get_peft_model(model, get_method('mend').peft_config(backbone))"
            )

    def restore(self) -> None:
        for layer, state in self._states:
            layer.load_factor_state(self.adapter_name, state)


@dataclass
class MENDMethod(Editor):
    """MEND (Mitchell et al., "Fast Model Editing at Scale", ICLR 2022): a trained hypernetwork turns the
    rank-1 gradient factors of the edit prompt's target NLL into a weight update of the FFN projections of
    the last layers, in one forward/backward (no optimisation at edit time). The update of every edit is
    kept as low-rank factors in the adapter, so edits accumulate sequentially and roll back exactly.

    Train the hypernetwork first (``odedit-hf train-editor --method mend --model M --data WORLD --out DIR``)
    and pass its folder as ``editor_weights``; without it, the network is MEND's untrained identity
    initialisation: the update is then a normalised gradient step of size ``edit_lr``.

    Args:
        editor_weights: the folder of a trained MEND hypernetwork (``train-editor --out``); it is refused
            when trained for another base model. ``none``: the untrained identity-initialised network.
        layers: decoder layer indices to edit (negative from the end); default the last three. With
            ``editor_weights`` the artefact's modules are used (a different choice here is an error).
        projections: FFN projection names inside a layer; default the family's up and down projections.
        rank: the hidden rank of the hypernetwork's low-rank layers (of the untrained network, and of the one
            ``train-editor`` trains; a trained artefact keeps its own).
        n_hidden: hidden layers of the hypernetwork's MLP (as ``rank``).
        edit_lr: the initial per-layer edit step ``η`` (as ``rank``; a trained network has learned its own).
        steps: MEND updates per edit, each from the gradient on the model as edited so far (MEND: 1; more is
            an iterated MEND, useful for the untrained network, whose single step is one gradient step).
        stop_loss: with ``steps > 1``, stop once the edit prompt's target NLL is below this (``none``: never).
    """

    editor_weights: str | None = None
    layers: Sequence[int] | None = None
    projections: Sequence[str] | None = None
    rank: int = 1920
    n_hidden: int = 1
    edit_lr: float = 1e-3
    steps: int = 1
    stop_loss: float | None = None

    name: ClassVar[str] = "mend"
    # ODEdit+MEND is MEND's hypernetwork meta-trained under ODEdit's objective (train-editor --method
    # odedit+mend); an edit is MEND's own, so no wrapper wraps MEND at edit time (see wrap_refusal)
    wrappable: ClassVar[bool] = False
    trains_at_edit: ClassVar[bool] = True
    needs_training: ClassVar[bool] = True
    supports_batch: ClassVar[bool] = True

    def wrap_refusal(self, wrapper: str) -> str:
        """Why ``wrapper`` cannot wrap MEND at edit time, and what to run instead."""
        weights = self.editor_weights or "DIR"
        trained = ""
        if self.editor_weights is not None:
            from .hypernet import read_artefact_config

            objective = read_artefact_config(self.editor_weights).get("extra", {}).get("objective", "mend")
            trained = f" ({weights} was meta-trained under the {objective!r} objective)"
        if wrapper == "odedit":
            return (
                "MEND has no edit parameters for ODEdit's per-edit loop; ODEdit+MEND is MEND's hypernetwork "
                "meta-trained under ODEdit's objective: train it with `odedit-hf train-editor --method odedit+mend "
                f"--out DIR` (train_editor('odedit+mend', ...)) and edit with `--method mend --mend.editor-weights "
                f"{weights}` (get_method('mend', editor_weights=...)){trained}"
            )
        return (
            f"MEND's edit is one hypernetwork update with no edit parameters for {wrapper}'s loop to optimise"
        )

    def __post_init__(self) -> None:
        if isinstance(self.editor_weights, str) and self.editor_weights.strip().lower() in ("", "none"):
            self.editor_weights = None
        if self.editor_weights is not None:
            if not isinstance(self.editor_weights, (str, os.PathLike)):
                raise ValueError(
                    f"MENDMethod.editor_weights must be a folder path or none, got {self.editor_weights!r}"
                )
            self.editor_weights = os.path.abspath(os.path.expanduser(os.fspath(self.editor_weights)))
            from .hypernet import read_artefact_config

            read_artefact_config(self.editor_weights)  # fail now on a missing or foreign folder
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        if isinstance(self.projections, str):
            self.projections = [self.projections]
        self.layers = None if self.layers is None else list(self.layers)
        self.projections = None if self.projections is None else list(self.projections)
        from .hypernet import MENDNetConfig

        MENDNetConfig(
            modules=["m"], shapes=[[1, 1]], rank=self.rank, n_hidden=self.n_hidden, edit_lr=self.edit_lr
        )
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"MENDMethod.steps must be an int >= 1, got {self.steps!r}")
        if self.stop_loss is not None and (
            isinstance(self.stop_loss, bool)
            or not isinstance(self.stop_loss, (int, float))
            or self.stop_loss < 0
        ):
            raise ValueError(f"MENDMethod.stop_loss must be a number >= 0 or none, got {self.stop_loss!r}")
        self._nets: dict[int, MENDNet] = {}

    # ------------------------------------------------------------------ the hypernetwork
    def modules(self, backbone: Backbone) -> list[str]:
        """The edited module names: the artefact's, or the backbone registry's (see :func:`default_mend_modules`)."""
        if self.editor_weights is None:
            return default_mend_modules(backbone, self.layers, self.projections)
        from .hypernet import read_artefact_config

        saved = list(read_artefact_config(self.editor_weights)["net"]["modules"])
        if self.layers is not None or self.projections is not None:
            asked = default_mend_modules(backbone, self.layers, self.projections)
            if asked != saved:
                raise ValueError(
                    f"MEND: layers/projections select {asked}, but the hypernetwork {self.editor_weights} was "
                    f"trained for {saved}; drop --mend.layers/--mend.projections or train for these modules"
                )
        return saved

    def net_for(self, backbone: Backbone) -> MENDNet:
        """The hypernetwork for ``backbone`` (loaded and checked once per base model; eval mode, frozen)."""
        model = backbone.base_model
        net = self._nets.get(id(model))
        if net is not None:
            return net
        from .hypernet import MENDNet, MENDNetConfig, load_net

        if self.editor_weights is not None:
            net = load_net(self.editor_weights, model)
        else:
            modules = self.modules(backbone)
            shapes = []
            for name in modules:
                module = model.get_submodule(name)
                base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
                shapes.append([base.in_features, base.out_features])
            config = MENDNetConfig(
                modules=modules, shapes=shapes, rank=self.rank, n_hidden=self.n_hidden, edit_lr=self.edit_lr
            )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # the (unused at init) hidden factors: the same network every time
                net = MENDNet(config)
            logger.info(
                "MEND: no editor_weights given; using the untrained identity-initialised hypernetwork (a "
                "normalised gradient step of size %g); train one with odedit-hf train-editor --method mend",
                self.edit_lr,
            )
        net.to(model_device(model)).eval().requires_grad_(False)
        self._nets = {id(model): net}
        return net

    # ------------------------------------------------------------------ the adapter
    def peft_config(self, backbone: Backbone) -> MENDConfig:
        from .config import MENDConfig

        self.net_for(backbone)  # a missing, damaged or foreign artefact fails before anything is wrapped
        return MENDConfig(target_modules=self.modules(backbone))

    def edit_parameters(self, peft_model: PeftModel) -> list[torch.nn.Parameter]:
        """None: the hypernetwork computes MEND's update, no optimiser runs at edit time."""
        return []

    def adapter_is_identity(self, peft_model: PeftModel) -> bool:
        """True when the active adapter holds no factor."""
        from odedit_hf.editing.editor import no_layer_changes

        from .layer import MENDLayer

        return no_layer_changes(peft_model, MENDLayer, lambda layer, name: layer.rank(name) > 0)

    def snapshot(
        self, peft_model: PeftModel, adapter_name: str, base: BaseWeights | None = None
    ) -> MENDSnapshot:
        """A :class:`MENDSnapshot` of the adapter's factors (the base weights are never written)."""
        return MENDSnapshot(peft_model, adapter_name)

    def extra_memory_bytes(self, num_edit_parameters: int) -> int:
        """The hypernetwork's parameters (float32), from its config (a few MB for the tiny LLaVA)."""
        net = next(iter(self._nets.values()), None)
        if net is None:
            return 0
        return sum(p.numel() * 4 for p in net.parameters())

    # ------------------------------------------------------------------ the edit
    def edit(self, peft_model: PeftModel, backbone: Backbone, requests: Sequence[EditRequest]) -> EditStats:
        """Edit ``requests`` (one batch edit) into the active adapter: the target NLL's gradient factors
        ``(u, δ)`` of every token, through the hypernetwork, appended as ``(A, B)`` to each edited layer.

        Raises:
            ValueError: no request, or the update is not finite (the adapter is then left unchanged).
        """
        from odedit_hf.editing.samples import edit_samples

        if len(requests) == 0:
            raise ValueError("MEND: no requests given; an edit needs at least one EditRequest")
        net = self.net_for(backbone)
        layers = mend_layers(peft_model, net.config.modules)
        adapter = peft_model.active_adapter
        batch = backbone.build_batch(edit_samples(requests), device=model_device(peft_model))
        losses: list[float] = []
        stopped = False
        for _ in range(self.steps):
            rows, nll = token_rows(backbone, batch, layers)
            losses.append(nll)
            if self.stop_loss is not None and nll < self.stop_loss:
                stopped = True
                break
            updates = []
            with torch.no_grad():
                for index, (layer, (u, d)) in enumerate(zip(layers, rows)):
                    a, b = net.factors(index, u, d)
                    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                        raise ValueError(
                            f"MEND: the update of {net.config.modules[index]} for case(s) "
                            f"{[r.case_id for r in requests]} is not finite (NaN/inf); no edit was applied. The "
                            "edit prompt's gradient or the hypernetwork's statistics are degenerate: check the "
                            "artefact"
                        )
                    updates.append((layer, a, b))
            for layer, a, b in updates:  # all or nothing: every factor was checked first
                layer.append_factors(adapter, a, b)
        return EditStats(
            steps=len(losses) - int(stopped), final_loss=losses[-1], losses=losses, stopped_early=stopped
        )

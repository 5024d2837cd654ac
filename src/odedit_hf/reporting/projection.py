"""Where an edit moves the model's hidden states: the last prompt token's last-layer hidden state of
each prompt group (edit, text rephrase, image rephrase, text locality, multimodal locality), before the
edit (adapter disabled) and after it (adapter enabled), projected on the two principal axes of all of
them together -- the picture of the ODEdit paper's Fig. 3: an edit that generalises carries its
rephrases along with the edit prompt; one that stays local leaves the locality prompts where they were.

Besides the 2-D points, :class:`Projection` records per group the median relative shift
``||h_after - h_before|| / ||h_before||`` in the full hidden space (the projection itself can hide or
exaggerate distances), which the figure's legend and the report's table show.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["PROJECTION_GROUPS", "Projection", "hidden_state_projection", "projection_figure"]

#: The prompt groups projected, with their labels (``odedit_hf.editing.environments.GROUPS``).
PROJECTION_GROUPS: dict[str, str] = {
    "edit": "edit prompt",
    "rephrase": "text rephrase",
    "image_rephrase": "image rephrase",
    "loc": "text locality",
    "m_loc": "multimodal locality",
}


@dataclass
class Projection:
    """The projected points and the per-group shifts.

    Attributes:
        points: one dict per (request, group, stage): ``case_id``, ``group``, ``stage``
            (``"before"``/``"after"``), ``x``, ``y``.
        shift: group -> median over requests of ``||h_after - h_before|| / ||h_before||``.
        explained: the fraction of the variance the two axes explain.
        method: the adapter's method name, when known.
    """

    points: list[dict[str, Any]]
    shift: dict[str, float]
    explained: tuple[float, float]
    method: str | None = None
    groups: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Projection:
        data = json.loads(text)
        data["explained"] = tuple(data["explained"])
        return cls(**data)


def _last_prompt_hidden(
    forward: Any, backbone: Any, edit_batch: Any, groups: Sequence[str]
) -> dict[str, Any]:
    import torch

    from odedit_hf.editing.environments import run_groups

    with torch.no_grad():
        out = run_groups(forward, backbone, edit_batch, hidden_groups=groups)
    return {g: torch.cat(out[g].answer_hidden_per_row("last_prompt")).double().cpu() for g in groups}


def hidden_state_projection(
    peft_model: Any, backbone: Any, requests: Sequence[Any], *, method: str | None = None
) -> Projection:
    """The projection of ``requests``' prompts before/after the edit held by ``peft_model``.

    ``peft_model`` is a ``peft.PeftModel`` (any odedit-hf method); "before" runs it under
    ``disable_adapter()``, which every odedit-hf adapter honours (its layers return the base output).

    Raises:
        ValueError: no requests.
    """
    import torch

    from odedit_hf.editing.environments import build_edit_batch

    if not requests:
        raise ValueError("hidden_state_projection: give at least one request")
    # text-only records have no image prompts (build_edit_batch gives them no rows in those groups)
    image_groups = ("image_rephrase", "m_loc") if any(r.text_only for r in requests) else ()
    groups = [g for g in PROJECTION_GROUPS if g not in image_groups]
    device = next(peft_model.parameters()).device
    batch = build_edit_batch(backbone, list(requests), groups, num_rephrases=1, device=device)

    def forward(inputs: dict[str, Any], **kwargs: Any) -> Any:
        return peft_model(**inputs, **kwargs)

    was_training = peft_model.training
    peft_model.eval()
    try:
        with peft_model.disable_adapter():
            before = _last_prompt_hidden(forward, backbone, batch, groups)
        after = _last_prompt_hidden(forward, backbone, batch, groups)
    finally:
        peft_model.train(was_training)
    stacked = torch.cat([before[g] for g in groups] + [after[g] for g in groups])
    centred = stacked - stacked.mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    var = s**2
    total = float(var.sum()) or 1.0
    axes = vh[:2].T if vh.shape[0] >= 2 else torch.cat([vh[:1].T, torch.zeros_like(vh[:1].T)], dim=1)
    coords = centred @ axes
    points: list[dict[str, Any]] = []
    row = 0
    for stage in ("before", "after"):
        for g in groups:
            for i in range(len(requests)):
                x, y = coords[row].tolist()
                points.append(
                    {"case_id": int(requests[i].case_id), "group": g, "stage": stage, "x": x, "y": y}
                )
                row += 1
    shift = {
        g: statistics.median(
            (
                torch.linalg.vector_norm(after[g] - before[g], dim=1)
                / torch.linalg.vector_norm(before[g], dim=1)
            )
            .clamp_min(0.0)
            .tolist()
        )
        for g in groups
    }
    explained = tuple(float(v) / total for v in var[:2].tolist()) + (0.0,) * max(0, 2 - len(var))
    return Projection(points=points, shift=shift, explained=explained[:2], method=method, groups=groups)


_GROUP_COLOURS = {
    "edit": "#C44E52",
    "rephrase": "#DD8452",
    "image_rephrase": "#8172B3",
    "loc": "#4C72B0",
    "m_loc": "#55A868",
}


def projection_figure(projection: Projection) -> Any:
    """Scatter of the projection: hollow markers before the edit, filled after, a thin line joining each
    prompt's two positions; the legend gives each group's median relative shift."""
    from .figures import _figure

    fig = _figure(6.4, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    by_key = {(p["case_id"], p["group"], p["stage"]): p for p in projection.points}
    for g in projection.groups:
        colour = _GROUP_COLOURS.get(g, "#8C8C8C")
        cases = sorted({p["case_id"] for p in projection.points if p["group"] == g})
        for c in cases:
            a, b = by_key.get((c, g, "before")), by_key.get((c, g, "after"))
            if a and b:
                ax.plot([a["x"], b["x"]], [a["y"], b["y"]], color=colour, linewidth=0.6, alpha=0.5)
        xs = [by_key[(c, g, "before")]["x"] for c in cases]
        ys = [by_key[(c, g, "before")]["y"] for c in cases]
        ax.scatter(xs, ys, facecolors="none", edgecolors=colour, s=28, linewidths=1.0)
        xs = [by_key[(c, g, "after")]["x"] for c in cases]
        ys = [by_key[(c, g, "after")]["y"] for c in cases]
        label = f"{PROJECTION_GROUPS.get(g, g)} (shift {projection.shift.get(g, float('nan')):.3f})"
        ax.scatter(xs, ys, color=colour, s=28, label=label)
    ex = projection.explained
    ax.set_xlabel(f"PC 1 ({ex[0]:.0%} of variance)")
    ax.set_ylabel(f"PC 2 ({ex[1]:.0%} of variance)")
    title = "Last-prompt-token hidden states, before (hollow) and after (filled) the edit"
    ax.set_title(title + (f"\n{projection.method}" if projection.method else ""), fontsize=9)
    ax.legend(fontsize=7, loc="best", title="group (median relative shift)", title_fontsize=7)
    ax.grid(alpha=0.3)
    return fig

"""The report's figures, drawn with matplotlib's object API (no pyplot, no global backend state).

- :func:`metric_bars`: per method and protocol, the mean of each headline metric over seeds, the
  min-max spread as an error bar and every seed as a dot.
- :func:`sequential_curves`: for sequential runs, each metric of edit T right after it and on the
  final model, against T.
- :func:`outcome_strips`: one strip per run and metric, one cell per edit, coloured by its score.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from .data import METRICS, PROTOCOL_ORDER, ResultsRun, group_runs

__all__ = ["FIGURE_DPI", "metric_bars", "outcome_strips", "sequential_curves"]

#: Resolution of the saved PNGs (small files; readable at page width).
FIGURE_DPI = 100

_COLOURS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C")


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "odedit-hf reports need matplotlib: pip install 'odedit-hf[extras]' (or pip install matplotlib)"
        ) from exc
    fig = Figure(figsize=(width, height), dpi=FIGURE_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _method_colours(runs: Sequence[ResultsRun]) -> dict[str, str]:
    """One colour per method, the same in every figure (in first-seen order)."""
    return {name: _COLOURS[i % len(_COLOURS)] for i, name in enumerate(dict.fromkeys(r.method for r in runs))}


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.fmean(finite) if finite else float("nan")


def metric_bars(runs: Sequence[ResultsRun]) -> Any:
    """Per-method metric bars, one panel per protocol (only runs of one protocol are compared side by
    side): mean over the group's seeds, min-max whiskers, one dot per seed, the mean written above.

    Sequential runs are summarised by the final model's scores, the others by the scores right after
    each edit (each panel's title says which).
    """
    groups = group_runs(runs)
    protocols = sorted(
        {m[0].protocol for m in groups.values()}, key=lambda p: (PROTOCOL_ORDER + (p,)).index(p)
    )
    most = max(sum(1 for m in groups.values() if m[0].protocol == p) for p in protocols)
    fig = _figure(min(max(8.5, 0.55 * len(METRICS) * most + 4.5), 15.0), 3.1 * len(protocols) + 0.3)
    axes = fig.subplots(len(protocols), 1, squeeze=False)[:, 0]
    colours = {
        name: _COLOURS[g % len(_COLOURS)] for g, name in enumerate(dict.fromkeys(r.method for r in runs))
    }
    for ax, protocol in zip(axes, protocols):
        names = [name for name, members in groups.items() if members[0].protocol == protocol]
        n = len(names)
        bar_w = 0.8 / max(n, 1)
        kind = groups[names[0]][0].headline_kind
        for g, name in enumerate(names):
            members = groups[name]
            for m, (key, _) in enumerate(METRICS):
                values = [float(r.aggregate().get(key, float("nan"))) for r in members]
                values = [v for v in values if not math.isnan(v)]
                if not values:
                    continue
                x = m + (g - (n - 1) / 2) * bar_w
                mean = statistics.fmean(values)
                ax.bar(
                    x,
                    mean,
                    width=bar_w * 0.92,
                    color=colours[members[0].method],
                    label=f"{members[0].method} ({len(members)} seed{'s' if len(members) != 1 else ''})"
                    if m == 0
                    else None,
                )
                if len(values) > 1:
                    ax.errorbar(
                        x,
                        mean,
                        yerr=[[max(0.0, mean - min(values))], [max(0.0, max(values) - mean)]],
                        fmt="none",
                        ecolor="black",
                        capsize=3,
                        linewidth=1,
                    )
                ax.scatter([x] * len(values), values, s=9, color="black", zorder=3)
                ax.text(x, max(values) + 0.015, f"{mean:.2f}", ha="center", va="bottom", fontsize=6)
        ax.set_xticks(range(len(METRICS)), [label for _, label in METRICS])
        ax.set_ylim(0, 1.1)
        ax.set_ylabel("score")
        ax.set_title(
            f"{protocol} protocol: {'on the final model' if kind == 'final' else 'right after each edit'} "
            "(bars: mean over seeds; whiskers: min-max; dots: seeds)",
            fontsize=9,
        )
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), framealpha=0.9)
    return fig


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1) : i + 1] if not math.isnan(v)]
        out.append(statistics.fmean(chunk) if chunk else float("nan"))
    return out


def sequential_curves(runs: Sequence[ResultsRun]) -> Any | None:
    """Sequential runs: each metric of edit T right after it (dashed) and on the final model (solid),
    against T, averaged over the group's seeds and smoothed by a trailing moving average (window
    ``max(1, N // 10)``; the raw per-edit means are the faint dots). ``None`` without sequential runs."""
    from matplotlib.ticker import MaxNLocator

    groups = {k: v for k, v in group_runs(runs).items() if v[0].protocol == "sequential"}
    if not groups:
        return None
    fig = _figure(12.0, 3.2)
    axes = fig.subplots(1, len(METRICS), sharey=True)
    colours = _method_colours(runs)
    for name, members in groups.items():
        colour = colours[members[0].method]
        n = min(len(r.data["edits"]) for r in members)
        window = max(1, n // 10)
        t = list(range(1, n + 1))
        for ax, (key, label) in zip(axes, METRICS):
            for kind, style in (("post", "--"), ("final", "-")):
                per_seed = [r.per_edit(key, kind)[:n] for r in members]
                mean = [_nanmean([s[i] for s in per_seed]) for i in range(n)]
                ax.plot(
                    t,
                    _moving_average(mean, window),
                    style,
                    color=colour,
                    linewidth=1.4,
                    label=f"{name}: {'right after the edit' if kind == 'post' else 'final model'}",
                )
                if kind == "final":
                    ax.scatter(t, mean, s=5, color=colour, alpha=0.35)
            ax.set_title(label, fontsize=9)
            ax.set_xlabel("edit T", fontsize=8)
            ax.set_ylim(-0.03, 1.05)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
    axes[0].set_ylabel("score of edit T")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=7)
    fig.suptitle(
        "Sequential editing: edit T right after it (dashed) and on the final model (solid)", fontsize=10
    )
    return fig


def outcome_strips(runs: Sequence[ResultsRun]) -> Any:
    """One panel per run: a row per metric, a cell per edit coloured by its score (red 0 -> green 1);
    sequential runs show the final model's scores."""
    import numpy as np

    height = 0.35 + 0.95 * len(runs)
    fig = _figure(9.0, min(max(height, 1.6), 24.0))
    axes = fig.subplots(len(runs), 1, squeeze=False)[:, 0]
    image = None
    for ax, run in zip(axes, runs):
        grid = np.array([run.per_edit(key) for key, _ in METRICS], dtype=float)
        image = ax.imshow(
            np.ma.masked_invalid(grid),
            aspect="auto",
            cmap="RdYlGn",
            vmin=0.0,
            vmax=1.0,
            interpolation="nearest",
        )
        ax.set_yticks(range(len(METRICS)), [label for _, label in METRICS], fontsize=6)
        n = grid.shape[1]
        step = max(1, n // 10)
        ticks = list(range(0, n, step))
        ax.set_xticks(ticks, [str(i + 1) for i in ticks], fontsize=6)
        kind = "final model" if run.headline_kind == "final" else "after each edit"
        ax.set_title(f"{run.group} · seed {run.seed} ({kind})", fontsize=8, loc="left")
    axes[-1].set_xlabel("edit", fontsize=7)
    if image is not None:
        bar = fig.colorbar(image, ax=list(axes), shrink=min(0.8, 2.5 / len(runs)), pad=0.01)
        bar.ax.tick_params(labelsize=6)
        bar.set_label("score", fontsize=7)
    return fig

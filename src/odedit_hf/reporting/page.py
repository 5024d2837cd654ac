"""The report page: one self-contained HTML file (inline CSS, no script, nothing fetched from the
network) next to its PNG figures, written atomically."""

from __future__ import annotations

import html
import io
import logging
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

from odedit_hf.editing.saving import write_bytes_atomic

from .data import METRICS, ResultsRun, load_results, order_runs
from .figures import FIGURE_DPI, metric_bars, outcome_strips, sequential_curves

logger = logging.getLogger(__name__)

__all__ = ["REPORT_FILE", "write_report"]

REPORT_FILE = "index.html"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 72em;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.55em; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
code { background: #f6f6f6; padding: 0 0.2em; }
.small { font-size: 0.8em; color: #666; }
"""


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{float(value):.3f}"


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIGURE_DPI, metadata={"Software": None})
    return buf.getvalue()


def _runs_table(runs: Sequence[ResultsRun]) -> str:
    head = (
        "<tr><th>run</th><th>seed</th><th>edits</th><th>scores</th>"
        + "".join(f"<th>{html.escape(label)}</th>" for _, label in METRICS)
        + "<th>T-Loc easyedit</th><th>M-Loc easyedit</th><th>edit time median (s)</th><th>file</th></tr>"
    )
    rows = []
    for run in runs:
        for kind in ("post", "final"):
            agg = run.data["aggregates"].get(kind)
            if not agg:
                continue
            timing = run.data.get("timing") or {}
            rows.append(
                "<tr>"
                f"<td>{html.escape(run.group)}</td><td>{html.escape(str(run.seed))}</td><td>{run.n_edits}</td>"
                f"<td>{'final model' if kind == 'final' else 'after each edit'}</td>"
                + "".join(f"<td>{_fmt(agg.get(key))}</td>" for key, _ in METRICS)
                + f"<td>{_fmt(agg.get('t_locality_easyedit'))}</td><td>{_fmt(agg.get('m_locality_easyedit'))}</td>"
                f"<td>{_fmt(timing.get('edit_wall_time_s_median'))}</td>"
                f"<td class='small'>{html.escape(os.path.basename(run.path))}</td>"
                "</tr>"
            )
    return f"<table>{head}{''.join(rows)}</table>"


def _provenance(runs: Sequence[ResultsRun]) -> str:
    items = []
    for run in runs:
        env = run.data.get("environment") or {}
        versions = ", ".join(
            f"{k} {env[k]}" for k in ("odedit_hf", "torch", "transformers", "peft") if env.get(k)
        )
        method_config = (run.data.get("config") or {}).get("method")
        items.append(
            f"<li><code>{html.escape(run.path)}</code>: {html.escape(run.group)}, seed {html.escape(str(run.seed))}, "
            f"metric version {html.escape(str(run.metric_version))}, {html.escape(versions)}"
            + (f" on {html.escape(str(env['device']))}" if env.get("device") else "")
            + (
                f"<br><span class='small'>method config: <code>{html.escape(_compact(method_config))}</code></span>"
                if method_config
                else ""
            )
            + "</li>"
        )
    return "<ul>" + "".join(items) + "</ul>"


def _compact(value: Any) -> str:
    import json

    return json.dumps(value, sort_keys=True, separators=(", ", ": "))


def write_report(
    results: Iterable[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    title: str | None = None,
    projection: Any = None,
) -> dict[str, Any]:
    """Write ``index.html`` and its PNG figures into ``out_dir`` from results files.

    Figures: ``metrics.png`` (always), ``sequential.png`` (when a run is sequential),
    ``outcomes.png`` (always), ``projection.png`` (with ``projection``, a
    :class:`~odedit_hf.reporting.projection.Projection`; its points go to ``projection.json``). Every
    file is written atomically.

    Returns:
        ``{"html": path, "figures": {name: path}}``.

    Raises:
        ValueError: a file that is not an odedit-hf results file (named).
        ImportError: matplotlib is missing (the message says how to install it).
    """
    runs = order_runs(load_results(results))
    out = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out, exist_ok=True)
    versions = sorted({str(r.metric_version) for r in runs})
    if len(versions) > 1:
        logger.warning(
            "the results files use different metric versions (%s): compare with care", ", ".join(versions)
        )

    figures: dict[str, str] = {}
    sections: list[str] = []
    made = [
        (
            "metrics.png",
            metric_bars(runs),
            "Metrics per method",
            "Bars: the mean over seeds of each metric (sequential runs: on the final model; single and batch: "
            "right after each edit); whiskers: min-max over seeds; dots: one per seed. Locality in the "
            "<code>answer</code> mode (the table has the <code>easyedit</code> mode).",
        ),
        (
            "sequential.png",
            sequential_curves(runs),
            "Sequential editing",
            "Score of edit T right after it was made (dashed) and on the final model after all edits (solid), "
            "averaged over seeds and smoothed by a trailing moving average (window N/10); dots: the raw per-edit "
            "final scores. The gap between the two curves is what later edits erased.",
        ),
        (
            "outcomes.png",
            outcome_strips(runs),
            "Per-edit outcomes",
            "One cell per edit and metric, red (0) to green (1); sequential runs on the final model.",
        ),
    ]
    if projection is not None:
        from .projection import PROJECTION_GROUPS, projection_figure

        shifts = ", ".join(
            f"{html.escape(PROJECTION_GROUPS.get(g, g))} {projection.shift[g]:.3f}" for g in projection.groups
        )
        made.append(
            (
                "projection.png",
                projection_figure(projection),
                "Hidden states before and after the edit",
                "The last prompt token's last-layer hidden state of each prompt of "
                f"{len({p['case_id'] for p in projection.points})} edits, before (hollow) and after (filled) the edit, "
                "on the two principal axes of all of them; a line joins each prompt's two positions. Median relative "
                f"shift ||h<sub>after</sub> &minus; h<sub>before</sub>|| / ||h<sub>before</sub>|| in the full space: {shifts}.",
            )
        )
        figures["projection.json"] = write_bytes_atomic(
            os.path.join(out, "projection.json"), projection.to_json().encode("utf-8")
        )
    for name, fig, heading, caption in made:
        if fig is None:
            continue
        figures[name] = write_bytes_atomic(os.path.join(out, name), _png(fig))
        sections.append(
            f"<h2>{html.escape(heading)}</h2><figure><img src='{name}' alt='{html.escape(heading)}'>"
            f"<figcaption>{caption}</figcaption></figure>"
        )
    title = title or "odedit-hf report: " + ", ".join(dict.fromkeys(r.group for r in runs))
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f"<p>{len(runs)} results file{'s' if len(runs) != 1 else ''}; metric version "
        f"{html.escape(', '.join(versions))}. Token accuracy over the target tokens (teacher-forced); locality is "
        "the agreement with the unedited model.</p>"
        "<h2>Scores</h2>"
        + _runs_table(runs)
        + "".join(sections)
        + "<h2>Inputs</h2>"
        + _provenance(runs)
        + "</body></html>\n"
    )
    page_path = write_bytes_atomic(os.path.join(out, REPORT_FILE), page.encode("utf-8"))
    return {"html": page_path, "figures": figures}

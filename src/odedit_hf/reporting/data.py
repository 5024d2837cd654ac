"""Reading results files for reports: one :class:`ResultsRun` per file, grouped by method and protocol."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["METRICS", "PROTOCOL_ORDER", "ResultsRun", "group_runs", "load_results", "order_runs"]

#: How reports order protocols: edits on the base model first, sequential (accumulated) last.
PROTOCOL_ORDER: tuple[str, ...] = ("single", "batch", "eval", "sequential")

#: The headline metrics of a report: (key in EditScores, label). Locality in the ``answer`` mode.
METRICS: tuple[tuple[str, str], ...] = (
    ("reliability", "Reliability"),
    ("t_generality", "T-Generality"),
    ("m_generality", "M-Generality"),
    ("t_locality", "T-Locality"),
    ("m_locality", "M-Locality"),
)


@dataclass
class ResultsRun:
    """One results file.

    Args:
        path: where it was read from.
        data: the whole document.
        method, protocol, seed, n_edits, metric_version: from the document.
    """

    path: str
    data: dict[str, Any] = field(repr=False)
    method: str = ""
    protocol: str = ""
    seed: Any = None
    n_edits: int = 0
    metric_version: Any = None

    @property
    def group(self) -> str:
        """``method · protocol`` (runs of one group differ by seed)."""
        return f"{self.method} · {self.protocol}"

    @property
    def headline_kind(self) -> str:
        """Which scores summarise the run: ``final`` (sequential: the final model) or ``post``."""
        return "final" if self.data["aggregates"].get("final") else "post"

    def aggregate(self, kind: str | None = None) -> dict[str, float]:
        return dict(self.data["aggregates"][kind or self.headline_kind] or {})

    def per_edit(self, metric: str, kind: str | None = None) -> list[float]:
        """The metric of every edit in order (``post``: right after it; ``final``: on the final model)."""
        kind = kind or self.headline_kind
        values = []
        for row in self.data["edits"]:
            scores = row.get(kind) or {}
            value = scores.get(metric)
            values.append(float("nan") if value is None else float(value))
        return values


def load_results(paths: Iterable[str | os.PathLike[str]]) -> list[ResultsRun]:
    """Read results files (``odedit-hf edit --out`` / ``eval --out`` / ``benchmarks/edit.py``).

    Raises:
        ValueError: a file that is missing, not JSON, or not an odedit-hf results document (named).
    """
    runs = []
    for path in paths:
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"results file {path} cannot be read as JSON ({exc})") from None
        if (
            not isinstance(data, Mapping)
            or not str(data.get("format", "")).startswith("odedit-hf/edit-results/")
            or not isinstance(data.get("edits"), list)
        ):
            raise ValueError(
                f"{path} is not an odedit-hf results file (no 'format: odedit-hf/edit-results/...' with 'edits'); "
                "give the JSON that 'odedit-hf edit --out' writes"
            )
        runs.append(
            ResultsRun(
                path=os.path.abspath(path),
                data=dict(data),
                method=str(data.get("method")),
                protocol=str(data.get("protocol")),
                seed=data.get("seed"),
                n_edits=int(data.get("n_edits", len(data["edits"]))),
                metric_version=data.get("metric_version"),
            )
        )
    if not runs:
        raise ValueError("no results files given")
    return runs


def group_runs(runs: Iterable[ResultsRun]) -> dict[str, list[ResultsRun]]:
    """Runs by :attr:`ResultsRun.group`, in first-seen order."""
    groups: dict[str, list[ResultsRun]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    return groups


def order_runs(runs: Iterable[ResultsRun]) -> list[ResultsRun]:
    """Runs by protocol (:data:`PROTOCOL_ORDER`), then method (first-seen order), then seed."""
    runs = list(runs)
    methods = list(dict.fromkeys(r.method for r in runs))

    def key(run: ResultsRun) -> tuple[Any, ...]:
        protocol = (
            PROTOCOL_ORDER.index(run.protocol) if run.protocol in PROTOCOL_ORDER else len(PROTOCOL_ORDER)
        )
        seed = run.seed if isinstance(run.seed, int) else -1
        return (protocol, run.protocol, methods.index(run.method), seed)

    return sorted(runs, key=key)

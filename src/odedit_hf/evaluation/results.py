"""Results of a protocol run: aggregates, the JSON results file (written atomically), the summary table."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from odedit_hf.editing.saving import default_mode

from .metrics import EASYEDIT_IMAGE_TOPK, EASYEDIT_TEXT_TOPK, METRIC_VERSION

if TYPE_CHECKING:
    from odedit_hf.data import EditResult

    from .protocols import ProtocolRun

logger = logging.getLogger(__name__)

__all__ = [
    "LOCALITY_MODES",
    "RESULTS_FORMAT",
    "aggregate",
    "build_report",
    "format_table",
    "probe_counts",
    "write_json_atomic",
]

#: Version of the results file layout (the metric definitions carry their own METRIC_VERSION).
RESULTS_FORMAT = "odedit-hf/edit-results/1"

#: Which mode each locality field of EditScores is in (the hard-negative ones only where the data has them).
LOCALITY_MODES: dict[str, str] = {
    "t_locality": "answer",
    "m_locality": "answer",
    "t_locality_easyedit": "easyedit",
    "m_locality_easyedit": "easyedit",
    "hard_t_locality": "answer",
    "hard_m_locality": "answer",
    "hard_t_locality_easyedit": "easyedit",
    "hard_m_locality_easyedit": "easyedit",
}

_ACCURACY_ROWS = (
    ("reliability", "reliability_em"),
    ("t_generality", "t_generality_em"),
    ("m_generality", "m_generality_em"),
)
_LOCALITY_ROWS = (("t_locality", "t_locality_easyedit"), ("m_locality", "m_locality_easyedit"))
# optional rows, printed only when the report has them (the data carries the probe)
_PROBE_ACCURACY_ROWS = (
    ("portability", ("portability", "portability_em")),
    ("unit", ("unit_generality", "unit_consistency")),
)
_PROBE_LOCALITY_ROWS = (
    ("hard_t_locality", "hard_t_locality_easyedit"),
    ("hard_m_locality", "hard_m_locality_easyedit"),
)


def aggregate(results: list[EditResult], which: str = "post") -> dict[str, float]:
    """Field-wise mean of the ``post`` (or ``final``) scores over ``results``.

    Returns:
        ``{"reliability": ..., "reliability_em": ..., ..., "m_locality_easyedit": ...}`` (the four
        multimodal keys only when some edit has an image: text-only data has none), then the optional
        probe scores (``portability``, ``hard_t_locality``, ``unit_consistency``, ...) that at least one
        edit has, each the mean over the edits that have it; a probe no edit has is absent, not zero.
    """
    from odedit_hf.data import EditScores

    if which not in ("post", "final"):
        raise ValueError(f"aggregate: which must be 'post' or 'final', got {which!r}")
    scores = [getattr(r, which) for r in results]
    if any(s is None for s in scores):
        raise ValueError(
            f"aggregate: some results have no {which!r} scores (only the sequential protocol has 'final')"
        )
    return EditScores.mean(scores).to_dict()


def probe_counts(results: list[EditResult], which: str = "post") -> dict[str, int]:
    """Over how many edits each optional probe score of :func:`aggregate` is averaged (present ones only)."""
    from odedit_hf.data import EditScores

    scores = [getattr(r, which) for r in results]
    if any(s is None for s in scores):
        raise ValueError(f"probe_counts: some results have no {which!r} scores")
    return EditScores.counts(scores)


def _environment(device: str | None) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    from odedit_hf import __version__

    return {
        "odedit_hf": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
    }


def edited_fact(request: Any) -> dict[str, Any]:
    """What a per-edit row says about the edit it scores: the prompt, the old and the new answer, the image's
    file name (``None`` for a text-only record) and the subject where the record names one."""
    image = getattr(request, "image", None)
    fact = {
        "prompt": request.src,
        "target_new": request.alt,
        "target_old": request.pred,
        "image": os.path.basename(str(image)) if image is not None else None,
    }
    subject = getattr(request, "subject", None)
    if subject:
        fact["subject"] = subject
    return fact


def _with_fact(row: dict[str, Any], fact: dict[str, Any] | None) -> dict[str, Any]:
    if fact is None:
        return row
    return {"case_id": row.get("case_id"), "fact": fact, **{k: v for k, v in row.items() if k != "case_id"}}


def build_report(
    run: ProtocolRun,
    *,
    config: Mapping[str, Any] | None = None,
    device: str | None = None,
    requests: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """The JSON-ready results document of a run.

    Keys: ``format``, ``metric_version``, ``method``, ``protocol``, ``seed``, ``batch_size``,
    ``n_edits``, ``locality_modes`` (the mode of each locality key and EasyEdit's k per modality),
    ``aggregates`` (``post``; ``final`` for sequential, else ``None``; the optional probe scores only
    where the data has them), ``probe_counts`` (how many edits each present probe score is averaged
    over; ``{}`` for plain MMEdit data), ``timing`` (per-edit wall
    time median / mean / p90 / max, steps, peak memory, whole-run time), ``rollback`` (hash and
    number of checks, all passed — a failed check raises before any report exists), ``config`` (the
    method's hyperparameters and the run's inputs), ``environment`` and ``edits`` (one row per edit;
    with ``requests``, each row names its edited fact: prompt, new and old answer, image file, subject).
    """
    results = run.results
    facts = {int(r.case_id): edited_fact(r) for r in (requests or ())}
    times = [r.wall_time_s for r in results]
    steps = [r.steps for r in results]
    final = aggregate(results, "final") if run.protocol == "sequential" else None
    quantiles = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return {
        "format": RESULTS_FORMAT,
        "metric_version": METRIC_VERSION,
        "method": run.method,
        "protocol": run.protocol,
        "seed": run.seed,
        "batch_size": run.batch_size,
        "n_edits": len(results),
        "locality_modes": {
            **LOCALITY_MODES,
            "easyedit_topk": {"text": EASYEDIT_TEXT_TOPK, "image": EASYEDIT_IMAGE_TOPK},
        },
        "aggregates": {"post": aggregate(results, "post"), "final": final},
        "probe_counts": probe_counts(results, "post"),
        "timing": {
            "edit_wall_time_s_median": statistics.median(times),
            "edit_wall_time_s_mean": statistics.fmean(times),
            "edit_wall_time_s_p90": quantiles[8],
            "edit_wall_time_s_max": max(times),
            "steps_mean": statistics.fmean(steps),
            "stopped_early": sum(run.stopped_early),
            "peak_memory_mb_max": max(r.peak_memory_mb for r in results),
            "run_wall_time_s": run.wall_time_s,
        },
        "rollback": {
            "base_weights_hash": run.base_weights_hash,
            "checks": run.rollback_checks,
            "all_passed": True,
        },
        "config": dict(config or {}),
        "environment": _environment(device),
        "edits": [_with_fact(r.to_dict(), facts.get(r.case_id)) for r in results],
    }


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return list(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def write_json_atomic(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> str:
    """Write ``payload`` as JSON to ``path`` via a temporary file in the same folder and ``os.replace``.

    A reader never sees a half-written file, and an interrupted run leaves the old file intact.
    NaN is written as ``null`` (strict JSON). The file gets the umask's mode (``tempfile`` alone
    would leave it ``0600``).

    Returns:
        The absolute path written.
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    text = json.dumps(_nan_to_none(payload), indent=2, default=_json_default, allow_nan=False)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value


def format_table(report: Mapping[str, Any]) -> str:
    """The summary table of a report, as printed by ``odedit-hf edit`` (plain text, fixed width).

    The optional probe rows (``portability`` acc / EM, ``unit`` generality / consistency,
    ``hard_t_locality`` and ``hard_m_locality`` answer / easyedit) appear only when the report has them,
    and so do the multimodal rows (``m_generality``, ``m_locality``: absent for text-only data).
    """
    post = report["aggregates"]["post"]
    final = report["aggregates"].get("final")
    sources = [post] + ([final] if final is not None else [])
    cols = ["post"] + (["final"] if final is not None else [])
    header = (
        f"method {report['method']} | protocol {report['protocol']} | {report['n_edits']} edits | "
        f"seed {report['seed']} | metric v{report['metric_version']}"
    )

    def present(keys: tuple[str, str]) -> bool:
        return all(k in src for k in keys for src in sources)

    # the multimodal rows only where the data has images (a text-only run has none: absent, not zero)
    accuracy_rows = [(acc, (acc, em)) for acc, em in _ACCURACY_ROWS if present((acc, em))]
    accuracy_rows += [(name, keys) for name, keys in _PROBE_ACCURACY_ROWS if present(keys)]
    locality_rows = [(a, (a, e)) for a, e in _LOCALITY_ROWS if present((a, e))]
    locality_rows += [(a, (a, e)) for a, e in _PROBE_LOCALITY_ROWS if present((a, e))]
    label = max(14, *(len(name) + 1 for name, _ in accuracy_rows + locality_rows))
    width = label + 26 * len(cols)
    lines = [header, ""]
    lines.append(f"{'metric':<{label}}" + "".join(f"{c + ': acc / EM':>26}" for c in cols))
    lines.append("-" * width)
    for name, (a, b) in accuracy_rows:
        cells = [f"{src[a]:.4f} / {src[b]:.4f}" for src in sources]
        lines.append(f"{name:<{label}}" + "".join(f"{c:>26}" for c in cells))
    lines.append("")
    lines.append(f"{'locality':<{label}}" + "".join(f"{c + ': answer / easyedit':>26}" for c in cols))
    lines.append("-" * width)
    for name, (a, b) in locality_rows:
        cells = [f"{src[a]:.4f} / {src[b]:.4f}" for src in sources]
        lines.append(f"{name:<{label}}" + "".join(f"{c:>26}" for c in cells))
    timing = report["timing"]
    topk = report["locality_modes"]["easyedit_topk"]
    lines.append("")
    lines.append(
        f"edit time median {timing['edit_wall_time_s_median']:.3f} s (p90 {timing['edit_wall_time_s_p90']:.3f} s), "
        f"steps {timing['steps_mean']:.1f} on average ({timing['stopped_early']} stopped early), "
        f"peak memory {timing['peak_memory_mb_max']:.0f} MiB"
    )
    lines.append(
        f"locality: answer = top-1 agreement on the answer tokens; easyedit = all positions, "
        f"top-{topk['text']} text / top-{topk['image']} image"
    )
    counts = report.get("probe_counts") or {}
    if counts:
        lines.append(
            "probes: portability = token accuracy / EM on the edit's consequences; unit = mean token "
            "accuracy / all members exactly right; hard_* = a look-alike entity; edits with each: "
            + ", ".join(f"{k} {v}" for k, v in counts.items() if not k.endswith(("_em", "_easyedit")))
        )
    lines.append(
        f"rollback: base-weight hash {report['rollback']['base_weights_hash']} checked "
        f"{report['rollback']['checks']} times, all equal"
    )
    return "\n".join(lines)

"""The model card of an edited adapter, generated from its results file.

The card is a ``README.md`` with YAML front matter the Hub reads (``library_name: peft``,
``base_model``, ``tags``) and a body that says what was edited and how well: the method and its
resolved config, the edited facts, the metric table with protocol, metric version and seed, and the
lines that load the adapter (``import odedit_hf`` first: without it peft does not know odedit-hf's
PEFT types).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["FACTS_SHOWN", "adapter_protocol_problem", "edited_facts", "model_card", "resolve_base_model"]

#: How many edited facts the card lists (all of them are in ``edited_facts.json``).
FACTS_SHOWN = 20

_ACCURACY = (
    ("reliability", "reliability_em", "Reliability (image + question -> new answer)"),
    ("t_generality", "t_generality_em", "Text generality (rephrased question)"),
    ("m_generality", "m_generality_em", "Multimodal generality (another image)"),
)
_LOCALITY = (
    ("t_locality", "t_locality_easyedit", "Text locality (unrelated question)"),
    ("m_locality", "m_locality_easyedit", "Multimodal locality (unrelated image question)"),
)


def adapter_protocol_problem(protocol: str, n_edits: int, batch_size: int | None) -> str | None:
    """Why no single adapter of this run holds every edit (``None`` when one does).

    ``sequential`` keeps one adapter across the edits (and ``eval`` scores one adapter); ``single`` and
    ``batch`` roll the adapter back after each edit (batch), so an adapter of theirs holds every edit
    only when there is one edit (one batch).
    """
    if protocol in ("sequential", "eval"):
        return None
    if protocol == "single" and n_edits <= 1:
        return None
    if protocol == "batch" and (batch_size or 10) >= n_edits:
        return None
    detail = (
        f"--protocol single rolls the adapter back after each of the {n_edits} edits"
        if protocol == "single"
        else f"--protocol batch with --batch-size {batch_size or 10} rolls the adapter back after each batch "
        f"of the {n_edits} edits"
    )
    return (
        f"{detail}, so no adapter ever holds all of them; to save one adapter with every edit use "
        f"--protocol sequential (edits applied one after another) or --protocol batch --batch-size {n_edits} "
        "(all edits in one optimisation)"
    )


def edited_facts(requests: Sequence[Any]) -> list[dict[str, Any]]:
    """The facts a run edited, JSON-ready: ``case_id``, ``task``, ``src`` (the question), ``pred`` (the
    answer before), ``alt`` (the answer the edit teaches) and ``image`` (file name), per request."""
    return [
        {
            "case_id": r.case_id,
            "task": r.task,
            "src": r.src,
            "pred": r.pred,
            "alt": r.alt,
            "image": os.path.basename(r.image) if r.image else None,  # None: a text-only request
        }
        for r in requests
    ]


def _looks_like_hub_id(text: Any) -> bool:
    if not isinstance(text, str):
        return False
    parts = text.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not text.startswith((".", "~", "/"))
        and not os.path.exists(os.path.expanduser(text))
    )


def resolve_base_model(
    results: Mapping[str, Any] | None,
    adapter_config: Mapping[str, Any] | None = None,
    base_model: str | None = None,
) -> str | None:
    """The Hub id of the base model: ``base_model`` if given, else the results' ``config.base_model`` (the
    run's ``--base-model``), else its ``config.model`` or the adapter config's ``base_model_name_or_path``
    when either is a Hub id (not a local folder), else ``None``."""
    if base_model:
        return base_model
    config = (results or {}).get("config") or {}
    if config.get("base_model"):
        return str(config["base_model"])  # named by the run (--base-model)
    candidates = [config.get("model"), (adapter_config or {}).get("base_model_name_or_path")]
    for candidate in candidates:
        if _looks_like_hub_id(candidate):
            return candidate
    return None


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"


def _metric_table(results: Mapping[str, Any]) -> list[str]:
    aggregates = results.get("aggregates") or {}
    post, final = aggregates.get("post"), aggregates.get("final")
    if not post:
        return ["(the results file holds no aggregate scores)"]
    first = "with this adapter" if results.get("protocol") == "eval" else "right after each edit"
    columns = [(first, post)] + ([("on the final model", final)] if final else [])
    header = "| metric | " + " | ".join(f"{name}: accuracy / exact match" for name, _ in columns) + " |"
    lines = [header, "|---|" + "---|" * len(columns)]
    for acc, em, label in _ACCURACY:
        cells = [f"{_fmt(src.get(acc))} / {_fmt(src.get(em))}" for _, src in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| **locality** | " + " | ".join(f"{name}: answer / easyedit" for name, _ in columns) + " |")
    for answer, easy, label in _LOCALITY:
        cells = [f"{_fmt(src.get(answer))} / {_fmt(src.get(easy))}" for _, src in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _peft_types(adapter_config: Mapping[str, Any] | None) -> list[str]:
    if not adapter_config:
        return []
    types = [str(adapter_config.get("peft_type"))]
    editor = adapter_config.get("editor")
    if isinstance(editor, Mapping) and editor.get("peft_type"):
        types.append(str(editor["peft_type"]))
    return types


def _read_adapter_config(adapter_dir: str | None) -> dict[str, Any] | None:
    if not adapter_dir:
        return None
    path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def model_card(
    results: Mapping[str, Any],
    *,
    base_model: str | None = None,
    facts: Sequence[Mapping[str, Any]] | None = None,
    repo_id: str | None = None,
    adapter_dir: str | None = None,
    adapter_config: Mapping[str, Any] | None = None,
) -> str:
    """The ``README.md`` of an edited adapter.

    Args:
        results: the results file of the run that made the adapter (``odedit-hf edit --out``).
        base_model: the base model's Hub id (default: see :func:`resolve_base_model`); without one the
            front matter has no ``base_model`` and the card says how to set it.
        facts: the edited facts (:func:`edited_facts`); default: the count only.
        repo_id: the Hub repo the card is for (used in the loading snippet).
        adapter_dir: the adapter folder (its ``adapter_config.json`` names the PEFT types).
        adapter_config: the adapter config dict, instead of reading it from ``adapter_dir``.

    Raises:
        ValueError: ``results`` is not an odedit-hf results document.
    """
    if not isinstance(results, Mapping) or "method" not in results or "aggregates" not in results:
        raise ValueError(
            "model_card: results must be an odedit-hf results document (the JSON that 'odedit-hf edit --out' "
            "writes), with 'method' and 'aggregates'"
        )
    problem = adapter_protocol_problem(
        str(results.get("protocol")), int(results.get("n_edits") or 0), results.get("batch_size")
    )
    if problem is not None:
        raise ValueError(f"these results cannot describe one adapter: {problem}")
    adapter_config = adapter_config if adapter_config is not None else _read_adapter_config(adapter_dir)
    base = resolve_base_model(results, adapter_config, base_model)
    config = results.get("config") or {}
    method = str(results["method"])
    method_config = config.get("method")
    n_edits = results.get("n_edits", len(results.get("edits") or []))
    protocol = results.get("protocol")

    tags = ["odedit-hf", "knowledge-editing", "model-editing"]
    tags += [part for part in method.split("+") if part and part not in tags]
    front = ["---", "library_name: peft"]
    if base:
        front.append(f"base_model: {base}")
    front.append("tags:")
    front += [f"- {tag}" for tag in tags]
    front.append("---")

    target = repo_id or (os.path.abspath(adapter_dir) if adapter_dir else "PATH/TO/THIS/ADAPTER")
    model_class = config.get("model_class") or "AutoModelForImageTextToText"
    base_ref = base or "BASE_MODEL_ID_OR_FOLDER"
    types = _peft_types(adapter_config)
    ours = [t for t in types if not _is_stock(t)]
    register_note = (
        f"registers odedit-hf's PEFT type{'s' if len(ours) > 1 else ''} ({', '.join(ours)}) with peft"
        if ours
        else "registers odedit-hf's PEFT types with peft"
    )
    lines = [
        *front,
        "",
        f"# {repo_id.split('/')[-1] if repo_id else 'Edited adapter'}: {n_edits} fact{'s' if n_edits != 1 else ''} "
        f"edited with `{method}`",
        "",
        f"A PEFT adapter made by odedit-hf: it edits {n_edits} fact{'s' if n_edits != 1 else ''} inside "
        + (f"`{base}`" if base else "its base model")
        + f" with the method `{method}` under the `{protocol}` protocol. The base weights are unchanged: "
        "the edit is the adapter, and disabling it gives the base model back.",
        "",
        "## Load it",
        "",
        "```python",
        f"import odedit_hf  # noqa: F401  {register_note}: without it peft fails with KeyError",
        "from peft import PeftModel",
        f"from transformers import {model_class}",
        "",
        f'base_model = {model_class}.from_pretrained("{base_ref}")',
        f'model = PeftModel.from_pretrained(base_model, "{target}")',
        "```",
        "",
        "`pip install odedit-hf` provides `odedit_hf`. Where the edit's maths allows, `odedit-hf export` makes "
        "a plain artefact that needs no odedit-hf: a merged model always, a plain LoRA adapter for LoRA-based edits.",
    ]
    if not base:
        lines += [
            "",
            "The base model of this adapter is not recorded as a Hub id (it was a local folder); set it with "
            "`odedit-hf push ... --base-model ORG/NAME`.",
        ]
    lines += [
        "",
        "## Method",
        "",
        f"`{method}`, resolved configuration (every option, defaults included):",
        "",
    ]
    lines += [
        "```json",
        json.dumps(method_config, indent=2, sort_keys=True) if method_config else "{}",
        "```",
    ]

    lines += ["", "## Edited facts", ""]
    if facts:
        shown = list(facts)[:FACTS_SHOWN]
        lines += [
            "| case | question | answer before | answer after the edit | image |",
            "|---|---|---|---|---|",
        ]
        for fact in shown:
            lines.append(
                f"| {_cell(fact.get('case_id'))} | {_cell(fact.get('src'))} | {_cell(fact.get('pred'))} | "
                f"{_cell(fact.get('alt'))} | {_cell(fact.get('image', ''))} |"
            )
        if len(facts) > len(shown):
            lines += ["", f"The first {len(shown)} of {len(facts)} facts; all are in `edited_facts.json`."]
        else:
            lines += ["", "The same list is in `edited_facts.json`."]
    else:
        data = config.get("data_file") or config.get("data")
        lines.append(
            f"{n_edits} edit{'s' if n_edits != 1 else ''}"
            + (f" from `{os.path.basename(str(data))}`" if data else "")
            + "; the per-edit rows (by `case_id`) are in `odedit_results.json`."
        )

    env = results.get("environment") or {}
    rollback = results.get("rollback") or {}
    lines += [
        "",
        "## Measured scores",
        "",
        f"Protocol `{protocol}`, {n_edits} edits, seed {results.get('seed')}, metric version "
        f"{results.get('metric_version')}"
        + (f", batch size {results.get('batch_size')}" if protocol == "batch" else "")
        + ". Token accuracy over the target tokens (teacher-forced) with exact match beside it; locality is "
        "the agreement with the unedited model, `answer` (top-1 on the answer tokens) and `easyedit` (all "
        "positions, comparable with published tables).",
        "",
        *_metric_table(results),
        "",
    ]
    if protocol == "sequential":
        lines += [
            "Sequential protocol: every edit was applied to the same adapter, one after another; the last column "
            "scores each edit on the final model (this adapter), after all later edits.",
            "",
        ]
    if rollback.get("base_weights_hash"):
        lines.append(
            f"The base weights' hash ({rollback['base_weights_hash']}) was checked {rollback.get('checks')} times "
            "during the run, all equal."
        )
    if env:
        lines.append(
            "Measured with "
            + ", ".join(f"{k} {env[k]}" for k in ("odedit_hf", "torch", "transformers", "peft") if env.get(k))
            + (f" on {env['device']}" if env.get("device") else "")
            + ". The whole results file is `odedit_results.json`."
        )
    lines += [
        "",
        "## Limitations",
        "",
        "The scores above are measured on the edit records themselves and their rephrasings; an edit can fail "
        "on prompts unlike them, and locality is measured on one unrelated text and one unrelated image "
        "prompt per edit.",
        "",
    ]
    return "\n".join(lines)


def _is_stock(peft_type: str) -> bool:
    try:
        from odedit_hf.sharing.export import is_stock_peft_type

        return is_stock_peft_type(peft_type)
    except ImportError:  # pragma: no cover - peft missing
        return False

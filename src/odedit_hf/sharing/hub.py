"""Pushing an edited adapter to the Hub with its model card, results and edited facts."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from odedit_hf.editing.saving import ADAPTER_CONFIG, ADAPTER_WEIGHTS

from .card import model_card, resolve_base_model

logger = logging.getLogger(__name__)

__all__ = ["RESULTS_FILE", "FACTS_FILE", "check_repo_id", "push_adapter", "stage_adapter"]

#: The results file and the edited facts as saved next to an adapter (``odedit-hf edit --save-adapter``).
RESULTS_FILE = "odedit_results.json"
FACTS_FILE = "edited_facts.json"

_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def check_repo_id(repo_id: str) -> str:
    """Check a Hub repo id (``name`` or ``org/name``); return it.

    Raises:
        ValueError: not of that form, naming the part that is wrong.
    """
    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"a Hub repo id must be a non-empty string like 'user/my-edit', got {repo_id!r}")
    parts = repo_id.split("/")
    if len(parts) > 2 or any(not _REPO_PART.match(p) or ".." in p or p.endswith(".git") for p in parts):
        raise ValueError(
            f"{repo_id!r} is not a Hub repo id; write 'user/name' (letters, digits, '-', '_', '.'; at most one '/')"
        )
    return repo_id


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what} {path} cannot be read as JSON ({exc})") from None


def stage_adapter(
    adapter_dir: str,
    out: str,
    *,
    results: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    facts: Sequence[Mapping[str, Any]] | None = None,
    repo_id: str | None = None,
) -> str:
    """Write into ``out`` (an empty or new folder) what a push uploads: the adapter files, with
    ``base_model_name_or_path`` set to the base model's Hub id when known (a local path means nothing to
    others), the generated ``README.md``, the results and the edited facts.

    ``results`` and ``facts`` default to the adapter folder's ``odedit_results.json`` and ``edited_facts.json``.

    Raises:
        ValueError / AdapterLoadError: a broken adapter folder (named), or no results to build the card from.
    """
    from odedit_hf.editing.loading import check_adapter_folder

    adapter_config = check_adapter_folder(adapter_dir)
    if os.path.isdir(out) and os.listdir(out):
        raise ValueError(f"{out} is not empty; stage the upload into a new or empty folder")
    if results is None:
        path = os.path.join(adapter_dir, RESULTS_FILE)
        if not os.path.isfile(path):
            raise ValueError(
                f"{adapter_dir} holds no {RESULTS_FILE}, so there is nothing to build its model card from; pass the "
                "results file of the run that made it (odedit-hf push ... --results RESULTS.json)"
            )
        results = _read_json(path, "results file")
    if facts is None and os.path.isfile(os.path.join(adapter_dir, FACTS_FILE)):
        facts = _read_json(os.path.join(adapter_dir, FACTS_FILE), "edited-facts file")
    base = resolve_base_model(results, adapter_config, base_model)
    if base is None:
        logger.warning(
            "the model card names no base_model (the run used a local model folder); pass base_model= "
            "(--base-model ORG/NAME) to name its Hub id"
        )
    config = dict(adapter_config)
    if base is not None:
        config["base_model_name_or_path"] = base
        if isinstance(config.get("editor"), dict):
            config["editor"] = {**config["editor"], "base_model_name_or_path": base}
    os.makedirs(out, exist_ok=True)
    shutil.copyfile(os.path.join(adapter_dir, ADAPTER_WEIGHTS), os.path.join(out, ADAPTER_WEIGHTS))
    files: dict[str, str] = {
        ADAPTER_CONFIG: json.dumps(config, indent=2, sort_keys=True) + "\n",
        "README.md": model_card(
            results, base_model=base, facts=facts, repo_id=repo_id, adapter_config=config
        ),
        RESULTS_FILE: json.dumps(results, indent=2) + "\n",
    }
    if facts:
        files[FACTS_FILE] = json.dumps(list(facts), indent=2) + "\n"
    for name, text in files.items():
        with open(os.path.join(out, name), "w", encoding="utf-8") as fh:
            fh.write(text)
    return out


def push_adapter(
    adapter_dir: str,
    repo_id: str,
    *,
    results: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    facts: Sequence[Mapping[str, Any]] | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Push an adapter folder to the Hub repo ``repo_id`` (created if needed) with a generated model card.

    What is uploaded is :func:`stage_adapter`'s folder: the adapter (safetensors only), ``README.md``,
    ``odedit_results.json`` and ``edited_facts.json``. The token is ``token`` or huggingface_hub's own
    (``HF_TOKEN``, ``hf auth login``); the endpoint is huggingface_hub's (``HF_ENDPOINT``).

    Returns:
        The commit URL.

    Raises:
        ValueError: a bad repo id, a broken adapter folder, no results, or the Hub refused (its message).
    """
    check_repo_id(repo_id)
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory(prefix="odedit-hf-push-") as tmp:
        staged = stage_adapter(
            adapter_dir,
            os.path.join(tmp, "repo"),
            results=results,
            base_model=base_model,
            facts=facts,
            repo_id=repo_id,
        )
        api = HfApi(token=token)
        try:
            repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            commit = api.upload_folder(
                folder_path=staged,
                repo_id=getattr(repo, "repo_id", repo_id),
                repo_type="model",
                commit_message=commit_message or "Upload an odedit-hf edited adapter",
            )
        except Exception as exc:  # noqa: BLE001 - HTTP, auth, offline: one message that says what failed
            raise ValueError(
                f"pushing {adapter_dir} to the Hub repo {repo_id!r} failed ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); check the token (HF_TOKEN or 'hf auth login'), "
                "the network and HF_HUB_OFFLINE"
            ) from None
    return str(getattr(commit, "commit_url", commit))

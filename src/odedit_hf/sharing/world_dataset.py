"""The embedded world as a Hugging Face ``datasets`` dataset: stage, push, pull.

A world's data folder (``{evqa,eic}_{train,eval}.json`` + ``images/`` + ``world.json``, see
:func:`odedit_hf.data.world.export.export_world`) becomes one parquet dataset with three configs:

* ``evqa`` and ``eic`` -- the MMEdit records, splits ``train`` and ``eval``; the top-level image fields
  (``image``, ``image_rephrase``, ``m_loc``, ``hard_m_loc``) are ``datasets.Image`` features (the PNG
  bytes, with the file name kept as the image's ``path``); every other field keeps its JSON value;
* ``images`` -- every image of the world (``file_name``, ``image``), so probes that name an image inside
  a nested field (``portability``) resolve too.

``README.md`` is a dataset card whose ``configs`` front matter lets ``datasets.load_dataset(REPO_ID,
"evqa")`` read it without odedit-hf; ``odedit_world.json`` lists the files and the world's identity.
:func:`pull_world_dataset` turns a pushed repo (or a staged folder) back into a world data folder that
``odedit-hf edit --data FOLDER/evqa_eval.json`` reads -- record for record what was pushed (checked at
staging time: a record that would not come back unchanged is an error, not a silent difference).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_COLUMNS",
    "WORLD_MANIFEST",
    "pull_world_dataset",
    "push_world_dataset",
    "stage_world_dataset",
    "world_record_files",
]

WORLD_MANIFEST = "odedit_world.json"
#: Top-level record fields that name an image (relative to the world's ``images/`` folder).
IMAGE_COLUMNS = ("image", "image_rephrase", "m_loc", "hard_m_loc")
_TASKS = ("evqa", "eic")
_SPLITS = ("train", "eval")
_IMAGES = "images"
_FORMAT = 1


def world_record_files(data_dir: str) -> dict[tuple[str, str], str]:
    """The record files of a world data folder, keyed by ``(task, split)``.

    Raises:
        ValueError: the folder is not a world data folder (what is missing, and where to find one).
    """
    data_dir = os.path.abspath(data_dir)
    missing = [
        f"{task}_{split}.json"
        for task in _TASKS
        for split in _SPLITS
        if not os.path.isfile(os.path.join(data_dir, f"{task}_{split}.json"))
    ]
    if not os.path.isfile(os.path.join(data_dir, "world.json")):
        missing.append("world.json")
    if not os.path.isdir(os.path.join(data_dir, _IMAGES)):
        missing.append(f"{_IMAGES}/")
    if missing:
        raise ValueError(
            f"{data_dir} is not a world data folder (missing {', '.join(missing)}); pass the 'data' folder "
            "of a built world (odedit-hf world build prints it) or --preset/--seed"
        )
    return {(t, s): os.path.join(data_dir, f"{t}_{s}.json") for t in _TASKS for s in _SPLITS}


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} cannot be read as JSON ({exc})") from None


def _strip_none(value: Any) -> Any:
    """Drop the ``None`` members arrow adds when it unifies the keys of nested dicts across rows."""
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_none(v) for v in value]
    return value


def _canonical_order(sequences: list[list[str]]) -> list[str]:
    """One key order consistent with every sequence (each record writes its keys in the exporter's fixed
    order, some keys absent): a topological sort of the "a came before b" pairs, ties by first appearance."""
    first: dict[str, int] = {}
    after: dict[str, set[str]] = {}
    for seq in sequences:
        for i, key in enumerate(seq):
            first.setdefault(key, len(first))
            after.setdefault(key, set())
            for later in seq[i + 1 :]:
                after[key].add(later)
    indegree = {k: 0 for k in first}
    for laters in after.values():
        for later in laters:
            indegree[later] += 1
    order: list[str] = []
    ready = sorted((k for k, d in indegree.items() if d == 0), key=first.__getitem__)
    while ready:
        key = ready.pop(0)
        order.append(key)
        for later in after[key]:
            indegree[later] -= 1
            if indegree[later] == 0:
                ready.append(later)
        ready.sort(key=first.__getitem__)
    # keys written in contradicting orders (a cycle): the rest by first appearance
    order += sorted((k for k in first if k not in order), key=first.__getitem__)
    return order


def _key_orders(records: list[dict]) -> dict[str, list[str]]:
    """The key order of the records (``""``) and of each dict-valued field, as written in the file:
    arrow unifies the keys of nested dicts in its own order, and the pull puts them back."""
    top: list[list[str]] = []
    nested: dict[str, list[list[str]]] = {}
    for record in records:
        top.append(list(record))
        for key, value in record.items():
            if isinstance(value, dict):
                nested.setdefault(key, []).append(list(value))
    return {"": _canonical_order(top), **{k: _canonical_order(v) for k, v in nested.items()}}


def _reorder(value: dict, order: list[str]) -> dict:
    rank = {k: i for i, k in enumerate(order)}
    return {k: value[k] for k in sorted(value, key=lambda k: rank.get(k, len(rank)))}


def _image_cell(image_root: str, name: Any, where: str) -> dict[str, Any] | None:
    if name is None:
        return None
    path = os.path.join(image_root, str(name))
    if not os.path.isfile(path):
        raise ValueError(f"{where} names the image {name!r}, which is not in {image_root}")
    with open(path, "rb") as fh:
        return {"bytes": fh.read(), "path": str(name)}


def _record_dataset(records: list[dict], image_root: str, source: str):
    import datasets

    rows = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{source}: record {i} is a {type(record).__name__}, not an object")
        row = dict(record)
        for col in IMAGE_COLUMNS:
            if col in row:
                row[col] = _image_cell(image_root, row[col], f"{source}: record {i}, field {col!r}")
        rows.append(row)
    ds = datasets.Dataset.from_list(rows)
    for col in IMAGE_COLUMNS:
        if col in ds.column_names:
            ds = ds.cast_column(col, datasets.Image())
    return ds


def _records_from_table(ds, orders: Mapping[str, list[str]] | None = None) -> list[dict]:
    import datasets

    for col in IMAGE_COLUMNS:
        if col in ds.column_names:
            ds = ds.cast_column(col, datasets.Image(decode=False))
    out = []
    for row in ds:
        record = {}
        for key, value in row.items():
            if key in IMAGE_COLUMNS and isinstance(value, Mapping):
                record[key] = value.get("path")
            else:
                record[key] = value
        record = _strip_none(record)
        if orders:
            record = {
                k: _reorder(v, orders[k]) if isinstance(v, dict) and k in orders else v
                for k, v in record.items()
            }
            record = _reorder(record, orders.get("", []))
        out.append(record)
    return out


class _quiet_datasets:
    """Hide ``datasets``' per-file progress bars for the duration (restored afterwards)."""

    def __enter__(self):
        from datasets.utils import logging as ds_logging

        self._was = ds_logging.is_progress_bar_enabled()
        ds_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        from datasets.utils import logging as ds_logging

        if self._was:
            ds_logging.enable_progress_bar()


def _card(manifest: Mapping[str, Any]) -> str:
    configs = []
    for task in _TASKS:
        configs.append(
            {
                "config_name": task,
                "data_files": [{"split": s, "path": f"{task}/{s}-00000-of-00001.parquet"} for s in _SPLITS],
                **({"default": True} if task == "evqa" else {}),
            }
        )
    configs.append(
        {
            "config_name": "images",
            "data_files": [{"split": "train", "path": "images/train-00000-of-00001.parquet"}],
        }
    )
    front = {
        "license": "apache-2.0",
        "tags": ["odedit-hf", "knowledge-editing", "multimodal", "synthetic"],
        "pretty_name": f"odedit-hf embedded world ({manifest['preset']}, seed {manifest['seed']})",
        "configs": configs,
    }
    counts = "\n".join(
        f"| {task} | {split} | {manifest['records'][f'{task}/{split}']} |"
        for task in _TASKS
        for split in _SPLITS
    )
    return (
        "---\n"
        + json.dumps(front, indent=1)  # JSON is YAML: no extra dependency, and the Hub reads it
        + "\n---\n\n"
        + f"# {front['pretty_name']}\n\n"
        "The synthetic multimodal world that [odedit-hf](https://github.com/odedit-hf) builds offline to "
        "measure knowledge edits: MMEdit-style records (E-VQA and E-IC) with text and image rephrases, "
        "text and multimodal locality probes, portability and hard-negative locality probes.\n\n"
        f"World version {manifest['world_version']} (content version {manifest['content_version']}), "
        f"preset `{manifest['preset']}`, seed {manifest['seed']}; {manifest['images']} images.\n\n"
        "| config | split | records |\n|---|---|---|\n" + counts + "\n\n"
        "## Loading\n\n"
        '```python\nimport datasets\nvqa = datasets.load_dataset(REPO_ID, "evqa", split="eval")\n```\n\n'
        "Back to the world folder the library edits with (records byte-for-byte as pushed):\n\n"
        "```bash\nodedit-hf world pull REPO_ID ./world-data\n"
        "odedit-hf edit --model MODEL --data ./world-data/evqa_eval.json --method ftl\n```\n"
    )


def stage_world_dataset(data_dir: str, out: str) -> str:
    """Write the dataset a push uploads into ``out`` (a new or empty folder); return ``out``.

    Raises:
        ValueError: ``data_dir`` is not a world data folder, ``out`` is not empty, or a record would not
            come back unchanged from the parquet files.
    """
    with _quiet_datasets():
        return _stage(data_dir, out)


def _stage(data_dir: str, out: str) -> str:
    import datasets

    files = world_record_files(data_dir)
    data_dir = os.path.abspath(data_dir)
    image_root = os.path.join(data_dir, _IMAGES)
    if os.path.isdir(out) and os.listdir(out):
        raise ValueError(f"{out} is not empty; stage the world dataset into a new or empty folder")
    world = _read_json(os.path.join(data_dir, "world.json"))
    os.makedirs(out, exist_ok=True)
    records: dict[str, int] = {}
    key_orders: dict[str, dict[str, list[str]]] = {}
    for (task, split), path in files.items():
        original = _read_json(path)
        if not isinstance(original, list):
            raise ValueError(f"{path} holds a {type(original).__name__}, not a list of records")
        ds = _record_dataset(original, image_root, path)
        target = os.path.join(out, task, f"{split}-00000-of-00001.parquet")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        ds.to_parquet(target)
        key_orders[f"{task}/{split}"] = _key_orders(original)
        back = _records_from_table(datasets.Dataset.from_parquet(target), key_orders[f"{task}/{split}"])
        for i, (a, b) in enumerate(zip(original, back, strict=True)):
            if a != b:
                keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                raise ValueError(
                    f"{path}: record {i} would not come back unchanged from parquet (fields {keys}); "
                    "null values inside records are not supported"
                )
        records[f"{task}/{split}"] = len(original)
    names = sorted(n for n in os.listdir(image_root) if n.lower().endswith(".png"))
    images = datasets.Dataset.from_list(
        [{"file_name": n, "image": _image_cell(image_root, n, "images/")} for n in names]
    ).cast_column("image", datasets.Image())
    os.makedirs(os.path.join(out, _IMAGES), exist_ok=True)
    images.to_parquet(os.path.join(out, _IMAGES, "train-00000-of-00001.parquet"))
    manifest = {
        "format": _FORMAT,
        "world_version": str(world.get("world_version")),
        "content_version": str(world.get("content_version")),
        "preset": world.get("preset"),
        "seed": world.get("seed"),
        "records": records,
        "images": len(names),
        "key_order": key_orders,
        "files": sorted(
            os.path.relpath(os.path.join(root, f), out).replace(os.sep, "/")
            for root, _, fs in os.walk(out)
            for f in fs
        )
        + ["world.json"],
    }
    shutil.copyfile(os.path.join(data_dir, "world.json"), os.path.join(out, "world.json"))
    with open(os.path.join(out, WORLD_MANIFEST), "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
        fh.write("\n")
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as fh:
        fh.write(_card(manifest))
    return out


def push_world_dataset(
    data_dir: str,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Push a world data folder to the Hub dataset repo ``repo_id`` (created if needed); return the commit URL.

    The token and endpoint are huggingface_hub's own (``HF_TOKEN`` / ``hf auth login``, ``HF_ENDPOINT``).

    Raises:
        ValueError: a bad repo id or world folder, or the Hub refused (its message).
    """
    from huggingface_hub import HfApi

    from .hub import check_repo_id

    check_repo_id(repo_id)
    with tempfile.TemporaryDirectory(prefix="odedit-hf-world-") as tmp:
        staged = stage_world_dataset(data_dir, os.path.join(tmp, "repo"))
        api = HfApi(token=token)
        try:
            repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="dataset")
            commit = api.upload_folder(
                folder_path=staged,
                repo_id=getattr(repo, "repo_id", repo_id),
                repo_type="dataset",
                commit_message=commit_message or "Upload an odedit-hf embedded world",
            )
        except Exception as exc:  # noqa: BLE001 - HTTP, auth, offline: one message that says what failed
            raise ValueError(
                f"pushing the world at {data_dir} to the Hub dataset {repo_id!r} failed ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); check the token (HF_TOKEN or 'hf auth login'), "
                "the network and HF_HUB_OFFLINE"
            ) from None
    return str(getattr(commit, "commit_url", commit))


def _fetch(source: str, revision: str | None, token: str | None, tmp: str) -> str:
    """A local folder holding the staged dataset: ``source`` itself, or a download of the repo."""
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, WORLD_MANIFEST)):
            raise ValueError(
                f"{source} holds no {WORLD_MANIFEST}; it is not a staged odedit-hf world dataset"
            )
        return source
    from huggingface_hub import hf_hub_download

    from .hub import check_repo_id

    check_repo_id(source)
    try:
        manifest_path = hf_hub_download(
            source, WORLD_MANIFEST, repo_type="dataset", revision=revision, token=token, local_dir=tmp
        )
        manifest = _read_json(manifest_path)
        for name in manifest.get("files", []):
            hf_hub_download(source, name, repo_type="dataset", revision=revision, token=token, local_dir=tmp)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ValueError(
            f"downloading the world dataset {source!r} failed ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); is it an odedit-hf world dataset (pushed with "
            "odedit-hf world push)? Check the repo id, HF_TOKEN for a private repo, and HF_HUB_OFFLINE"
        ) from None
    return tmp


def pull_world_dataset(
    source: str, out: str, *, revision: str | None = None, token: str | None = None
) -> str:
    """Rebuild a world data folder at ``out`` (must not exist, or be empty) from a Hub dataset repo id or a
    staged folder; return ``out``. ``odedit-hf edit --data OUT/evqa_eval.json`` then reads it.

    The folder is written next to ``out`` and renamed into place when complete, so an interrupted pull
    leaves no half-written world.

    Raises:
        ValueError: ``out`` is not empty, or the source is not an odedit-hf world dataset.
    """
    with _quiet_datasets():
        return _pull(source, out, revision, token)


def _pull(source: str, out: str, revision: str | None, token: str | None) -> str:
    import datasets

    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"{out} exists and is not an empty folder; pull into a new folder")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="odedit-hf-pull-") as tmp:
        staged = _fetch(source, revision, token, tmp)
        manifest = _read_json(os.path.join(staged, WORLD_MANIFEST))
        if manifest.get("format") != _FORMAT:
            raise ValueError(
                f"{source}: world dataset format {manifest.get('format')!r}, this odedit-hf reads {_FORMAT}; "
                "upgrade odedit-hf"
            )
        build = tempfile.mkdtemp(prefix=".pull-", dir=parent)
        try:
            os.makedirs(os.path.join(build, _IMAGES))
            images = datasets.Dataset.from_parquet(
                os.path.join(staged, _IMAGES, "train-00000-of-00001.parquet")
            ).cast_column("image", datasets.Image(decode=False))
            for row in images:
                name = os.path.basename(row["file_name"])
                with open(os.path.join(build, _IMAGES, name), "wb") as fh:
                    fh.write(row["image"]["bytes"])
            from odedit_hf.data.world.export import _json_bytes

            for task in _TASKS:
                for split in _SPLITS:
                    table = datasets.Dataset.from_parquet(
                        os.path.join(staged, task, f"{split}-00000-of-00001.parquet")
                    )
                    with open(os.path.join(build, f"{task}_{split}.json"), "wb") as fh:
                        orders = manifest.get("key_order", {}).get(f"{task}/{split}")
                        fh.write(_json_bytes(_records_from_table(table, orders)))
            shutil.copyfile(os.path.join(staged, "world.json"), os.path.join(build, "world.json"))
            if os.path.isdir(out):
                os.rmdir(out)  # empty, checked above
            os.replace(build, out)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
    logger.info("pulled the world dataset %s into %s", source, out)
    return out

"""The embedded world as a ``datasets`` dataset: staged and pulled back byte for byte, readable by stock
``datasets.load_dataset`` through its card, pushed to a fake Hub and pulled back by repo id, and the
refusals (a non-world folder, a non-empty target, a record that would not come back unchanged)."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys

import pytest

from odedit_hf.cli.main import main
from odedit_hf.sharing.world_dataset import (
    IMAGE_COLUMNS,
    WORLD_MANIFEST,
    pull_world_dataset,
    stage_world_dataset,
)

from ._fake_hub import FakeHub

REPO = "user/odedit-world"


def _same_tree(a: str, b: str) -> list[str]:
    """Paths that differ between two folders (missing on either side, or different bytes)."""
    cmp = filecmp.dircmp(a, b)
    out = [*cmp.left_only, *cmp.right_only, *cmp.funny_files]
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    out += mismatch + errors
    for sub in cmp.common_dirs:
        out += [f"{sub}/{p}" for p in _same_tree(os.path.join(a, sub), os.path.join(b, sub))]
    return out


@pytest.fixture(scope="module")
def staged(micro_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("world-dataset") / "stage"
    return micro_world.data_dir, str(stage_world_dataset(micro_world.data_dir, str(out)))


def test_a_staged_world_pulls_back_byte_for_byte(staged, tmp_path):
    data_dir, stage = staged
    out = pull_world_dataset(stage, str(tmp_path / "pulled"))
    assert _same_tree(data_dir, out) == []
    # and the pulled folder is something the loader edits with (images resolved next to the file)
    from odedit_hf.data import load_mmedit

    requests = load_mmedit(os.path.join(out, "evqa_eval.json"), image_root=os.path.join(out, "images"))
    assert len(requests) == len(json.load(open(os.path.join(data_dir, "evqa_eval.json"))))
    assert requests[0].load_image().size[0] > 0


def test_stock_datasets_reads_the_card_configs_with_image_features(staged):
    import datasets

    data_dir, stage = staged
    records = json.load(open(os.path.join(data_dir, "eic_train.json")))
    ds = datasets.load_dataset(stage, "eic", split="train")
    assert ds.num_rows == len(records)
    for col in IMAGE_COLUMNS:
        assert isinstance(ds.features[col], datasets.Image), col
    assert ds[0]["src"] == records[0]["src"] and ds[0]["pred"] == records[0]["pred"]
    first = datasets.load_dataset(stage, "eic", split="train").cast_column(
        "image", datasets.Image(decode=False)
    )
    with open(os.path.join(data_dir, "images", records[0]["image"]), "rb") as fh:
        assert first[0]["image"]["bytes"] == fh.read()  # the PNG itself, not a re-encoding
    images = datasets.load_dataset(stage, "images", split="train")
    assert images.num_rows == len(os.listdir(os.path.join(data_dir, "images")))
    manifest = json.load(open(os.path.join(stage, WORLD_MANIFEST)))
    assert manifest["records"]["eic/train"] == len(records)
    assert manifest["preset"] == "micro"


def test_push_to_a_fake_hub_and_pull_back_by_repo_id(staged, tmp_path):
    data_dir, _ = staged
    script = (
        "import sys; from odedit_hf.cli.main import main; "
        "sys.exit(main(['world', 'push', sys.argv[1], '--data-dir', sys.argv[2]]) or "
        "main(['world', 'pull', sys.argv[1], sys.argv[3]]))"
    )
    with FakeHub() as hub:
        out = subprocess.run(
            [sys.executable, "-c", script, REPO, data_dir, str(tmp_path / "pulled")],
            capture_output=True,
            text=True,
            timeout=300,
            env=hub.env(tmp_path),
        )
    assert out.returncode == 0, out.stderr[-3000:]
    pushed = {path for (repo, path) in hub.files if repo == f"datasets/{REPO}"}
    assert {"README.md", WORLD_MANIFEST, "world.json", "evqa/eval-00000-of-00001.parquet"} <= pushed
    assert not any(repo == REPO for (repo, _) in hub.files)  # a dataset repo, not a model repo
    assert any("/datasets/" in path and "/resolve/" in path for method, path in hub.calls if method == "GET")
    assert _same_tree(data_dir, str(tmp_path / "pulled")) == []
    card = hub.files[(f"datasets/{REPO}", "README.md")].decode()
    assert '"config_name": "evqa"' in card and "odedit-hf world pull" in card


def test_pull_never_writes_into_a_non_empty_folder(staged, tmp_path):
    _, stage = staged
    target = tmp_path / "mine"
    target.mkdir()
    (target / "thesis.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an empty folder"):
        pull_world_dataset(stage, str(target))
    assert os.listdir(target) == ["thesis.txt"] and (target / "thesis.txt").read_text() == "keep me"
    assert [p for p in os.listdir(tmp_path) if p.startswith(".pull-")] == []


def test_stage_refuses_a_folder_that_is_not_a_world(tmp_path, capsys):
    (tmp_path / "evqa_eval.json").write_text("[]")
    with pytest.raises(ValueError, match=r"not a world data folder \(missing .*eic_train.json"):
        stage_world_dataset(str(tmp_path), str(tmp_path / "out"))
    assert main(["world", "push", REPO, "--data-dir", str(tmp_path), "--stage", str(tmp_path / "s")]) == 2
    assert "not a world data folder" in capsys.readouterr().err


def test_a_record_that_would_not_come_back_unchanged_is_an_error(micro_world, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(micro_world.data_dir, copy)
    path = copy / "evqa_train.json"
    records = json.load(open(path))
    records[0]["portability"] = {"note": None}  # arrow cannot tell this null from an absent key
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError, match=r"evqa_train.json: record 0 would not come back unchanged"):
        stage_world_dataset(str(copy), str(tmp_path / "out"))


def test_world_push_stage_without_a_built_world_says_how_to_build_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ODEDIT_HF_CACHE", str(tmp_path / "empty-cache"))
    assert (
        main(["world", "push", REPO, "--preset", "micro", "--seed", "7", "--stage", str(tmp_path / "s")]) == 2
    )
    err = capsys.readouterr().err
    assert "odedit-hf world build --preset micro --seed 7" in err
    assert not (tmp_path / "s").exists()

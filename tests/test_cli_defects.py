"""The defects a new user hit (issue 16), each with the test that reproduces it.

Each test failed on the code before its fix (commit 2253a25): the reproduction is the issue's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import stat
import warnings

import pytest

from odedit_hf.cli.main import main
from odedit_hf.testing import tiny_backbone
from odedit_hf.testing.tiny import tiny_image

WORDS = ["what is the capital of France? Tokyo Paris London", "which animal is this? a red square blue yes"]
RECORD = {
    "src": "what is the capital of France?",
    "pred": "Paris",
    "alt": "Tokyo",
    "image": "img0.png",
    "rephrase": "which animal is this?",
    "image_rephrase": "img1.png",
    "loc": "what is the capital of France?",
    "loc_ans": "Paris",
    "m_loc": "img1.png",
    "m_loc_q": "which animal is this?",
    "m_loc_a": "a red square",
}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    backbone = tiny_backbone("llava", seed=0, texts=WORDS)
    backbone.model.save_pretrained(folder)
    backbone.processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    for i in range(2):
        tiny_image(i).save(folder / f"img{i}.png")
    path = folder / "edits.json"
    path.write_text(json.dumps([RECORD, {**RECORD, "alt": "London"}, {**RECORD, "alt": "yes"}]))
    return str(path)


def _edit(model, data, *extra):
    return ["edit", "--model", model, "--data", data, "--no-progress", "--lora.steps", "2", *extra]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the command gets as far as loading the model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded: the error should have come before")

    monkeypatch.setattr("odedit_hf.cli.edit.load_backbone", refuse)


# ----------------------------------------------------------------- 1. --save-adapter and user files
def test_save_adapter_never_empties_a_folder_of_user_files(
    tiny_model_dir, data_file, tmp_path, capsys, no_model_load
):
    important = tmp_path / "danger" / "important"
    important.mkdir(parents=True)
    (important / "thesis.txt").write_text("years of work")
    (important / "notes.txt").write_text("more")
    argv = _edit(tiny_model_dir, data_file, "--method", "lora", "--protocol", "sequential", "--n", "1")
    for extra in ([], ["--overwrite"]):  # not even --overwrite deletes files that are not an adapter's
        rc = main([*argv, "--save-adapter", str(important), "--out", str(tmp_path / "r.json"), *extra])
        assert rc == 2
        err = capsys.readouterr().err
        assert "not empty" in err and "thesis.txt" in err and "nothing in it was touched" in err
        assert sorted(os.listdir(important)) == ["notes.txt", "thesis.txt"]
        assert (important / "thesis.txt").read_text() == "years of work"
    assert not (tmp_path / "r.json").exists()


def test_save_adapter_replaces_an_adapter_folder_only_with_overwrite(
    tiny_model_dir, data_file, tmp_path, capsys
):
    target = tmp_path / "adapter"
    argv = _edit(tiny_model_dir, data_file, "--method", "lora", "--protocol", "sequential", "--n", "1")
    argv += ["--save-adapter", str(target), "--out", str(tmp_path / "r.json")]
    assert main(argv) == 0
    first = (target / "adapter_model.safetensors").read_bytes()
    assert {"adapter_config.json", "README.md", "odedit_results.json", "edited_facts.json"} <= set(
        os.listdir(target)
    )
    capsys.readouterr()
    assert main([*argv, "--seed", "3"]) == 2  # an adapter is there: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert (target / "adapter_model.safetensors").read_bytes() == first
    assert main([*argv, "--seed", "3", "--overwrite"]) == 0
    assert json.loads((target / "odedit_results.json").read_text())["seed"] == 3


# ----------------------------------------------------------------- 2. --save-adapter holds every edit
@pytest.mark.parametrize(
    ("protocol", "extra", "message"),
    [
        ("single", [], "--protocol single rolls the adapter back after each of the 3 edits"),
        ("batch", ["--batch-size", "2"], "rolls the adapter back after each batch"),
    ],
)
def test_save_adapter_refuses_a_protocol_that_rolls_edits_back(
    tiny_model_dir, data_file, tmp_path, capsys, no_model_load, protocol, extra, message
):
    argv = _edit(tiny_model_dir, data_file, "--method", "lora", "--protocol", protocol, "--n", "3", *extra)
    rc = main([*argv, "--save-adapter", str(tmp_path / "a"), "--out", str(tmp_path / "r.json")])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "--protocol sequential" in err and "--batch-size 3" in err
    assert not (tmp_path / "a").exists()


def test_a_saved_batch_adapter_holds_every_edit_of_the_run(tiny_model_dir, data_file, tmp_path):
    """The issue's case: batch of 6 in batches of 3 saved only cases 3-5. Now a batch adapter is saved
    only when one batch holds every edit, and scoring it again gives the run's own scores for all edits."""
    adapter, out, scored = tmp_path / "a", tmp_path / "r.json", tmp_path / "e.json"
    argv = _edit(tiny_model_dir, data_file, "--method", "lora", "--protocol", "batch", "--batch-size", "3")
    argv += ["--n", "3", "--lora.steps", "15", "--lora.stop-loss", "none"]
    assert main([*argv, "--save-adapter", str(adapter), "--out", str(out)]) == 0
    run = json.loads(out.read_text())
    argv = ["eval", "--adapter", str(adapter), "--model", tiny_model_dir, "--data", data_file, "--n", "3"]
    assert main([*argv, "--out", str(scored), "--no-progress"]) == 0
    again = json.loads(scored.read_text())
    assert [row["post"] for row in again["edits"]] == [row["post"] for row in run["edits"]]


# ----------------------------------------------------------------- 3. --out checked before the model loads
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: str(tmp / "adir"), "is a folder"),
        (lambda tmp: "/proc/r.json", "cannot write in /proc"),
        (lambda tmp: str(tmp / "afile" / "r.json"), "is a file, not a folder"),
    ],
)
def test_a_bad_out_is_reported_before_the_model_loads(
    tiny_model_dir, data_file, tmp_path, capsys, no_model_load, make, message
):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    rc = main([*_edit(tiny_model_dir, data_file, "--method", "lora", "--n", "1"), "--out", make(tmp_path)])
    assert rc == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------- 4. model weights
def _model_copy(tiny_model_dir, tmp_path, keep_weights: bool):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    if not keep_weights:
        os.remove(folder / "model.safetensors")
    return folder


def test_a_model_with_only_pickle_weights_is_a_clear_error(tiny_model_dir, data_file, tmp_path, capsys):
    folder = _model_copy(tiny_model_dir, tmp_path, keep_weights=False)
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    rc = main(
        [*_edit(str(folder), data_file, "--method", "lora", "--n", "1"), "--out", str(tmp_path / "r.json")]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "pytorch_model.bin" in err and "safetensors" in err and "Traceback" not in err


def test_a_truncated_safetensors_file_is_named(tiny_model_dir, data_file, tmp_path, capsys):
    folder = _model_copy(tiny_model_dir, tmp_path, keep_weights=True)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    rc = main(
        [*_edit(str(folder), data_file, "--method", "lora", "--n", "1"), "--out", str(tmp_path / "r.json")]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert str(weights) in err and "truncated or corrupt" in err


def test_a_folder_without_config_json_says_so(tmp_path, data_file, capsys):
    world = tmp_path / "world"
    (world / "model").mkdir(parents=True)
    (world / "world_info.json").write_text("{}")
    rc = main(
        [*_edit(str(world), data_file, "--method", "lora", "--n", "1"), "--out", str(tmp_path / "r.json")]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "no config.json" in err and "model_type" not in err
    assert str(world / "model") in err  # a world folder: points at its model


# ----------------------------------------------------------------- 5. adapters: safetensors only, files named
@pytest.fixture(scope="module")
def saved_lora(tmp_path_factory):
    from peft import get_peft_model

    from odedit_hf.editors.lora import lora_config_for

    backbone = tiny_backbone("llava", seed=0, texts=WORDS)
    folder = tmp_path_factory.mktemp("lora") / "adapter"
    get_peft_model(backbone.model, lora_config_for(backbone, rank=2)).save_pretrained(folder)
    return folder


def test_load_adapter_refuses_a_pickle_adapter(saved_lora, tmp_path):
    from odedit_hf.editing import AdapterLoadError, load_adapter

    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(saved_lora / "adapter_config.json", folder)
    (folder / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterLoadError, match=r"adapter_model\.bin.*arbitrary code"):
        load_adapter(tiny_backbone("llava", seed=0, texts=WORDS).model, folder)


def test_load_adapter_names_a_corrupt_weights_file(saved_lora, tmp_path):
    from odedit_hf.editing import AdapterLoadError, load_adapter

    folder = tmp_path / "corrupt"
    shutil.copytree(saved_lora, folder)
    (folder / "adapter_model.safetensors").write_bytes(b"\xff" * 64)  # the "header too large"
    with pytest.raises(AdapterLoadError) as info:
        load_adapter(tiny_backbone("llava", seed=0, texts=WORDS).model, folder)
    assert str(folder / "adapter_model.safetensors") in str(info.value)


def test_load_adapter_loads_a_good_adapter_onto_a_fresh_model_only(saved_lora):
    import torch

    from odedit_hf.editing import AdapterLoadError, load_adapter

    model = tiny_backbone("llava", seed=0, texts=WORDS).model
    peft_model = load_adapter(model, saved_lora)
    assert set(peft_model.peft_config) == {"default"}
    assert all(not p.requires_grad for p in peft_model.parameters()) and isinstance(
        peft_model, torch.nn.Module
    )
    with pytest.raises(AdapterLoadError, match="already carries PEFT adapters"):
        load_adapter(model, saved_lora)


# ----------------------------------------------------------------- 7. the rest of the noise
def _namespace(data_file, **kw):
    base = dict(
        data=data_file, image_root=None, rephrase_image_root=None, task="auto", skip_invalid=False, n=None
    )
    return argparse.Namespace(**{**base, **kw})


def test_n_beyond_the_file_warns(data_file, capsys):
    from odedit_hf.cli.edit import load_requests

    requests, _ = load_requests(_namespace(data_file, n=100))
    assert len(requests) == 3
    assert "--n 100 asked for 100 edits, but" in capsys.readouterr().err


def test_a_skipped_record_is_reported_once_and_kept_in_the_results(data_file, tmp_path, capsys, caplog):
    from odedit_hf.cli.edit import load_requests

    path = tmp_path / "bad.json"
    path.write_text(json.dumps([RECORD, {**RECORD, "alt": ""}]))
    shutil.copy(os.path.join(os.path.dirname(data_file), "img0.png"), tmp_path)
    shutil.copy(os.path.join(os.path.dirname(data_file), "img1.png"), tmp_path)
    with caplog.at_level(logging.WARNING):
        requests, notes = load_requests(_namespace(str(path), skip_invalid=True))
    err = capsys.readouterr().err
    assert len(requests) == 1 and notes["skipped"] == 1 and len(notes["skip_reasons"]) == 1
    assert err.count("skipped 1 invalid record") == 1 and "config.skip_reasons" in err
    assert "dataset.skip_reasons" not in err + caplog.text
    assert "skipped" not in caplog.text  # the loader's own warning is not repeated


def test_files_respect_the_umask(saved_lora, tmp_path):
    from peft import PeftModel

    from odedit_hf.editing.saving import save_adapter
    from odedit_hf.evaluation import write_json_atomic

    def mode(path):
        return stat.S_IMODE(os.stat(path).st_mode)

    peft_model = PeftModel.from_pretrained(tiny_backbone("llava", seed=0, texts=WORDS).model, str(saved_lora))
    old = os.umask(0o022)
    try:
        results = write_json_atomic(tmp_path / "r.json", {"a": 1})
        adapter = save_adapter(peft_model, tmp_path / "shared")
        assert mode(results) == 0o644
        assert mode(adapter) == 0o755
        assert {mode(os.path.join(adapter, f)) for f in os.listdir(adapter)} == {0o644}
        os.umask(0o077)
        assert mode(write_json_atomic(tmp_path / "private.json", {"a": 1})) == 0o600
    finally:
        os.umask(old)


def test_the_is_gradient_checkpointing_warning_is_silenced_precisely():
    from peft import get_peft_model

    from odedit_hf.cli.edit import quiet_known_warnings
    from odedit_hf.editors.lora import lora_config_for

    backbone = tiny_backbone("llava", seed=0, texts=WORDS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_known_warnings():
            get_peft_model(backbone.model, lora_config_for(backbone, rank=2))
            warnings.warn("another FutureWarning", FutureWarning, stacklevel=1)  # not ours to hide
    messages = [str(w.message) for w in caught]
    assert not any("is_gradient_checkpointing" in m for m in messages)
    assert "another FutureWarning" in messages


def test_an_edit_run_prints_no_future_warning(tiny_model_dir, data_file, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main(
            [
                *_edit(tiny_model_dir, data_file, "--method", "lora", "--n", "1"),
                "--out",
                str(tmp_path / "r.json"),
            ]
        )
    assert rc == 0
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_world_messages_speak_the_command_line(tmp_path):
    from odedit_hf.cli.world import format_table
    from odedit_hf.data.world import build_world
    from odedit_hf.data.world.build import World

    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "world_info.json").write_text(json.dumps({"world_version": "0", "preset": "micro", "seed": 9}))
    with pytest.raises(ValueError, match="--force"):
        build_world("micro", 0, out=folder, progress=False)
    world = World(
        root="r", model_dir="m", data_dir="d", image_root="i", rephrase_image_root="i", vqa_train="a",
        vqa_eval="b", caption_train="c", caption_eval="e", accuracies={}, build_seconds=133.8, preset="tiny",
        seed=0, world_version="3", from_cache=True,
    )  # fmt: skip
    text = format_table(world)
    assert "loaded from the cache (its build took 133.8 s)" in text and "built in" not in text


# ----------------------------------------------------------------- 6. kill safety
_SAVE_FOREVER = r"""
import json, sys
from peft import PeftModel
from odedit_hf.editing import save_adapter
from odedit_hf.evaluation import write_json_atomic
from odedit_hf.testing import tiny_backbone
lora, results, adapter, words = sys.argv[1:5]
model = PeftModel.from_pretrained(tiny_backbone("llava", seed=0, texts=json.loads(words)).model, lora)
i = 0
while True:
    write_json_atomic(results, {"i": i, "payload": [i] * 200_000})
    save_adapter(model, adapter, overwrite=True)
    if i == 0:
        print("ready", flush=True)
    i += 1
"""


@pytest.mark.parametrize("delay_s", [0.05, 0.4])
def test_a_process_killed_mid_save_leaves_whole_files(saved_lora, tmp_path, delay_s):
    import signal
    import subprocess
    import sys
    import time

    from odedit_hf.editing import check_adapter_folder

    results, adapter = tmp_path / "r.json", tmp_path / "adapter"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SAVE_FOREVER, str(saved_lora), str(results), str(adapter), json.dumps(WORDS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-3000:]
        time.sleep(delay_s)  # somewhere inside a later write
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    data = json.loads(results.read_text())  # whole: old or new, never half
    assert data["payload"] == [data["i"]] * 200_000
    check_adapter_folder(str(adapter))  # config parses, safetensors header and size check out
    assert sorted(os.listdir(adapter)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]

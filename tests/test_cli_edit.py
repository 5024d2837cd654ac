"""``odedit-hf edit``: a full run on a tiny saved model, and clear errors for bad inputs."""

from __future__ import annotations

import json
import os
import re

import pytest

from odedit_hf.cli.main import main
from odedit_hf.testing import tiny_backbone
from odedit_hf.testing.tiny import tiny_image

WORDS = ["what is the capital of France? Tokyo Paris London", "which animal is this? a red square blue yes"]


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
    record = {
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
    path = folder / "edits.json"
    path.write_text(json.dumps([record, {**record, "alt": "London"}, {**record, "alt": "yes"}]))
    return str(path)


def test_edit_runs_end_to_end_and_writes_results(tiny_model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = ["edit", "--model", tiny_model_dir, "--data", data_file, "--method", "lora", "--n", "2"]
    argv += [
        "--lora.steps",
        "5",
        "--lora.stop-loss",
        "none",
        "--seed",
        "7",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "reliability" in printed and "easyedit" in printed and str(out) in printed
    report = json.loads(out.read_text())
    assert report["method"] == "lora" and report["protocol"] == "single" and report["seed"] == 7
    assert report["n_edits"] == 2 and len(report["edits"]) == 2
    assert all(row["steps"] == 5 for row in report["edits"])  # --stop-loss none: every step runs
    # each row names the fact it scores
    assert [row["fact"]["target_new"] for row in report["edits"]] == ["Tokyo", "London"]
    assert report["edits"][0]["fact"]["prompt"] == "what is the capital of France?"
    assert report["edits"][0]["fact"]["image"] == "img0.png" and report["edits"][0]["fact"]["target_old"]
    assert report["config"]["method"]["options"]["steps"] == 5
    assert report["config"]["method"]["options"]["rank"] == 8  # resolved: the defaults are recorded too
    assert report["rollback"]["checks"] == 3
    assert report["timing"]["edit_wall_time_s_median"] > 0
    assert set(report["aggregates"]["post"]) >= {"reliability", "t_locality_easyedit", "m_generality_em"}


def test_bad_method_is_a_clear_error(tiny_model_dir, data_file, tmp_path, capsys):
    rc = main(
        [
            "edit",
            "--model",
            tiny_model_dir,
            "--data",
            data_file,
            "--method",
            "rome",
            "--out",
            str(tmp_path / "r.json"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "unknown editing method 'rome'" in err and "ftl" in err and "lora" in err
    assert not (tmp_path / "r.json").exists()


def test_missing_data_file_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    missing = tmp_path / "nope.json"
    rc = main(
        [
            "edit",
            "--model",
            tiny_model_dir,
            "--data",
            str(missing),
            "--method",
            "ft",
            "--out",
            str(tmp_path / "r.json"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "nope.json" in err and "no such file" in err


def test_unknown_model_type_is_a_clear_error(data_file, tmp_path, capsys):
    from transformers import BertConfig

    model_dir = tmp_path / "bert"
    from transformers import BertModel

    config = BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8)
    BertModel(config).save_pretrained(model_dir)  # real weights: the error must be about the model type
    rc = main(
        [
            "edit",
            "--model",
            str(model_dir),
            "--data",
            data_file,
            "--method",
            "ft",
            "--out",
            str(tmp_path / "r.json"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "'bert'" in err and "llava" in err  # names the type and lists the supported ones


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--method", "ft", "--lora.rank", "4"],
            "--lora.rank is an option of method 'lora', which --method ft does not use",
        ),
        (["--method", "ft", "--odedit.alpha", "5"], "--odedit.alpha is an option of method 'odedit'"),
        (["--method", "ft", "--editor", "lora"], "--editor 'lora' applies only to a wrapper method"),
        (["--method", "odedit+lora", "--editor", "ftl"], "already names its editor"),
        (["--method", "lora", "--lora.rnk", "4"], "method 'lora' has no option 'rnk'"),
        (["--method", "lora", "--rank", "4"], "unrecognized argument '--rank'"),
        (["--method", "odedit"], "needs a base editor"),
    ],
)
def test_an_option_that_does_not_apply_to_the_method_is_rejected(
    tiny_model_dir, data_file, tmp_path, capsys, extra, message
):
    argv = ["edit", "--model", tiny_model_dir, "--data", data_file, "--out", str(tmp_path / "r.json"), *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_method_config_file_and_old_alias_build_the_same_method(tmp_path):
    import argparse

    from odedit_hf.cli.edit import build_method

    config = tmp_path / "m.json"
    config.write_text(json.dumps({"odedit": {"alpha": 0.3}, "lora": {"rank": 2}}))
    args = argparse.Namespace(
        method="odedit", editor="lora", method_config=str(config), method_options=["--lora.rank", "5"]
    )
    method = build_method(args)
    assert method.name == "odedit+lora" and method.objective == {"alpha": 0.3} and method.editor.rank == 5


def test_methods_command_lists_every_method_with_its_options(capsys):
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    for expected in (
        "ftl (alias: ft)",
        "lora",
        "odedit",
        "--odedit.lambda-init",
        "--lora.rank",
        "--ftl.norm-constraint",
    ):
        assert expected in text


def test_each_option_help_is_its_own_docstring_entry(capsys):
    """An ``Args:`` entry whose type note holds parentheses (``defaults to `("a", "b")` ``) was read as part
    of the entry above it: ``--odedit.loc-positions`` showed irm_environments' text and
    ``--odedit.irm-environments`` fell back to its field's one-line help."""
    from odedit_hf.cli.options import _docstring_args
    from odedit_hf.methods.odedit.config import ODEditConfig

    docs = _docstring_args(ODEditConfig)
    assert docs["loc_positions"].endswith('`"all"` = every non-padding text position.')
    assert docs["irm_environments"].startswith("The environments whose omega-derivatives enter the IRM-TV")
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    entry = re.compile(r"\b[a-z_]+ \(`[^`]+`(, defaults to|, \*optional\*)")  # another entry's heading
    merged = [line.strip()[:60] for line in text.splitlines() if entry.search(line)]
    assert not merged, f"help texts that run into the next docstring entry: {merged}"


def test_missing_model_is_a_clear_error(data_file, tmp_path, capsys):
    rc = main(
        [
            "edit",
            "--model",
            str(tmp_path / "no-model"),
            "--data",
            data_file,
            "--out",
            str(tmp_path / "r.json"),
        ]
    )
    assert rc == 2
    assert "no-model" in capsys.readouterr().err


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit):
        main(["edit", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--model",
        "--data",
        "--method",
        "--protocol",
        "--n",
        "--seed",
        "--out",
        "--trust-remote-code",
        "--method-config",
        "--ftl.steps",
        "--lora.rank",
        "--odedit.alpha",
    ):
        assert flag in text


@pytest.mark.slow
def test_demo_and_edit_on_a_world_folder(micro_world, tmp_path, capsys):
    out = tmp_path / "demo.json"
    argv = [
        "demo",
        "--preset",
        "micro",
        "--world-dir",
        micro_world.root,
        "--n",
        "3",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "reliability" in printed and "m_locality" in printed
    report = json.loads(out.read_text())
    assert report["n_edits"] == 3 and report["method"] == "ftl" and report["protocol"] == "single"
    # the world folder is also valid --data for `edit` (its VQA eval file and image roots)
    out2 = tmp_path / "edit.json"
    argv = [
        "edit",
        "--model",
        micro_world.model_dir,
        "--data",
        micro_world.root,
        "--n",
        "2",
        "--ft.steps",
        "3",
    ]
    assert main([*argv, "--out", str(out2), "--no-progress"]) == 0
    assert json.loads(out2.read_text())["config"]["data"] == os.path.abspath(micro_world.root)

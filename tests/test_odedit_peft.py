"""ODEDIT as a peft method: registration, config round trip, save/load/push of adapters."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import odedit_hf  # noqa: F401  (registers ODEDIT with peft)
from odedit_hf.methods.odedit import ODEditConfig

from ._fake_hub import FakeHub as _FakeHub

TEXTS = ["what color is the cube", "blue", "red"]


def _random_adapter_(peft_model: torch.nn.Module, seed: int) -> None:
    """Give every trainable (adapter) parameter random values, so that a round trip is not trivially zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def _editor_config(kind: str, backbone):  # noqa: ANN001
    if kind == "lora":
        from odedit_hf.editors.lora import lora_config_for

        return lora_config_for(backbone, rank=2)
    from odedit_hf.editors.ftl import FTLMethod

    return FTLMethod().peft_config(backbone)


def _inputs(backbone):  # noqa: ANN001
    from odedit_hf.backbones import PromptSample
    from odedit_hf.testing import tiny_image

    batch = backbone.build_batch([PromptSample("what color is the cube", "blue", image=tiny_image(1))])
    return {k: v for k, v in batch.items() if k != "labels"}


# ------------------------------------------------------------------------------------ registration
def test_import_odedit_hf_stays_light_and_registers_when_peft_loads() -> None:
    code = (
        "import sys, odedit_hf\n"
        "assert 'peft' not in sys.modules and 'torch' not in sys.modules, sorted(m for m in sys.modules if m in ('peft','torch'))\n"
        "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING\n"
        "from peft.utils import PeftType\n"
        "assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.ODEDIT].__name__ == 'ODEditConfig'\n"
        "assert PEFT_TYPE_TO_TUNER_MAPPING['ODEDIT'].__name__ == 'ODEditModel'\n"
        "assert 'FTL' in PEFT_TYPE_TO_CONFIG_MAPPING\n"
        "print('ok')\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"


def test_registration_is_idempotent() -> None:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from odedit_hf._registration import import_method_packages

    first = import_method_packages()
    assert import_method_packages() == first and "odedit_hf.methods.odedit" in first
    assert PEFT_TYPE_TO_CONFIG_MAPPING["ODEDIT"] is ODEditConfig


@pytest.mark.parametrize(
    "first_import",
    [
        "odedit_hf.editing.wrapper",
        "odedit_hf.methods.odedit.config",
        "odedit_hf.editors.ftl.layer",
        "odedit_hf.cli.edit",
    ],
)
def test_every_peft_type_registers_whatever_module_is_imported_first(first_import: str) -> None:
    code = (
        f"import importlib, odedit_hf; importlib.import_module({first_import!r})\n"
        "import peft\n"
        "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING\n"
        "missing = [t for t in ('FTL', 'ODEDIT') if t not in PEFT_TYPE_TO_CONFIG_MAPPING]\n"
        "assert not missing, missing\n"
        "print('ok')\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


# ------------------------------------------------------------------------------------------ config
def test_config_validates_with_actionable_messages() -> None:
    from peft import LoraConfig

    lora = LoraConfig(target_modules=["q"])
    with pytest.raises(ValueError, match="editor` is required"):
        ODEditConfig()
    with pytest.raises(ValueError, match="lambda_mode must be one of"):
        ODEditConfig(editor=lora, lambda_mode="dense")
    with pytest.raises(ValueError, match="alpha must be a number >= 0"):
        ODEditConfig(editor=lora, alpha=-1)
    with pytest.raises(ValueError, match="rephrase_kinds"):
        ODEditConfig(editor=lora, rephrase_kinds=("paraphrase",))
    with pytest.raises(ValueError, match="cannot wrap another wrapper"):
        ODEditConfig(editor=ODEditConfig(editor=lora))
    with pytest.raises(TypeError):
        ODEditConfig(editor=lora, not_a_field=1)


@pytest.mark.parametrize("kind", ["lora", "ftl"])
def test_config_dict_round_trip(kind: str, tmp_path) -> None:  # noqa: ANN001
    from peft import PeftConfig

    if kind == "lora":
        from peft import LoraConfig

        editor = LoraConfig(target_modules=["a.b", "c"], r=3, lora_alpha=6)
    else:
        from odedit_hf.editors.ftl import FTLConfig

        editor = FTLConfig(target_modules=["a.b", "c"])
    config = ODEditConfig(editor=editor, alpha=0.3, lambda_mode="sketch", mmd_bandwidth_multipliers=[1, 3])
    config.save_pretrained(str(tmp_path))
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "ODEDIT" and data["editor"]["peft_type"] == editor.peft_type
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(loaded, ODEditConfig)
    assert loaded == config
    assert type(loaded.editor) is type(editor)


# ---------------------------------------------------------------------------------- adapter I/O
@pytest.mark.parametrize("kind", ["lora", "ftl"])
def test_save_load_round_trip_restores_an_identical_model(kind: str, tmp_path) -> None:  # noqa: ANN001
    from peft import PeftModel, get_peft_model

    from odedit_hf.testing import tiny_backbone

    backbone = tiny_backbone("llava", texts=TEXTS)
    inputs = _inputs(backbone)
    with torch.no_grad():
        base_logits = backbone.model(**inputs).logits
    peft_model = get_peft_model(backbone.model, ODEditConfig(editor=_editor_config(kind, backbone), beta=0.5))
    _random_adapter_(peft_model, seed=1)
    with torch.no_grad():
        edited = peft_model(**inputs).logits
        with peft_model.disable_adapter():
            assert torch.allclose(peft_model(**inputs).logits, base_logits, atol=1e-6)
    assert not torch.allclose(edited, base_logits, atol=1e-4), "the random adapter must change the model"
    peft_model.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]

    fresh = tiny_backbone("llava", texts=TEXTS)
    loaded = PeftModel.from_pretrained(fresh.model, str(tmp_path))
    assert isinstance(loaded.peft_config["default"], ODEditConfig)
    assert loaded.peft_config["default"].beta == 0.5
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, edited)
    saved = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    for name, param in loaded.named_parameters():
        if name in saved:
            assert torch.equal(param, saved[name]), name
    # the loaded adapter is frozen (inference) unless asked otherwise
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = PeftModel.from_pretrained(
        tiny_backbone("llava", texts=TEXTS).model, str(tmp_path), is_trainable=True
    )
    assert any(p.requires_grad for p in trainable.parameters())


def test_two_adapters_must_wrap_the_same_editor() -> None:
    from peft import get_peft_model

    from odedit_hf.testing import tiny_backbone

    backbone = tiny_backbone("llava", texts=TEXTS)
    peft_model = get_peft_model(backbone.model, ODEditConfig(editor=_editor_config("lora", backbone)))
    peft_model.add_adapter("second", ODEditConfig(editor=_editor_config("lora", backbone)))
    assert set(peft_model.peft_config) == {"default", "second"}
    with pytest.raises(ValueError, match="same editor type"):
        peft_model.add_adapter("third", ODEditConfig(editor=_editor_config("ftl", backbone)))


# ------------------------------------------------------------------------------------ push to hub
_PUSH_SCRIPT = r"""
import sys, torch, odedit_hf
from peft import get_peft_model
from odedit_hf.methods.odedit import ODEditConfig
from odedit_hf.editors.lora import lora_config_for
from odedit_hf.testing import tiny_backbone
backbone = tiny_backbone("llava", texts=["what color is the cube", "blue", "red"])
model = get_peft_model(backbone.model, ODEditConfig(editor=lora_config_for(backbone, rank=2), alpha=0.25))
gen = torch.Generator().manual_seed(2)
with torch.no_grad():
    for p in model.parameters():
        if p.requires_grad:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
model.save_pretrained(sys.argv[1])
print(model.push_to_hub("user/odedit-edit", token="hf_fake_token"))
"""


def test_push_to_hub_against_a_local_fake_hub(tmp_path) -> None:  # noqa: ANN001
    from peft import PeftModel

    from odedit_hf.testing import tiny_backbone

    local = tmp_path / "local"
    with _FakeHub() as hub:
        env = hub.env(tmp_path)
        out = subprocess.run(
            [sys.executable, "-c", _PUSH_SCRIPT, str(local)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "/user/odedit-edit/commit/" in out.stdout
    pushed = {path: data for (repo, path), data in hub.files.items() if repo == "user/odedit-edit"}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(pushed)
    assert pushed["adapter_model.safetensors"] == (local / "adapter_model.safetensors").read_bytes()
    config = json.loads(pushed["adapter_config.json"])
    assert (
        config["peft_type"] == "ODEDIT"
        and config["alpha"] == 0.25
        and config["editor"]["peft_type"] == "LORA"
    )
    # what was pushed loads back as an adapter
    pulled = tmp_path / "pulled"
    pulled.mkdir()
    for path, data in pushed.items():
        (pulled / path).write_bytes(data)
    a = PeftModel.from_pretrained(tiny_backbone("llava", texts=TEXTS).model, str(pulled))
    b = PeftModel.from_pretrained(tiny_backbone("llava", texts=TEXTS).model, str(local))
    backbone = tiny_backbone("llava", texts=TEXTS)
    inputs = _inputs(backbone)
    with torch.no_grad():
        assert torch.equal(a(**inputs).logits, b(**inputs).logits)

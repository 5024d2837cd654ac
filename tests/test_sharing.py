"""Sharing an edit: the model card, a push to a fake Hub on loopback and loading back by repo id,
exports that stock libraries load without odedit-hf, ``eval`` of a saved adapter, ``generate``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from odedit_hf.cli.main import main
from odedit_hf.testing import tiny_backbone
from odedit_hf.testing.tiny import tiny_image

from ._fake_hub import FakeHub as _FakeHub

WORDS = ["what is the capital of France? Tokyo Paris London", "which animal is this? a red square blue yes"]
_BASE = {
    "image": "img0.png",
    "image_rephrase": "img1.png",
    "loc": "what is the capital of France?",
    "loc_ans": "Paris",
    "m_loc": "img1.png",
    "m_loc_q": "which animal is this?",
    "m_loc_a": "a red square",
}
RECORDS = [
    {
        **_BASE,
        "src": "what is the capital of France?",
        "pred": "Paris",
        "alt": "Tokyo",
        "rephrase": "capital of France?",
    },
    {
        **_BASE,
        "src": "which animal is this?",
        "pred": "a red square",
        "alt": "blue",
        "rephrase": "which animal?",
    },
]
HUB_BASE = "org/tiny-llava"
REPO = "user/odedit-edit"


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
    path.write_text(json.dumps(RECORDS))
    return str(path)


@pytest.fixture(scope="module")
def sequential_edit(tiny_model_dir, data_file, tmp_path_factory):
    """``odedit-hf edit --method odedit+lora --protocol sequential`` with --save-adapter: (adapter, results)."""
    folder = tmp_path_factory.mktemp("edit")
    adapter, out = folder / "adapter", folder / "results.json"
    argv = ["edit", "--model", tiny_model_dir, "--data", data_file, "--method", "odedit+lora", "--n", "2"]
    argv += [
        "--protocol",
        "sequential",
        "--lora.steps",
        "25",
        "--lora.rank",
        "4",
        "--seed",
        "5",
        "--no-progress",
    ]
    argv += ["--save-adapter", str(adapter), "--base-model", HUB_BASE, "--out", str(out)]
    assert main(argv) == 0
    return adapter, json.loads(out.read_text())


def _probe(backbone):
    from odedit_hf.backbones import PromptSample

    batch = backbone.build_batch([PromptSample(RECORDS[0]["src"], RECORDS[0]["alt"], image=tiny_image(0))])
    return {k: v for k, v in batch.items() if k != "labels"}


# ------------------------------------------------------------------------------------ the card
def _front_matter(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert match, card[:200]
    out: dict = {}
    key = None
    for line in match.group(1).splitlines():
        if line.startswith("- "):
            out.setdefault(key, []).append(line[2:])
        else:
            key, _, value = line.partition(":")
            if value.strip():
                out[key] = value.strip()
    return out


def test_the_saved_adapter_carries_a_card_made_from_its_results(sequential_edit):
    adapter, results = sequential_edit
    card = (adapter / "README.md").read_text()
    front = _front_matter(card)
    assert front["library_name"] == "peft" and front["base_model"] == HUB_BASE
    assert {"odedit-hf", "knowledge-editing", "odedit", "lora"} <= set(front["tags"])
    assert "import odedit_hf" in card and "PeftModel.from_pretrained(base_model," in card
    assert "LlavaForConditionalGeneration" in card  # the base model's class, from the results
    # the method and its resolved config (results' config.method, defaults included)
    assert json.dumps(results["config"]["method"], indent=2, sort_keys=True) in card
    assert '"rank": 4' in card and '"lambda_init"' in card
    # the edited facts, and the metric table with protocol, metric version and seed
    for record in RECORDS:
        assert f"| {record['src']} | {record['pred']} | {record['alt']} |" in card
    assert (
        f"metric version {results['metric_version']}" in card and "seed 5" in card and "`sequential`" in card
    )
    final = results["aggregates"]["final"]
    assert f"{final['reliability']:.3f} / {final['reliability_em']:.3f}" in card
    assert "on the final model" in card
    facts = json.loads((adapter / "edited_facts.json").read_text())
    assert [f["alt"] for f in facts] == [r["alt"] for r in RECORDS]


def test_a_card_without_a_hub_base_model_says_how_to_set_it(sequential_edit):
    from odedit_hf.sharing import model_card

    _, results = sequential_edit
    results = {**results, "config": {**results["config"], "base_model": None}}  # a run without --base-model
    card = model_card(results, facts=None)
    assert "base_model" not in _front_matter(card) and "--base-model ORG/NAME" in card
    assert "2 edits" in card and "BASE_MODEL_ID_OR_FOLDER" in card
    with pytest.raises(ValueError, match="results document"):
        model_card({"not": "results"})
    single = {**results, "protocol": "single", "n_edits": 2}  # its adapter held only the last edit
    with pytest.raises(ValueError, match="rolls the adapter back after each of the 2 edits"):
        model_card(single)


# Push with the CLI, then load the adapter back by repo id -- with stock peft after `import odedit_hf`,
# and with odedit_hf.editing.load_adapter -- and compare the logits with the local adapter's.
_PUSH_AND_PULL = r"""
import json, sys
import torch
import odedit_hf
from peft import PeftModel
from transformers import LlavaForConditionalGeneration
from odedit_hf.cli.main import main
from odedit_hf.editing import load_adapter
model_dir, adapter, repo, inputs_path = sys.argv[1:5]
assert main(["push", adapter, repo]) == 0
inputs = torch.load(inputs_path)
def logits(model):
    with torch.no_grad():
        return model(**inputs).logits
fresh = lambda: LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
local = logits(load_adapter(fresh(), adapter))
by_peft = logits(PeftModel.from_pretrained(fresh(), repo).eval())
by_ours = logits(load_adapter(fresh(), repo))
base = logits(fresh())
print(json.dumps({
    "peft_vs_local": (by_peft - local).abs().max().item(),
    "ours_vs_local": (by_ours - local).abs().max().item(),
    "edit_vs_base": (local - base).abs().max().item(),
}))
"""


def test_push_to_a_fake_hub_and_load_back_by_repo_id(sequential_edit, tiny_model_dir, tmp_path):
    adapter, results = sequential_edit
    inputs = tmp_path / "inputs.pt"
    torch.save(_probe(tiny_backbone("llava", seed=0, texts=WORDS)), inputs)
    with _FakeHub() as hub:
        out = subprocess.run(
            [sys.executable, "-c", _PUSH_AND_PULL, tiny_model_dir, str(adapter), REPO, str(inputs)],
            capture_output=True,
            text=True,
            timeout=600,
            env=hub.env(tmp_path),
        )
    assert out.returncode == 0, out.stderr[-4000:]
    diffs = json.loads(out.stdout.strip().splitlines()[-1])
    assert diffs["peft_vs_local"] == 0.0 and diffs["ours_vs_local"] == 0.0  # the same adapter, bit for bit
    assert diffs["edit_vs_base"] > 1e-4  # and it is an edit, not an identity
    pushed = {path: data for (repo, path), data in hub.files.items() if repo == REPO}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "odedit_results.json"} <= set(
        pushed
    )
    assert "edited_facts.json" in pushed
    assert pushed["adapter_model.safetensors"] == (adapter / "adapter_model.safetensors").read_bytes()
    config = json.loads(pushed["adapter_config.json"])
    assert config["peft_type"] == "ODEDIT" and config["editor"]["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == HUB_BASE  # not the local path of the run
    card = pushed["README.md"].decode()
    front = _front_matter(card)
    assert front["library_name"] == "peft" and front["base_model"] == HUB_BASE
    assert {"odedit-hf", "knowledge-editing", "odedit", "lora"} <= set(front["tags"])
    assert "| Reliability" in card and "on the final model" in card and f'"{REPO}"' in card
    assert json.loads(pushed["odedit_results.json"]) == results
    # the download side went through the Hub's resolve endpoint
    assert any(method == "GET" and "/resolve/" in path for method, path in hub.calls)


_EDIT_AND_PUSH = r"""
import sys
from odedit_hf.cli.main import main
model_dir, data, out = sys.argv[1:4]
argv = ["edit", "--model", model_dir, "--data", data, "--method", "lora", "--protocol", "sequential", "--n", "1"]
argv += ["--lora.steps", "2", "--no-progress", "--out", out, "--push-to-hub", "user/direct", "--base-model", "org/b"]
sys.exit(main(argv))
"""


def test_edit_push_to_hub_pushes_the_run_without_a_local_folder(tiny_model_dir, data_file, tmp_path):
    with _FakeHub() as hub:
        env = {**hub.env(tmp_path), "TMPDIR": str(tmp_path / "tmp")}
        (tmp_path / "tmp").mkdir()
        out = subprocess.run(
            [sys.executable, "-c", _EDIT_AND_PUSH, tiny_model_dir, data_file, str(tmp_path / "r.json")],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "pushed to the Hub" in out.stderr
    pushed = {path: data for (repo, path), data in hub.files.items() if repo == "user/direct"}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "edited_facts.json"} <= set(
        pushed
    )
    assert _front_matter(pushed["README.md"].decode())["base_model"] == "org/b"
    assert json.loads(pushed["odedit_results.json"]) == json.loads((tmp_path / "r.json").read_text())
    assert not [p for p in os.listdir(tmp_path / "tmp") if p.startswith("odedit-hf-push-")]  # cleaned up


def test_push_refuses_what_it_cannot_share(sequential_edit, tmp_path, capsys):
    adapter, _ = sequential_edit
    assert main(["push", str(adapter), "not a repo"]) == 2
    assert "is not a Hub repo id" in capsys.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (bare / name).write_bytes((adapter / name).read_bytes())
    assert main(["push", str(bare), REPO]) == 2
    assert "--results RESULTS.json" in capsys.readouterr().err
    staged = tmp_path / "staged"
    assert main(["push", str(adapter), REPO, "--dry-run", str(staged)]) == 0
    assert (staged / "README.md").is_file() and json.loads((staged / "adapter_config.json").read_text())


# ------------------------------------------------------------------------------------ export
_LOAD_WITHOUT_ODEDIT = r"""
import json, sys
import torch
from peft import PeftModel
from transformers import LlavaForConditionalGeneration
merged_dir, plain_dir, model_dir, inputs_path = sys.argv[1:5]
inputs = torch.load(inputs_path)
with torch.no_grad():
    merged = LlavaForConditionalGeneration.from_pretrained(merged_dir).eval()(**inputs).logits
    base = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    plain = PeftModel.from_pretrained(base, plain_dir).eval()(**inputs).logits
assert not any(m == "odedit_hf" or m.startswith("odedit_hf.") for m in sys.modules), "odedit_hf was imported"
torch.save({"merged": merged, "plain": plain}, inputs_path + ".out")
print(json.dumps({"peft_type": type(plain).__name__}))
"""


def test_export_merged_and_plain_lora_load_without_odedit_hf(sequential_edit, tiny_model_dir, tmp_path):
    from odedit_hf.editing import load_adapter

    adapter, _ = sequential_edit
    merged, plain = tmp_path / "merged", tmp_path / "plain"
    assert main(["export", str(adapter), "--out", str(merged), "--model", tiny_model_dir]) == 0
    assert main(["export", str(adapter), "--out", str(plain), "--format", "adapter"]) == 0
    assert json.loads((plain / "adapter_config.json").read_text())["peft_type"] == "LORA"
    backbone = tiny_backbone("llava", seed=0, texts=WORDS)
    inputs = _probe(backbone)
    torch.save(inputs, tmp_path / "inputs.pt")
    from transformers import LlavaForConditionalGeneration

    with torch.no_grad():
        edited = load_adapter(LlavaForConditionalGeneration.from_pretrained(tiny_model_dir), adapter).eval()
        expected = edited(**inputs).logits
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _LOAD_WITHOUT_ODEDIT,
            str(merged),
            str(plain),
            tiny_model_dir,
            str(tmp_path / "inputs.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    got = torch.load(str(tmp_path / "inputs.pt") + ".out")
    assert torch.equal(got["plain"], expected)  # the same LoRA maths on the same weights
    assert torch.allclose(got["merged"], expected, atol=1e-5, rtol=0)  # merging rounds W + BA once
    assert (got["merged"] - expected).abs().max() < (expected - backbone.model(**inputs).logits).abs().max()


def test_export_plain_adapter_refuses_odedit_hf_own_layers(tmp_path, capsys):
    from peft import get_peft_model

    from odedit_hf.editing import get_method

    backbone = tiny_backbone("llava", seed=0, texts=WORDS)
    folder = tmp_path / "ftl"
    get_peft_model(backbone.model, get_method("odedit+ftl").peft_config(backbone)).save_pretrained(folder)
    assert main(["export", str(folder), "--out", str(tmp_path / "x"), "--format", "adapter"]) == 2
    err = capsys.readouterr().err
    assert "FTL" in err and "--format merged" in err and not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------ eval, generate
def test_eval_of_a_sequential_adapter_reproduces_the_final_scores(
    sequential_edit, tiny_model_dir, data_file, tmp_path
):
    adapter, results = sequential_edit
    out = tmp_path / "eval.json"
    argv = ["eval", "--adapter", str(adapter), "--model", tiny_model_dir, "--data", data_file]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    scored = json.loads(out.read_text())
    assert scored["protocol"] == "eval" and scored["method"] == results["method"] == "odedit+lora"
    # the same adapter scored by the same code: each edit's final-model scores, exactly
    assert [row["post"] for row in scored["edits"]] == [row["final"] for row in results["edits"]]
    assert scored["rollback"]["checks"] == 1


def test_generate_answers_with_the_edit(sequential_edit, tiny_model_dir, data_file, capsys):
    adapter, results = sequential_edit
    image = os.path.join(os.path.dirname(data_file), "img0.png")
    # greedy decoding follows the teacher-forced argmax: an edit with exact match 1.0 is generated
    held = [i for i, row in enumerate(results["edits"]) if row["final"]["reliability_em"] == 1.0]
    assert held, "the fixture's edits should hold (raise --lora.steps)"
    record = RECORDS[held[0]]
    argv = ["generate", "--model", tiny_model_dir, "--adapter", str(adapter), "--prompt", record["src"]]
    assert main([*argv, "--image", image, "--compare", "--max-new-tokens", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    edited = next(line for line in lines if line.startswith("edited:"))
    assert edited.removeprefix("edited:").strip().startswith(record["alt"])
    assert any(line.startswith("base:") for line in lines)

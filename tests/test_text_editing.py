"""Text-only editing end to end: every editor row of the shared matrix (and every wrapper around it) on
ZsRE records with a tiny random Llama, through ``run_protocol`` and ``odedit-hf edit``; text-only records
on a multimodal model; records with images on a text-only model fail before anything runs."""

from __future__ import annotations

import json

import pytest
import torch

from odedit_hf.cli.main import main
from odedit_hf.data import MULTIMODAL_SCORE_FIELDS, EditRequest, load_edits
from odedit_hf.editing import BaseWeights, get_method, method_class, model_inputs
from odedit_hf.evaluation import build_report, format_table, run_protocol
from odedit_hf.testing import tiny_backbone, write_zsre_file

from .editor_cases import EDITOR_CASES, WRAPPERS

TEXTS = [
    "the capital of france is",
    "the capital city of france is",
    "the sky over the sea is",
    "blue",
    "paris",
    "grey",
    "the cat sat on the mat",
]


@pytest.fixture(scope="module")
def zsre_file(tmp_path_factory):
    return write_zsre_file(
        tmp_path_factory.mktemp("text") / "zsre.json", ["blue", "the cat"], subject="france"
    )


@pytest.fixture(scope="module")
def requests(zsre_file):
    return list(load_edits(zsre_file))


@pytest.fixture(scope="module")
def llama():
    return tiny_backbone("llama", seed=0, texts=TEXTS)


def _answer_ids(model, backbone, request: EditRequest) -> tuple[list[int], list[int]]:
    """(greedy teacher-forced predictions at the target positions, the target ids) of the edit prompt."""
    from odedit_hf.editing import edit_sample

    batch = backbone.build_batch([edit_sample(request)])
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits
    mask = batch["labels"][0, 1:] != -100
    return logits[0, :-1][mask].argmax(-1).tolist(), batch["labels"][0, 1:][mask].tolist()


# Options that make each editor's edit hold on the tiny random Llama (the rows' own are tuned on the
# tiny LLaVA); every row still runs with its own options below.
_STRONG = {"ftl": {"steps": 60, "lr": 2e-2}, "lora": {"steps": 60, "lr": 5e-2}, "grace": {"steps": 20}}
_WRAPPED_STRONG = {"steps": 100, "lr": 5e-2, "stop_loss": None}


def _matrix():
    rows = [pytest.param(c.method, c.options, id=c.case.replace("llava", "llama")) for c in EDITOR_CASES]
    for wrapper, wrapper_options in WRAPPERS:
        for c in EDITOR_CASES:
            cls = method_class(c.method)
            # a wrapper may accept only some editors (ASAM: the intrinsic ones)
            supported = getattr(method_class(wrapper), "supported_editors", None)
            if cls.wrappable and cls.trains_at_edit and (supported is None or cls.name in supported):
                options = {wrapper: wrapper_options, c.method: c.options}
                rows.append(pytest.param(f"{wrapper}+{c.method}", options, id=f"{wrapper}+{c.case}-llama"))
    return rows


@pytest.mark.parametrize(("name", "options"), _matrix())
def test_every_editor_row_runs_on_text_records(llama, requests, name, options):
    """Every row of the shared matrix, on text-only records with a text-only decoder: the run completes,
    rolls back (hash checked), and its scores hold no multimodal key (absent, not 0)."""
    before = BaseWeights(llama.model).digest()
    run = run_protocol("sequential", get_method(name, **options), llama, requests[:1])
    report = build_report(run)
    for which in ("post", "final"):
        agg = report["aggregates"][which]
        assert {"reliability", "t_generality", "t_locality", "t_locality_easyedit"} <= set(agg)
        assert not set(MULTIMODAL_SCORE_FIELDS) & set(agg), agg
    assert all(not set(MULTIMODAL_SCORE_FIELDS) & set(row["post"]) for row in report["edits"])
    assert run.rollback_checks >= 2 and BaseWeights(llama.model).digest() == before


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("ftl", _STRONG["ftl"]),
        ("lora", _STRONG["lora"]),
        ("grace", _STRONG["grace"]),
        ("tpatcher", {"steps": 80, "train_up": True}),
        ("odedit+ftl", {"odedit": {"lambda_mode": "sketch"}, "ftl": _WRAPPED_STRONG}),
    ],
)
def test_text_edit_changes_the_answer_and_rolls_back(llama, requests, name, options):
    request = requests[0]
    pre_pred, target = _answer_ids(llama.model, llama, request)
    assert pre_pred != target  # the counterfactual is not the model's answer before the edit
    with torch.no_grad():
        base_logits = llama.model(**model_inputs(llama.build_batch([_sample(request)]))).logits
    held = {}

    def on_adapter(peft_model):  # while the adapter holds the edit
        held["pred"] = _answer_ids(peft_model, llama, request)[0]

    run = run_protocol("single", get_method(name, **options), llama, [request], on_adapter=on_adapter)
    assert held["pred"] == target
    post = run.results[0].post
    assert post.reliability == 1.0 and post.reliability_em == 1.0 and not post.has_multimodal
    assert "m_generality" not in post.to_dict()
    with torch.no_grad():  # rolled back: the very same outputs as before the run
        after = llama.model(**model_inputs(llama.build_batch([_sample(request)]))).logits
    assert torch.equal(after, base_logits)
    assert _answer_ids(llama.model, llama, request)[0] == pre_pred


def _sample(request):
    from odedit_hf.editing import edit_sample

    return edit_sample(request)


def test_text_table_has_no_multimodal_rows(llama, requests):
    run = run_protocol("single", get_method("ftl", **_STRONG["ftl"]), llama, requests)
    table = format_table(build_report(run))
    assert "reliability" in table and "t_locality" in table
    assert "m_generality" not in table and "m_locality" not in table


def test_images_on_a_text_model_fail_before_editing(llama, requests, tmp_path):
    from odedit_hf.testing.tiny import tiny_image

    tiny_image(0).save(tmp_path / "a.png")
    image = str(tmp_path / "a.png")
    mm = EditRequest(
        case_id=4,
        task="vqa",
        source="mem",
        src="q?",
        pred="a",
        alt="b",
        image=image,
        rephrase="r?",
        image_rephrase=image,
        loc="l?",
        loc_ans="x",
        m_loc=image,
        m_loc_q="m?",
        m_loc_a="y",
    )
    calls = []

    class Spy:
        name = "spy"

        def __getattr__(self, attr):
            calls.append(attr)
            raise AssertionError(f"the method was used: {attr}")

    with pytest.raises(ValueError, match=r"'llama' model is text-only .* carry images \(case ids \[4\]\)"):
        run_protocol("single", Spy(), llama, [requests[0], mm])
    assert calls == []


def test_text_records_on_a_multimodal_model(requests):
    llava = tiny_backbone("llava", seed=0, texts=TEXTS)
    run = run_protocol("single", get_method("ftl", steps=60, lr=2e-2), llava, requests[:1])
    post = run.results[0].post
    assert post.reliability == 1.0 and not post.has_multimodal


# ------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, llama):
    folder = tmp_path_factory.mktemp("llama")
    llama.model.save_pretrained(folder)
    llama.tokenizer.save_pretrained(folder)
    return str(folder)


def _edit(argv, capsys):
    rc = main(["edit", *argv, "--no-progress"])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize("method", ["ftl", "odedit+ftl"])
def test_cli_edits_a_text_model_from_a_zsre_file(llama_dir, zsre_file, tmp_path, capsys, method):
    out = tmp_path / "results.json"
    options = ["--ftl.steps", "100", "--ftl.lr", "5e-2", "--ftl.stop-loss", "none"]
    if method.startswith("odedit"):
        options += ["--odedit.lambda-mode", "sketch"]
    argv = ["--model", llama_dir, "--data", str(zsre_file), "--method", method, *options, "--out", str(out)]
    rc, printed, err = _edit(argv, capsys)
    assert rc == 0, err
    report = json.loads(out.read_text())
    post = report["aggregates"]["post"]
    assert report["n_edits"] == 2 and post["reliability"] == 1.0
    assert not set(MULTIMODAL_SCORE_FIELDS) & set(post)
    assert "m_generality" not in printed and "t_generality" in printed


def test_cli_rejects_images_on_a_text_model_before_loading_it(llama_dir, tmp_path, capsys, monkeypatch):
    from odedit_hf.cli import edit as edit_cli
    from odedit_hf.testing.tiny import tiny_image

    tiny_image(0).save(tmp_path / "a.png")
    record = {k: "a.png" for k in ("image", "image_rephrase", "m_loc")}
    record.update(
        src="q?", pred="a", alt="b", rephrase="r?", loc="l?", loc_ans="x", m_loc_q="m?", m_loc_a="y"
    )
    data = tmp_path / "mm.json"
    data.write_text(json.dumps([record]))

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(edit_cli, "load_backbone", no_load)
    argv = ["--model", llama_dir, "--data", str(data), "--out", str(tmp_path / "r.json")]
    rc, _, err = _edit(argv, capsys)
    assert rc == 2 and "text-only" in err and "carry images" in err and "the model was loaded" not in err


def test_cli_strict_fields(llama_dir, zsre_file, tmp_path, capsys):
    records = json.loads(zsre_file.read_text())
    records[1]["textual_rephrase"] = "x"
    data = tmp_path / "extra.json"
    data.write_text(json.dumps(records))
    argv = ["--model", llama_dir, "--data", str(data), "--out", str(tmp_path / "r.json")]
    rc, _, err = _edit([*argv, "--strict-fields"], capsys)
    assert rc == 2 and "record 1" in err and "'textual_rephrase'" in err
    rc, _, err = _edit([*argv, "--ftl.steps", "2"], capsys)
    assert rc == 0, err


@pytest.fixture(scope="module")
def chat_llama_dir(tmp_path_factory):
    llama = tiny_backbone("llama", seed=0, texts=TEXTS, chat_template=True)
    folder = tmp_path_factory.mktemp("chat-llama")
    llama.model.save_pretrained(folder)
    llama.tokenizer.save_pretrained(folder)
    return str(folder)


def test_prompt_format_raw_skips_the_chat_template(chat_llama_dir, llama_dir, zsre_file, tmp_path, capsys):
    from odedit_hf.backbones import PromptSample
    from odedit_hf.cli.edit import CLIError, load_backbone

    chat = load_backbone(chat_llama_dir, device="cpu", progress=False)
    raw = load_backbone(chat_llama_dir, device="cpu", progress=False, prompt_format="raw")
    sample = PromptSample("what color is the sky", "blue")
    assert chat.uses_chat_template and not raw.uses_chat_template
    assert raw.wrap_prompt(sample) != chat.wrap_prompt(sample)
    assert chat.uses_chat_template  # the raw copy left the folder's tokenizer (and the other backbone) alone
    with pytest.raises(CLIError, match="has no chat template; use raw"):
        load_backbone(llama_dir, device="cpu", progress=False, prompt_format="chat")
    out = tmp_path / "r.json"
    argv = ["--model", chat_llama_dir, "--data", str(zsre_file), "--method", "ftl", "--ftl.steps", "2"]
    rc, _, err = _edit([*argv, "--prompt-format", "raw", "--out", str(out)], capsys)
    assert rc == 0, err
    assert json.loads(out.read_text())["config"]["prompt_format"] == "raw"
    rc, _, err = _edit([*argv, "--out", str(out)], capsys)
    assert rc == 0 and json.loads(out.read_text())["config"]["prompt_format"] == "chat"


def test_text_batches_have_no_image_groups_and_odedit_uses_the_text_ones(llama, requests):
    """A text-only request adds no ``image_rephrase`` / ``m_loc`` rows (they would only repeat its text
    prompts); ODEdit's terms on it are those of its text groups alone."""
    import dataclasses

    from odedit_hf.editing.environments import GROUPS, build_edit_batch
    from odedit_hf.methods.odedit import ODEditMethod
    from odedit_hf.methods.odedit.objective import ODEditObjective
    from odedit_hf.methods.odedit.risks import needed_groups

    batch = build_edit_batch(llama, requests, GROUPS, num_rephrases=2)
    assert set(batch.slices) == {"edit", "rephrase", "loc"} == set(batch.owners)
    rows = sum(b["input_ids"].shape[0] for b in batch.batches)
    assert rows == 3 * len(requests)  # one edit, one rephrase (the record has one), one locality row each

    method = ODEditMethod(get_method("ftl", steps=1), objective={"lambda_mode": "sketch"})
    config = method.peft_config(llama)
    text_config = dataclasses.replace(config, rephrase_kinds=("rephrase",))
    got = []
    for cfg in (config, text_config):
        edit_batch = build_edit_batch(llama, requests, needed_groups(cfg), num_rephrases=1)
        objective = ODEditObjective(cfg, llama)
        with torch.no_grad():
            terms = objective(llama.forward, edit_batch, torch.tensor(0.1), pre_edit=True)
        got.append([float(t) for t in (terms.total, terms.r_rel, terms.r_loc, terms.r_gen, terms.penalty)])
    assert got[0] == got[1]
    assert all(torch.isfinite(torch.tensor(got[0])))

"""``odedit-hf report``: the HTML page and its PNG figures, from results files of real (tiny) runs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from odedit_hf.cli.main import main
from odedit_hf.testing import tiny_backbone
from odedit_hf.testing.tiny import tiny_image

pytest.importorskip("matplotlib", reason="reports need the extras extra (matplotlib)")

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
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def results_files(tmp_path_factory):
    """Results of FT-L and LoRA single runs (two seeds each) and an ODEdit+LoRA sequential run."""
    folder = tmp_path_factory.mktemp("runs")
    backbone = tiny_backbone("llava", seed=0, texts=WORDS)
    backbone.model.save_pretrained(folder / "model")
    backbone.processor.save_pretrained(folder / "model")
    for i in range(2):
        tiny_image(i).save(folder / f"img{i}.png")
    data = folder / "edits.json"
    data.write_text(json.dumps([RECORD, {**RECORD, "alt": "London"}, {**RECORD, "alt": "yes"}]))
    paths = []
    runs = [("ftl", "single", 0), ("ftl", "single", 1), ("lora", "single", 0), ("lora", "single", 1)]
    runs += [("odedit+lora", "sequential", 0)]
    for method, protocol, seed in runs:
        out = folder / f"{method}-{protocol}-{seed}.json"
        editor = method.split("+")[-1]
        argv = ["edit", "--model", str(folder / "model"), "--data", str(data), "--method", method]
        argv += ["--protocol", protocol, "--seed", str(seed), f"--{editor}.steps", "3", "--no-progress"]
        assert main([*argv, "--out", str(out)]) == 0
        paths.append(str(out))
    return paths


def test_report_writes_the_page_and_every_figure_it_references(results_files, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", *results_files, "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    referenced = re.findall(r"<img src='([^']+)'", page)
    assert sorted(referenced) == ["metrics.png", "outcomes.png", "sequential.png"]
    for name in referenced:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and 2_000 < len(data) < 400_000
    # self-contained: nothing fetched from elsewhere, no script
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page) and "<script" not in page
    for method in ("ftl · single", "lora · single", "odedit+lora · sequential"):
        assert method in page
    assert page.count("<tr>") == 1 + 4 + 2  # header, four single runs, post and final of the sequential one
    printed = capsys.readouterr().out
    assert str(out / "index.html") in printed


def test_report_without_sequential_runs_has_no_curves(results_files, tmp_path):
    from odedit_hf.reporting import write_report

    written = write_report(results_files[:2], tmp_path / "r")
    assert set(written["figures"]) == {"metrics.png", "outcomes.png"}
    assert "sequential.png" not in (tmp_path / "r" / "index.html").read_text()


def test_report_rejects_a_file_that_is_not_results(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"hello": 1}))
    assert main(["report", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "is not an odedit-hf results file" in capsys.readouterr().err


def _chromium() -> str | None:
    return next(
        (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None
    )


@pytest.mark.skipif(
    _chromium() is None, reason="no headless chromium on this machine (apt-get install chromium)"
)
def test_report_renders_in_a_headless_browser(results_files, tmp_path):
    """The page renders in a real browser: its DOM, dumped by headless chromium, holds every figure
    with its natural size (an image that failed to load has naturalWidth 0)."""
    out = tmp_path / "report"
    assert main(["report", *results_files, "--out", str(out)]) == 0
    probe = out / "probe.html"
    page = (out / "index.html").read_text()
    script = (
        "<script>window.addEventListener('load', () => { document.title = JSON.stringify("
        "[...document.images].map(i => [i.getAttribute('src'), i.naturalWidth, i.naturalHeight])); });</script>"
    )
    probe.write_text(page.replace("</body>", script + "</body>"))
    result = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
         "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    title = re.search(r"<title>(.*?)</title>", result.stdout, re.S).group(1)
    images = json.loads(title.replace("&quot;", '"'))
    assert sorted(src for src, _, _ in images) == ["metrics.png", "outcomes.png", "sequential.png"]
    assert all(width > 100 and height > 50 for _, width, height in images), images
    assert os.path.getsize(out / "metrics.png") > 0


@pytest.fixture(scope="module")
def saved_lora_edit(results_files, tmp_path_factory):
    """A LoRA sequential run of the three records with its adapter saved: (model dir, data, adapter, results)."""
    folder = os.path.dirname(results_files[0])
    model, data = os.path.join(folder, "model"), os.path.join(folder, "edits.json")
    out = tmp_path_factory.mktemp("saved")
    argv = ["edit", "--model", model, "--data", data, "--method", "lora", "--protocol", "sequential"]
    argv += [
        "--lora.steps",
        "10",
        "--no-progress",
        "--save-adapter",
        str(out / "adapter"),
        "--out",
        str(out / "r.json"),
    ]
    assert main(argv) == 0
    return model, data, str(out / "adapter"), str(out / "r.json")


def test_report_projects_hidden_states_before_and_after_the_edit(saved_lora_edit, tmp_path):
    model, data, adapter, results = saved_lora_edit
    out = tmp_path / "report"
    argv = [
        "report",
        results,
        "--out",
        str(out),
        "--projection-adapter",
        adapter,
        "--model",
        model,
        "--data",
        data,
    ]
    assert main(argv) == 0
    page = (out / "index.html").read_text()
    assert "projection.png" in re.findall(r"<img src='([^']+)'", page)
    assert (out / "projection.png").read_bytes().startswith(PNG_MAGIC)
    from odedit_hf.reporting.projection import Projection

    proj = Projection.from_json((out / "projection.json").read_text())
    assert proj.groups == ["edit", "rephrase", "image_rephrase", "loc", "m_loc"]
    assert len(proj.points) == 3 * 5 * 2 and proj.method == "lora"
    assert 0.0 < sum(proj.explained) <= 1.0 + 1e-9
    # the edit moved the edit prompt's state (before = adapter disabled, after = enabled)
    assert proj.shift["edit"] > 1e-3
    moved = {
        (p["case_id"], p["group"]): p for p in proj.points if p["stage"] == "after" and p["group"] == "edit"
    }
    still = {
        (p["case_id"], p["group"]): p for p in proj.points if p["stage"] == "before" and p["group"] == "edit"
    }
    assert any(abs(moved[k]["x"] - still[k]["x"]) + abs(moved[k]["y"] - still[k]["y"]) > 1e-6 for k in moved)


def test_an_identity_adapter_moves_nothing_in_the_projection(saved_lora_edit):
    from peft import LoraConfig, get_peft_model

    from odedit_hf.cli.edit import load_backbone
    from odedit_hf.data import load_mmedit
    from odedit_hf.reporting.projection import hidden_state_projection

    model, data, _, _ = saved_lora_edit
    backbone = load_backbone(model, device="cpu", progress=False)
    requests = list(load_mmedit(data, image_root=os.path.dirname(data)))
    peft_model = get_peft_model(backbone.model, LoraConfig(r=2, target_modules=["down_proj"]))  # B = 0
    proj = hidden_state_projection(peft_model, backbone, requests)
    assert all(v == 0.0 for v in proj.shift.values()), proj.shift
    pos = {(p["case_id"], p["group"], p["stage"]): (p["x"], p["y"]) for p in proj.points}
    assert all(pos[(c, g, "before")] == pytest.approx(pos[(c, g, "after")], abs=1e-9) for c, g, _ in pos)


def test_report_projection_options_need_each_other(results_files, tmp_path, capsys):
    assert main(["report", results_files[0], "--out", str(tmp_path / "r"), "--projection-adapter", "x"]) == 2
    assert "needs --model" in capsys.readouterr().err
    assert main(["report", results_files[0], "--out", str(tmp_path / "r2"), "--model", "m"]) == 2
    assert "add --projection-adapter" in capsys.readouterr().err

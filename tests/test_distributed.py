"""The single protocol sharded over two processes (torchrun, gloo on CPU) writes the results one process
writes; each edit's outcome depends on its own seed only, so any subset of the requests reproduces its rows.
The ODEdit Trainer and editor training (MEND, ODEdit+MEND, SERAC) on two processes keep their replicas equal."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from odedit_hf.cli.main import main
from odedit_hf.evaluation.distributed import shard_bounds
from odedit_hf.testing import tiny_backbone
from odedit_hf.testing.tiny import tiny_image

WORDS = ["what is the capital of France? Tokyo Paris London", "which animal is this? a red square blue yes"]
RECORD = {
    "src": "what is the capital of France?",
    "pred": "Paris",
    "image": "img0.png",
    "rephrase": "capital of France?",
    "image_rephrase": "img1.png",
    "loc": "what is the capital of France?",
    "loc_ans": "Paris",
    "m_loc": "img1.png",
    "m_loc_q": "which animal is this?",
    "m_loc_a": "a red square",
}
TARGETS = ["Tokyo", "London", "yes", "blue", "Paris"]
# GRACE draws a new codebook value from the torch RNG at every edit: the case that needs per-edit seeds
ARGS = ["--method", "grace", "--grace.steps", "3", "--no-progress"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    backbone = tiny_backbone("llava", seed=0, texts=WORDS)
    backbone.model.save_pretrained(folder / "model")
    backbone.processor.save_pretrained(folder / "model")
    for i in range(2):
        tiny_image(i).save(folder / f"img{i}.png")
    (folder / "edits.json").write_text(json.dumps([dict(RECORD, alt=a) for a in TARGETS]))
    return folder


def _rows(path):
    doc = json.loads(path.read_text())
    return doc, [
        {k: v for k, v in e.items() if k not in ("wall_time_s", "peak_memory_mb")} for e in doc["edits"]
    ]


@pytest.fixture(scope="module")
def one_process(inputs):
    out = inputs / "one.json"
    argv = ["edit", "--model", str(inputs / "model"), "--data", str(inputs / "edits.json"), *ARGS]
    assert main([*argv, "--out", str(out)]) == 0
    return _rows(out)


@pytest.mark.skipif(
    shutil.which("torchrun") is None
    and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
    reason="torchrun is not installed",
)
def test_two_processes_write_the_rows_one_process_writes(inputs, one_process, tmp_path):
    out = tmp_path / "two.json"
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "odedit_hf.cli.main", "edit"]
    cmd += ["--model", str(inputs / "model"), "--data", str(inputs / "edits.json"), *ARGS, "--out", str(out)]
    cmd += ["--num-edits", "5"]  # the README's spelling: torchrun's parser rejects --n as ambiguous
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    doc1, rows1 = one_process
    doc2, rows2 = _rows(out)
    assert rows2 == rows1  # every per-edit score, step count and final loss
    assert doc2["aggregates"] == doc1["aggregates"]
    procs = doc2["rollback"]["processes"]
    assert [p["rank"] for p in procs] == [0, 1] and [p["n_edits"] for p in procs] == [3, 2]
    assert {p["base_weights_hash"] for p in procs} == {doc1["rollback"]["base_weights_hash"]}
    assert doc2["rollback"]["checks"] == sum(p["rollback_checks"] for p in procs)
    assert doc2["config"]["num_processes"] == 2
    assert done.stdout.count("results:") == 1  # only the main process writes and prints


def test_a_subset_of_the_requests_reproduces_its_rows(inputs, one_process, tmp_path):
    # the last two records alone (same case_ids: a file whose first three records are skipped by position
    # would renumber them, so the subset is taken from the loaded requests)
    from odedit_hf.cli.edit import load_backbone
    from odedit_hf.data import load_mmedit
    from odedit_hf.editing import build_method
    from odedit_hf.evaluation import build_report, run_protocol

    requests = list(load_mmedit(str(inputs / "edits.json"), image_root=str(inputs)))[3:]
    backbone = load_backbone(str(inputs / "model"), device="cpu", progress=False)
    method = build_method("grace", {"grace": {"steps": 3}})
    run = run_protocol("single", method, backbone, requests, seed=0)
    rows = [
        {k: v for k, v in e.items() if k not in ("wall_time_s", "peak_memory_mb")}
        for e in build_report(run, requests=requests)["edits"]
    ]
    _, all_rows = one_process
    assert rows == all_rows[3:]


def test_shards_cover_every_chunk_once():
    for n in range(1, 12):
        for world in range(1, 5):
            spans = [shard_bounds(n, world, r) for r in range(world)]
            covered = [i for lo, hi in spans for i in range(lo, hi)]
            assert covered == list(range(n))
            assert max(hi - lo for lo, hi in spans) - min(hi - lo for lo, hi in spans) <= 1
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        shard_bounds(4, 2, 2)


def test_sequential_cannot_be_sharded():
    from odedit_hf.evaluation.distributed import run_protocol_distributed

    class _State:
        num_processes, process_index, is_main_process = 2, 0, True

    with pytest.raises(ValueError, match="cannot be split across processes"):
        run_protocol_distributed("sequential", None, None, [], state=_State())


def test_the_command_closes_the_launchers_process_group_and_main_keeps_it(tmp_path, capsys):
    """A run under torchrun left its gloo group to the exit-time destructors, and a rank that had finished
    could abort (SIGABRT: "terminate called without an active exception"); the command now destroys the
    group once it has returned, while in-process callers of main() keep theirs."""
    import torch.distributed as dist

    from odedit_hf.cli.main import entry

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert main(["methods"]) == 0
        assert dist.is_initialized()
        assert entry(["methods"]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert "odedit" in capsys.readouterr().out
    assert entry(["methods"]) == 0  # no group: nothing to close, no error


def test_odedit_trainer_on_two_processes_keeps_replicas_and_lambda_in_step(tmp_path):
    # each rank edits a different half of the batch: without the all-reduce of the dual gradient (and DDP's
    # of the primal one) the replicas' lambda-networks and adapters would drift apart
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun is not installed")
    script = os.path.join(os.path.dirname(__file__), "_ddp_odedit_trainer.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["rank"] for r in rows) == [0, 1] and all(r["world"] == 2 for r in rows)
    assert rows[0]["adapter"] == rows[1]["adapter"]
    assert rows[0]["lambda_net"] == rows[1]["lambda_net"]
    assert rows[0]["lambda_end"] == rows[1]["lambda_end"] != rows[0]["lambda_start"]  # the dual step ran


# ---------------------------------------------------------------- editor training on two processes
TRAIN_ARGS = ["--max-records", "9", "--val-fraction", "0.34"]  # 6 train, 3 validation: a padded last shard
TRAIN_ARGS += ["--train.max-steps", "3", "--train.eval-steps", "1", "--train.logging-steps", "1"]


def _one_process_reference(micro_world, method, out):  # noqa: ANN001, ANN202
    """What one process trains on the two processes' global batch: one request per micro-batch, two
    accumulated per optimiser step (each process takes one request per step; DDP averages the two)."""
    argv = ["train-editor", "--method", method, "--model", micro_world.model_dir, "--data", micro_world.root]
    argv += ["--out", str(out), "--device", "cpu", "--no-progress", *TRAIN_ARGS, "--train.norm-samples", "6"]
    # the torchrun ranks run with OMP_NUM_THREADS=1: one thread here too, or the float sums (and, over 60
    # steps of MEND's training, the weights) differ by more than the tolerance when pytest runs on 2 threads
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*argv, "--train.gradient-accumulation-steps", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _evals(path):  # noqa: ANN001, ANN202
    history = json.loads((path / "training_history.json").read_text())
    return [
        {k: v for k, v in h.items() if k.startswith("eval_") and "runtime" not in k and "per_second" not in k}
        for h in history
        if "eval_loss" in h
    ]


def test_editor_training_on_two_processes_agrees_and_writes_one_artefact(micro_world, tmp_path):  # noqa: ANN001
    # MEND, ODEdit+MEND and SERAC through `odedit-hf train-editor` under torchrun: each rank trains on its own
    # requests; without the gradient all-reduce (the loss run through DDP's forward), the merged statistics
    # and the dual step's averaged signal the replicas would end apart; only the main process writes
    from safetensors.torch import load_file

    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun is not installed")
    script = os.path.join(os.path.dirname(__file__), "_ddp_train_editor.py")
    methods = ["mend", "odedit+mend", "serac"]
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", script, micro_world.model_dir, micro_world.root]
    cmd += [str(tmp_path), ",".join(methods), *TRAIN_ARGS]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("artefact:") == 3  # the main process reports each artefact, once
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no staging folder left
    for method in methods:
        rows = [json.loads((tmp_path / f"{method}-rank{r}.json").read_text()) for r in (0, 1)]
        assert [r["rank"] for r in rows] == [0, 1] and all(r["world"] == 2 for r in rows)
        assert [r["writes"] for r in rows] == [1, 0], f"{method}: the main process writes, alone"
        assert rows[0]["artefact"] == rows[1]["artefact"]  # every rank returned after the one write
        assert all(r["edits"] for r in rows), f"{method}: the artefact did not edit"
        key = "serac" if method == "serac" else "net"
        assert rows[0][key] == rows[1][key] == rows[0]["artefact"], f"{method}: the replicas differ"
        if method != "serac":
            assert rows[0]["stats"] == rows[1]["stats"]
        if method == "odedit+mend":
            assert rows[0]["lambda_net"] == rows[1]["lambda_net"]
            assert rows[0]["lambda_end"] == rows[1]["lambda_end"] != rows[0]["lambda_start"]  # the dual step
            assert rows[0]["dual_steps"] == rows[1]["dual_steps"] == 3
    # the two processes train what one process trains on their global batch (float32 sums in another order:
    # every weight within 1e-5 of its tensor's largest magnitude; the validation figures, gathered over both
    # shards with the padded last one dropped, within 1e-5 relative)
    for method in ("mend", "odedit+mend"):
        two = tmp_path / method.replace("+", "-")
        one = _one_process_reference(micro_world, method, tmp_path / f"one-{method.replace('+', '-')}")
        config = json.loads((two / "mend_config.json").read_text())["extra"]
        assert config["num_processes"] == 2
        w1, w2 = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
        assert w1.keys() == w2.keys()
        for name in w1:
            scale = float(w1[name].abs().max())
            torch.testing.assert_close(
                w2[name], w1[name], rtol=1e-5, atol=1e-5 * scale, msg=f"{method} {name}"
            )
        e1, e2 = _evals(one), _evals(two)
        assert len(e1) == len(e2) == 3 and [e.keys() for e in e1] == [e.keys() for e in e2]
        for a, b in zip(e1, e2):
            for name in a:
                assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-6), (method, name)

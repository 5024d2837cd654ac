"""The embedded world (issue 3): generator, renderer, exporter, pretrained micro model, cache, CLI.

The fast tests need no model. The model tests share the session-scoped ``micro_world`` fixture
(tests/conftest.py), built once per session (~1 minute) and cached under the repo's ``.cache/``.

Accuracy gates for the micro world (stated, slightly below the tiny world's bars, since micro trains
for ~500 steps): trained facts >= 0.90, held-out paraphrases >= 0.85, unseen renderings >= 0.85,
text-only facts >= 0.90, counterfactual VQA targets <= 0.25 (chance is ~1/8).
"""

from __future__ import annotations

import filecmp
import json
import os
import stat

import pytest

from odedit_hf.data.world import PRESETS, WORLD_VERSION, edit_records, export_world, generate_world
from odedit_hf.data.world.export import HELDOUT_RENDERING_BASE, image_name, shared_attributes
from odedit_hf.data.world.render import render_array
from odedit_hf.data.world.spec import (
    CAPTION_RELATION,
    EDIT_RELATIONS,
    RELATIONS,
    TEXT_RELATIONS,
    VISUAL_RELATIONS,
)

MICRO_GATES = {
    "trained": 0.90,
    "heldout_paraphrase": 0.85,
    "unseen_rendering": 0.85,
    "text_only": 0.90,
    "text_heldout": 0.90,
}


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


# ------------------------------------------------------------------------------------ generator
def test_generator_is_deterministic_and_seed_dependent():
    a, b, c = generate_world("micro", 0), generate_world("micro", 0), generate_world("micro", 1)
    assert a == b
    assert [e.facts for e in a.entities] == [e.facts for e in b.entities]
    assert [e.name for e in a.entities] != [e.name for e in c.entities]


def test_world_structure():
    world = generate_world("tiny", 0)
    assert len(world.entities) == PRESETS["tiny"].num_entities
    identities = {(e.shape, e.colour, e.pattern, e.accent) for e in world.entities}
    assert len(identities) == len(world.entities), "two entities look the same"
    names = [e.name for e in world.entities]
    assert len(set(names)) == len(names)
    for e in world.entities:
        assert set(e.facts) == set(RELATIONS)
    for relation in RELATIONS:
        train = {t.text for t in world.train_templates(relation)}
        heldout = {t.text for t in world.heldout_templates(relation)}
        assert train and heldout and not train & heldout
        # a held-out paraphrase is a new sentence made of words the model has read
        train_words = {w for r in RELATIONS for t in world.train_templates(r) for w in t.text.split()}
        assert all(w in train_words for t in heldout for w in t.split())
    assert all(t.render().endswith("?") for r in VISUAL_RELATIONS for t in world.templates[r])
    assert not any(t.render().endswith("?") for t in world.templates["caption"])


def test_unknown_preset_and_bad_seed():
    with pytest.raises(ValueError, match="unknown world preset"):
        generate_world("huge", 0)
    with pytest.raises(ValueError, match="seed"):
        generate_world("micro", -1)


def test_preset_validates_its_training_knobs():
    import dataclasses

    with pytest.raises(ValueError, match="perception_share"):
        dataclasses.replace(PRESETS["tiny"], perception_share=0.0)
    with pytest.raises(ValueError, match="vision_pretrain_steps"):
        dataclasses.replace(PRESETS["tiny"], vision_pretrain_steps=-1)


def test_build_world_rejects_bad_threads(tmp_path):
    from odedit_hf.data.world import build_world

    for threads in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="threads"):
            build_world("micro", 0, out=tmp_path / "w", threads=threads)


def test_renderings_differ_but_are_reproducible():
    entity = generate_world("micro", 0).entities[0]
    first = render_array(entity, 0, 0)
    assert first.shape == (32, 32, 3) and first.dtype.name == "uint8"
    assert (first == render_array(entity, 0, 0)).all()
    unseen = render_array(entity, 0, HELDOUT_RENDERING_BASE)
    assert (abs(first.astype(int) - unseen.astype(int)) > 30).mean() > 0.05, (
        "a rephrase image must really differ"
    )


# ------------------------------------------------------------------------------------ export
def test_export_is_byte_identical_per_seed_and_differs_across_seeds(tmp_path):
    export_world(generate_world("micro", 0), str(tmp_path / "a"))
    export_world(generate_world("micro", 0), str(tmp_path / "b"))
    export_world(generate_world("micro", 1), str(tmp_path / "c"))
    files = _tree(tmp_path / "a")
    assert files == _tree(tmp_path / "b") and any(f.endswith(".png") for f in files)
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", files, shallow=False)
    assert not mismatch and not errors
    assert (tmp_path / "a" / "evqa_eval.json").read_bytes() != (
        tmp_path / "c" / "evqa_eval.json"
    ).read_bytes()
    png = (tmp_path / "a" / next(f for f in files if f.endswith(".png"))).read_bytes()
    assert b"tIME" not in png and b"tEXt" not in png


def test_exported_records_load_through_the_loader(tmp_path):
    from odedit_hf.data import load_mmedit

    world = generate_world("micro", 0)
    files = export_world(world, str(tmp_path))
    by_name = {e.name: e for e in world.entities}
    preset = PRESETS["micro"]
    for path, task in (
        (files.vqa_eval, "vqa"),
        (files.vqa_train, "vqa"),
        (files.caption_eval, "caption"),
        (files.caption_train, "caption"),
    ):
        dataset = load_mmedit(path, files.image_root, files.image_root)  # task="auto" must infer it
        assert dataset.task == task
        expected = preset.num_eval_edits if "eval" in path else preset.num_train_edits
        assert len(dataset) == expected
        for req in dataset:
            assert req.alt != req.pred and req.rephrase != req.src
            assert req.image != req.image_rephrase and os.path.isfile(req.image_rephrase)
            assert req.load_image("image_rephrase").size == (32, 32)
            entity = next(
                e for e in world.entities if os.path.basename(req.image).startswith(f"e{e.index:04d}_")
            )
            assert req.pred in {entity.facts[r] for r in EDIT_RELATIONS}
            loc_name = next(w for w in req.loc.split() if w in by_name)
            assert req.loc_ans in {by_name[loc_name].facts[r] for r in TEXT_RELATIONS}
            assert loc_name != entity.name and req.m_loc != req.image
    # train and eval records edit different (image, question) pairs
    pairs = lambda recs: {(r["image"], r["pred"]) for r in recs}  # noqa: E731
    assert not pairs(edit_records(world, "vqa", "train")) & pairs(edit_records(world, "vqa", "eval"))


def test_vision_pretraining_trains_the_tower_and_leaves_a_plain_llava():
    import dataclasses
    import math

    import torch

    from odedit_hf.data.world.build import _pool_pixel_values
    from odedit_hf.data.world.pretrain import attribute_labels, build_model, pretrain_vision
    from odedit_hf.data.world.spec import PERCEPTION_RELATIONS
    from odedit_hf.data.world.tokenizer import build_processor

    preset = dataclasses.replace(
        PRESETS["micro"], train_renderings=4, batch_size=32, vision_pretrain_steps=40, vision_pretrain_lr=3e-3
    )
    world = generate_world(preset, 0)
    processor = build_processor(world)
    pixel_values = _pool_pixel_values(world, processor, progress=False)
    labels = attribute_labels(world, preset.train_renderings)
    assert labels.shape == (len(world.entities) * 4, len(PERCEPTION_RELATIONS))
    entity = world.entities[5]
    assert world.answers["shape"][int(labels[5 * 4 + 3, PERCEPTION_RELATIONS.index("shape")])] == entity.shape

    torch.manual_seed(0)
    model = build_model(preset, processor)
    keys = set(model.state_dict())
    before = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    stats = pretrain_vision(model, world, pixel_values, preset, seed=0, progress=False)
    after = model.model.vision_tower.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the vision tower did not train"
    assert set(model.state_dict()) == keys, "the attribute heads must not stay in the model"
    chance = sum(math.log(len(world.answers[r])) for r in PERCEPTION_RELATIONS)
    assert stats["vision_steps"] == 40 and stats["vision_loss"] < 0.5 * chance, stats


# ------------------------------------------------------------------------------------ probes (v4)
#: sha256 of the eleven MMEdit fields of every record, as world version 3 (content version 3) wrote them
#: (computed with the version-3 code, commit 9462d5d): the probes of version 4 must leave them untouched,
#: so every table measured on version 3 stays valid.
V3_RECORD_DIGESTS = {
    ("micro", "vqa", "train"): "f06fc70cb7a50ddcb38f1b53285a57318d9525c0cbb29f3bb872c77a75c7f72f",
    ("micro", "vqa", "eval"): "d2ecec8665c74439bd4e3d6f7a74a7c21c65350a280296d3d9c70f906f0508a2",
    ("micro", "caption", "train"): "7c3bdc99d7bef15f6f1cc65cb7765f5479e44c297c4bd81c6f89c2ac79b27a77",
    ("micro", "caption", "eval"): "bb27ec7431148ac7badb8f857a970bf9239d904096054e1040dd0c9d44689505",
    ("tiny", "vqa", "train"): "bc3a2951051718dd5065919f5bc831931211fc8220b9b7b2cc2ba7ca0201c90f",
    ("tiny", "vqa", "eval"): "443bc3928a3cc8ee17c5d9fcf66b1e4491ca240d180a279a21d5f000c7645a28",
    ("tiny", "caption", "train"): "169305b294a9aae4c34cee54bf0de256adc4cd13c9f90af4ba9ab50f685f23c2",
    ("tiny", "caption", "eval"): "c7fdba731d9355c56e09293137e3c41c3b6bd6c41a2c5567b08adbb4a5b02baf",
}
#: sha256 of the entities (attributes, facts) and of every string the tokenizer is trained on, version 3:
#: unchanged, the model trains on the same data.
V3_WORLD_DIGESTS = {
    "micro": "16283c355a23e5c3f8beb6ae7bec9bc8ed04b023a67cb3f52d0d192a7e8e53db",
    "tiny": "557a56fe939a65b3538206abefd768acd5e7170c33db1431a874aa5465aa1390",
}


def _sha(obj) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, ensure_ascii=False).encode()).hexdigest()


def test_probes_leave_the_version_3_content_unchanged():
    from odedit_hf.data import MMEDIT_FIELDS

    for preset in ("micro", "tiny"):
        world = generate_world(preset, 0)
        entities = [[e.index, e.shape, e.colour, e.pattern, e.accent, e.facts] for e in world.entities]
        assert _sha(entities + [world.all_text()]) == V3_WORLD_DIGESTS[preset]
        for task in ("vqa", "caption"):
            for split in ("train", "eval"):
                records = edit_records(world, task, split)
                assert list(records[0])[:11] == list(MMEDIT_FIELDS)  # the eleven first, in file order
                eleven = [[r[k] for k in MMEDIT_FIELDS] for r in records]
                assert _sha(eleven) == V3_RECORD_DIGESTS[(preset, task, split)], (preset, task, split)
                assert [{k: r[k] for k in MMEDIT_FIELDS} for r in records] == edit_records(
                    world, task, split, probes=False
                )


def test_probes_are_what_they_claim():
    world = generate_world("tiny", 0)
    by_image = {image_name(e): e for e in world.entities}
    by_name = {e.name: e for e in world.entities}
    kinds = set()
    for task in ("vqa", "caption"):
        for rec in edit_records(world, task, "eval"):
            entity = by_image[rec["image"]]
            relation = next(r for r in EDIT_RELATIONS if entity.facts[r] == rec["pred"])
            assert relation == CAPTION_RELATION if task == "caption" else relation in VISUAL_RELATIONS
            port = rec["portability"]
            kinds |= set(port)
            for probe in port.get("by_name", []):
                # the edited relation, asked about the entity by name, text only; target = the new answer
                assert relation in TEXT_RELATIONS and entity.name in probe["prompt"].split()
                assert probe["ground_truth"] == rec["alt"] and "image" not in probe
                assert probe["prompt"] in {t.render(entity.name) for t in world.train_templates(relation)}
            for probe in port.get("one_hop", []):
                assert probe["image"] == rec["image"]
                if relation == "food":
                    assert probe["ground_truth"] == f"{entity.name} eating {rec['alt']}"
                elif relation == "name":
                    assert probe["ground_truth"] == f"{rec['alt']} eating {entity.facts['food']}"
                else:  # a caption edit: its name and its food
                    assert probe["ground_truth"] in rec["alt"].split(" eating ")
            assert port, "every world record has at least one portability probe"
            # hard negatives: a look-alike (3 of 4 attributes), the edited relation, an answer the edit would flip
            look_alike = by_image[rec["hard_m_loc"]]
            assert look_alike.index != entity.index and shared_attributes(entity, look_alike) == 3
            assert rec["hard_m_loc_a"] == look_alike.facts[relation] != rec["alt"]
            assert rec["hard_m_loc_q"] in {t.render() for t in world.train_templates(relation)}
            name = next(w for w in rec["hard_loc"].split() if w in by_name)
            assert by_name[name] is look_alike and rec["hard_loc_ans"] in look_alike.facts.values()
            # the knowledge unit: every held-out template, every held-out rendering, the record's own first
            heldout = [t.render() for t in world.heldout_templates(relation)]
            assert rec["rephrases"][0] == rec["rephrase"] and sorted(rec["rephrases"]) == sorted(heldout)
            assert rec["image_rephrases"] == [
                image_name(entity, unseen=j) for j in range(world.preset.heldout_renderings)
            ]
            assert rec["image_rephrases"][0] == rec["image_rephrase"]
    assert kinds == {"by_name", "one_hop"}


def test_exported_probes_load_through_the_loader(tmp_path):
    from odedit_hf.data import load_mmedit

    files = export_world(generate_world("micro", 0), str(tmp_path))
    for path in (files.vqa_eval, files.caption_eval):
        for req in load_mmedit(path, files.image_root):
            assert req.portability and req.has_hard_t_locality and req.has_hard_m_locality
            assert len(req.rephrases) == 3 and len(req.image_rephrases) == PRESETS["micro"].heldout_renderings
            assert req.image_rephrases[0] == req.image_rephrase and os.path.isfile(req.hard_m_loc)
            assert all(p.image in (None, req.image) for p in req.portability)


# ------------------------------------------------------------------------------------ the model
def test_micro_world_meets_its_accuracy_gates(micro_world):
    acc = micro_world.accuracies
    for key, gate in MICRO_GATES.items():
        assert acc[key] >= gate, f"{key}: {acc[key]:.3f} < {gate}"
    assert acc["counterfactual_vqa"] <= 0.25, acc["counterfactual_vqa"]
    info = json.loads(open(os.path.join(micro_world.root, "world_info.json")).read())
    assert info["world_version"] == WORLD_VERSION and info["preset"] == "micro"


def test_saved_model_loads_like_a_hub_model_and_answers(micro_world):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from odedit_hf.backbones import Backbone, PromptSample
    from odedit_hf.data import load_mmedit
    from odedit_hf.data.world.pretrain import teacher_forced_accuracy

    model = LlavaForConditionalGeneration.from_pretrained(micro_world.model_dir)
    processor = AutoProcessor.from_pretrained(micro_world.model_dir)
    text = processor.apply_chat_template(
        [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "who made this object ?"}],
            }
        ],
        add_generation_prompt=True,
    )
    assert text.endswith("assistant :") and "<image>" in text
    backbone = Backbone(model.eval(), processor)
    requests = list(
        load_mmedit(micro_world.vqa_eval, micro_world.image_root, micro_world.rephrase_image_root)
    )
    samples = [PromptSample(r.src, r.pred, r.load_image()) for r in requests]
    acc, _ = teacher_forced_accuracy(backbone, samples)
    assert acc >= MICRO_GATES["trained"]
    alt_acc, _ = teacher_forced_accuracy(
        backbone, [PromptSample(r.src, r.alt, r.load_image()) for r in requests]
    )
    assert alt_acc < acc


def test_training_rows_are_the_prompts_build_batch_makes(micro_world):
    from PIL import Image

    from odedit_hf.backbones import PromptSample
    from odedit_hf.data.world.pretrain import make_training_rows

    backbone = micro_world.load_backbone()
    world = micro_world.spec()
    rows = make_training_rows(world, backbone, pool_size=4, num_samples=50, seed=0)
    image = Image.new("RGB", (32, 32))
    tok = backbone.tokenizer
    for row in rows[:20]:
        target = tok.decode([i for i in row.labels if i != -100])
        prompt_ids = [i for i, lab in zip(row.input_ids, row.labels) if lab == -100]
        question = (
            tok.decode(prompt_ids, skip_special_tokens=True)
            .split("user :")[1]
            .split("assistant :")[0]
            .strip()
        )
        task = "caption" if not question.endswith("?") else "vqa"
        sample = PromptSample(question, target, image if row.image >= 0 else None, task)
        batch = backbone.build_batch([sample])
        assert batch["input_ids"][0].tolist() == list(row.input_ids)
        assert batch["labels"][0].tolist() == list(row.labels)


def test_cache_hit_loads_without_building_and_is_the_same(micro_world, monkeypatch):
    from odedit_hf.data.world import build, build_world

    def no_build(*args, **kwargs):
        raise AssertionError("a cache hit must not build (generate, train, measure) the world again")

    monkeypatch.setattr(build, "_build_into", no_build)
    again = build_world(preset="micro", seed=0, out=micro_world.root, progress=False)
    assert again.from_cache and again.accuracies == micro_world.accuracies
    with pytest.raises(ValueError, match="holds world"):
        build_world(preset="micro", seed=1, out=micro_world.root, progress=False)


def test_cli_world_build_prints_the_table(micro_world, capsys):
    from odedit_hf.cli.main import main

    assert main(["world", "build", "--preset", "micro", "--seed", "0", "--out", micro_world.root]) == 0
    out = capsys.readouterr().out
    assert "unseen renderings" in out and f"{micro_world.accuracies['trained']:.3f}" in out


def _as_older_version(src: str, dst: str) -> None:
    """Copy a world to ``dst`` and make it look like version 3 (no content_version key, as v3 wrote it)."""
    import shutil

    shutil.copytree(src, dst)
    path = os.path.join(dst, "world_info.json")
    info = json.loads(open(path).read())
    info["world_version"] = "3"
    info.pop("content_version", None)
    with open(path, "w") as fh:
        json.dump(info, fh)


def test_build_reuses_the_model_of_an_older_version_with_the_same_content(micro_world, tmp_path, monkeypatch):
    from odedit_hf.data.world import build as build_module
    from odedit_hf.data.world import build_world

    cache = tmp_path / "cache"
    _as_older_version(micro_world.root, str(cache / "micro-seed0-v3"))
    assert build_module.find_model_donor(str(cache / f"micro-seed0-v{WORLD_VERSION}"), "micro", 0) == str(
        cache / "micro-seed0-v3"
    )
    assert build_module.find_model_donor(str(cache / f"micro-seed1-v{WORLD_VERSION}"), "micro", 1) is None

    def no_training(*args, **kwargs):
        raise AssertionError("the model must be copied, not trained")

    monkeypatch.setattr(build_module, "_build_into", no_training)
    world = build_world("micro", 0, out=cache / f"micro-seed0-v{WORLD_VERSION}", progress=False)
    assert world.info["model_from"]["root"] == str(cache / "micro-seed0-v3")
    assert world.accuracies == micro_world.accuracies and world.world_version == WORLD_VERSION
    files = _tree(micro_world.model_dir)
    _, mismatch, errors = filecmp.cmpfiles(micro_world.model_dir, world.model_dir, files, shallow=False)
    assert files == _tree(world.model_dir) and not mismatch and not errors
    _, mismatch, errors = filecmp.cmpfiles(
        micro_world.data_dir, world.data_dir, _tree(world.data_dir), shallow=False
    )
    assert not mismatch and not errors  # the same v4 data files as a from-scratch build

    # a donor whose model measures differently from what it recorded is not trusted: the build trains
    tampered = tmp_path / "cache2"
    _as_older_version(micro_world.root, str(tampered / "micro-seed0-v3"))
    info_path = tampered / "micro-seed0-v3" / "world_info.json"
    info = json.loads(info_path.read_text())
    info["accuracies"]["trained"] = 0.5
    info_path.write_text(json.dumps(info))
    calls = []

    def fake_training(root, world, *, progress, threads):
        calls.append(sorted(os.listdir(root)))
        raise RuntimeError("stop here")

    monkeypatch.setattr(build_module, "_build_into", fake_training)
    with pytest.raises(RuntimeError, match="stop here"):
        build_world("micro", 0, out=tampered / f"micro-seed0-v{WORLD_VERSION}", progress=False)
    assert calls == [[]], "training starts from an empty folder after a rejected copy"
    assert not os.path.exists(tampered / f"micro-seed0-v{WORLD_VERSION}")
    # force never copies
    monkeypatch.setattr(build_module, "_build_into", fake_training)
    with pytest.raises(RuntimeError, match="stop here"):
        build_world("micro", 0, out=cache / "micro-seed0-vX", progress=False, force=True)


def test_a_built_world_gets_the_umask_modes_not_private_temporaries(micro_world):
    # a shared world cache must be readable as the umask allows (the build writes through 0600/0700
    # temporaries, and once left the whole world private)
    from odedit_hf.editing.saving import default_mode

    root = micro_world.root
    assert stat.S_IMODE(os.stat(root).st_mode) == default_mode(directory=True)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode) == default_mode(
                directory=True
            ), name
        for name in files:
            assert stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode) == default_mode(), name


def test_world_files_are_written_with_the_umask_mode(tmp_path):
    from odedit_hf.data.world.export import write_bytes_atomic

    old = os.umask(0o027)
    try:
        write_bytes_atomic(str(tmp_path / "a.json"), b"[]")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o640


def test_world_training_bars_show_the_loss_instead_of_printing_log_dicts(tmp_path, capfd):
    # Trainer's ProgressCallback writes "{'loss': ...}" lines between the bars; the world build shows the
    # loss on the bar instead (and still logs it)
    import torch
    from transformers import Trainer, TrainingArguments

    from odedit_hf.data.world.pretrain import _use_bar_postfix

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(2, 1)

        def forward(self, x, labels):
            return {"loss": ((self.w(x).squeeze(-1) - labels) ** 2).mean()}

    data = [{"x": torch.ones(2), "labels": torch.tensor(1.0)}] * 8
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=4,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
    )
    trainer = Trainer(model=Tiny(), args=args, train_dataset=data)
    _use_bar_postfix(trainer)
    trainer.train()
    out, err = capfd.readouterr()
    assert "{'loss'" not in out + err
    assert "loss=" in err  # on the bar


def test_world_info_names_the_model_and_the_machine_it_was_trained_on(micro_world):
    # the same seed trains another model on a CPU whose kernels take another code path: the world says which
    import hashlib

    import torch

    from odedit_hf.cli.world import format_table

    info = micro_world.info
    with open(os.path.join(micro_world.model_dir, "model.safetensors"), "rb") as fh:
        assert info["model_sha256"] == hashlib.sha256(fh.read()).hexdigest()
    machine = info["machine"]
    assert machine["torch"] == torch.__version__ and machine["cpu"]
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(machine["env"]) <= {
        "ATEN_CPU_CAPABILITY",
        "MKL_CBWR",
        "MKL_ENABLE_INSTRUCTIONS",
        "ONEDNN_MAX_CPU_ISA",
        "OMP_NUM_THREADS",
    }
    table = format_table(micro_world)
    assert f"model sha256: {info['model_sha256']}" in table and machine["cpu_capability"] in table

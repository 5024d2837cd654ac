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

import pytest

from odedit_hf.data.world import PRESETS, WORLD_VERSION, edit_records, export_world, generate_world
from odedit_hf.data.world.export import HELDOUT_RENDERING_BASE
from odedit_hf.data.world.render import render_array
from odedit_hf.data.world.spec import EDIT_RELATIONS, RELATIONS, TEXT_RELATIONS, VISUAL_RELATIONS

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

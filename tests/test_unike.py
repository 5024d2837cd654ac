"""UniKE specifics (the common editor checks run from tests/editor_cases.py): each half changes the output
when on and nothing when off, the semantic gate of the key-value memory, the truthfulness steering of the
neuron keys, the variants, growth and save/load of the memory, and the contrastive heads."""

from __future__ import annotations

import os

import pytest
import torch
from peft import PeftModel, get_peft_model

import odedit_hf  # noqa: F401  registers the PEFT types
from odedit_hf.editing import edit_samples, get_method, model_inputs
from odedit_hf.evaluation import token_accuracy
from odedit_hf.testing import tiny_backbone, tiny_image

TEXTS = [
    "what color is the cube",
    "which colour has the cube",
    "what is the capital of france",
    "what animal is this",
    "red blue green yellow black white",
    "paris cat dog",
]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:  # noqa: ANN001
    root = tmp_path_factory.mktemp("unike_images")
    paths = []
    for i in range(4):
        path = os.path.join(root, f"img{i}.png")
        tiny_image(i).save(path)
        paths.append(path)
    return paths


def _request(images: list[str], case_id: int = 0, src: str = "what color is the cube", alt: str = "blue"):  # noqa: ANN202
    from odedit_hf.data import EditRequest

    return EditRequest(
        case_id=case_id,
        task="vqa",
        source="in-memory",
        src=src,
        pred="red",
        alt=alt,
        image=images[case_id % 3],
        rephrase="which colour has the cube",
        image_rephrase=images[(case_id + 1) % 3],
        loc="what is the capital of france",
        loc_ans="paris",
        m_loc=images[3],
        m_loc_q="what animal is this",
        m_loc_a="cat",
    )


def _logits(model, backbone, sample) -> torch.Tensor:  # noqa: ANN001
    batch = backbone.build_batch([sample])
    with torch.no_grad():
        return model(**model_inputs(batch)).logits, batch["labels"]


def _wrapped(**options):  # noqa: ANN003, ANN202
    torch.manual_seed(0)
    backbone = tiny_backbone("llava", seed=0, texts=TEXTS)
    method = get_method("unike", encoder_source="edits", **options)
    peft_model = get_peft_model(backbone.model, method.peft_config(backbone))
    return backbone, method, peft_model


def _layers(peft_model):  # noqa: ANN001, ANN202
    from odedit_hf.editors.unike.method import _layers

    return _layers(peft_model, "default")


@pytest.mark.parametrize("half", ["intrinsic", "extrinsic"])
def test_each_half_alone_edits_and_the_other_half_stays_empty(images, half):  # noqa: ANN001
    backbone, method, peft_model = _wrapped(
        intrinsic=half == "intrinsic", extrinsic=half == "extrinsic", steps=80, train_up=True
    )
    request = _request(images)
    sample = edit_samples([request])[0]
    base, labels = _logits(peft_model, backbone, sample)
    assert token_accuracy(base, labels)[0].item() < 1.0, "the target already holds: the test could not fail"
    method.edit(peft_model, backbone, [request])
    groups, memory = _layers(peft_model)
    neurons = sum(g["key"].num_neurons("default") for g in groups.values())
    tokens = memory.num_tokens("default")
    if half == "intrinsic":
        assert neurons > 0 and tokens == 0
    else:
        assert neurons == 0 and tokens > 0
    edited, _ = _logits(peft_model, backbone, sample)
    assert token_accuracy(edited, labels)[0].item() == 1.0, f"the {half} half alone does not hold the edit"
    # the half that is off adds nothing: switching the other half's layers off gives the base exactly
    live = [memory] if half == "extrinsic" else [layer for g in groups.values() for layer in g.values()]
    for layer in live:
        layer.enable_adapters(False)
    try:
        again, _ = _logits(peft_model, backbone, sample)
    finally:
        for layer in live:
            layer.enable_adapters(True)
    assert torch.equal(again, base), "the half that is off changed the output"


def test_both_off_is_refused():
    with pytest.raises(ValueError, match="both off"):
        get_method("unike", intrinsic=False, extrinsic=False)


def _memory_layer(semantic: bool, threshold: float = 0.5):  # noqa: ANN202
    from odedit_hf.editors.unike import MemoryLinear, UniKEConfig

    torch.manual_seed(0)
    config = UniKEConfig(
        patch_modules={"x.k": "key", "x.v": "value"},
        memory_module="x.o",
        sem_dim=2,
        tru_dim=2,
        ffn_dim=4,
        sim_threshold=threshold,
        semantic_retrieval=semantic,
    )
    layer = MemoryLinear(torch.nn.Linear(4, 3), "default", config)
    # semantic head: keeps coordinates 0 and 1, drops 2 and 3
    sem = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    layer.set_encoders("default", sem, torch.zeros(2, 4))
    return layer


def test_memory_retrieves_in_the_semantic_space_and_is_exact_elsewhere():
    key = torch.tensor([[1.0, 0.0, 5.0, 5.0]])
    related = torch.tensor([[2.0, 0.0, -3.0, 0.0]])  # the same semantic coordinates, other nuisance ones
    nuisance = torch.tensor([[0.0, 1.0, 5.0, 5.0]])  # raw cosine 0.98 with the key, semantic cosine 0
    for semantic, fires_on in ((True, related), (False, nuisance)):
        layer = _memory_layer(semantic)
        empty = {name: layer(x) for name, x in (("related", related), ("nuisance", nuisance))}
        layer.add_entry("default", key, torch.tensor([[0.0, 0.0, 0.0, 9.0]]))
        other = nuisance if fires_on is related else related
        with torch.no_grad():
            assert not torch.equal(layer(fires_on), layer.base_layer(fires_on)), "the memory did not fire"
            name = "nuisance" if other is nuisance else "related"
            assert torch.equal(layer(other), empty[name]), "the memory changed an unrelated position"
            assert torch.equal(layer(other), layer.base_layer(other))
            alpha, entry = layer.gate("default", key)
            assert alpha.item() == pytest.approx(1.0) and entry.item() == 0
    layer.enable_adapters(False)
    assert torch.equal(layer(related), layer.base_layer(related))


def test_memory_retrieves_the_entry_of_the_nearest_anchor_and_grows():
    layer = _memory_layer(semantic=True, threshold=0.0)
    a, b = torch.tensor([[1.0, 0.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    layer.add_entry("default", a, torch.tensor([[0.0, 0.0, 7.0, 0.0]]))
    layer.add_entry("default", b, torch.tensor([[0.0, 0.0, 0.0, 7.0]]), fixed_keys=torch.ones(2, 4))
    assert layer.num_entries("default") == 2 and layer.num_tokens("default") == 4
    assert layer.unike_kv_entry["default"].tolist() == [0.0, 1.0, 1.0, 1.0]
    assert layer.unike_kv_value["default"].shape == (1, 4)  # only the latest entry's own values train
    _, entry = layer.gate("default", torch.cat([a, b]))
    assert entry.tolist() == [0, 1]
    # the retrieved entry's values come out: position a mixes in entry 0's value only
    with torch.no_grad():
        mixed = layer.mix("default", a)
    assert torch.allclose(mixed, torch.tensor([[0.0, 0.0, 7.0, 0.0]]), atol=1e-5)


def test_truthfulness_steers_the_new_keys_only_with_disentangle(images):
    request = _request(images)
    keys = {}
    for disentangle in (True, False):
        backbone, method, peft_model = _wrapped(disentangle=disentangle, extrinsic=False, beta=0.5, steps=1)
        from odedit_hf.editors.tpatcher.memory import capture_inputs

        groups, memory = _layers(peft_model)
        key_layer = groups[max(groups)]["key"]
        batch = backbone.build_batch(edit_samples([request]))
        with capture_inputs(key_layer) as seen, torch.no_grad():
            peft_model(**model_inputs(batch))
        method.before_edit(peft_model, backbone, [request])
        keys[disentangle] = key_layer.unike_weight["default"].detach().clone()
        q = seen[0].reshape(batch["labels"].shape[0], batch["labels"].shape[1], -1)[0].float()
        plain = q / q.pow(2).sum(-1, keepdim=True)
        matches = (keys[disentangle].unsqueeze(1) - plain.unsqueeze(0)).abs().amax(-1).min(-1).values
        if disentangle:
            assert memory.encoder_ready("default") and memory.unike_tru_weight["default"].any()
            assert (matches > 1e-4).all(), "the truthfulness direction did not move the keys"
        else:
            assert not memory.encoder_ready("default")
            assert (matches < 1e-6).all(), "without disentangle the keys must be T-Patcher's q/|q|^2"


def test_variants_fill_only_unset_fields():
    code = get_method("unike", variant="code")
    assert (code.extrinsic, code.steps, code.neurons, code.layers, code.lr) == (False, 1, 20, [-2, -1], 7e-4)
    assert code.act_weight == 0 and code.mem_weight == 0 and code.beta == 0.1
    paper = get_method("unike")
    assert paper.intrinsic and paper.extrinsic and paper.disentangle and paper.steps == 50
    mixed = get_method("unike", variant="code", extrinsic=True, steps=3)
    assert mixed.extrinsic and mixed.steps == 3 and mixed.neurons == 20
    with pytest.raises(ValueError, match="variant"):
        get_method("unike", variant="released")


def test_code_variant_adds_a_fixed_neuron_count_per_patched_ffn(images):
    backbone, method, peft_model = _wrapped(variant="code", neurons=3)
    method.edit(peft_model, backbone, [_request(images)])
    groups, memory = _layers(peft_model)
    assert len(groups) == 2 and [g["key"].num_neurons("default") for g in groups.values()] == [3, 3]
    assert memory.num_tokens("default") == 0


def test_grown_memory_and_heads_save_and_reload_exactly(images, tmp_path):
    backbone, method, peft_model = _wrapped(steps=20)
    method.edit(peft_model, backbone, [_request(images, 0)])
    method.edit(peft_model, backbone, [_request(images, 1, src="what animal is this", alt="dog")])
    _, memory = _layers(peft_model)
    assert memory.num_entries("default") == 2
    sample = edit_samples([_request(images)])[0]
    logits, _ = _logits(peft_model, backbone, sample)
    peft_model.save_pretrained(tmp_path)
    fresh = tiny_backbone("llava", seed=0, texts=TEXTS)
    loaded = PeftModel.from_pretrained(fresh.model, str(tmp_path))
    _, loaded_memory = _layers(loaded)
    assert loaded_memory.num_entries("default") == 2 and loaded_memory.encoder_ready("default")
    assert torch.equal(loaded_memory.unike_sem_weight["default"], memory.unike_sem_weight["default"])
    again, _ = _logits(loaded, fresh, sample)
    torch.testing.assert_close(again, logits, rtol=0, atol=1e-6)


def test_contrastive_head_pulls_groups_together():
    from odedit_hf.editors.unike.encoder import contrastive_loss, train_head

    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=generator) * 3
    labels = torch.arange(4).repeat_interleave(10)
    states = centres[labels] + torch.randn(40, 8, generator=generator) + 5.0  # a shared offset, as in LMs
    head, before, after = train_head(states, labels, 4, steps=100, lr=5e-2, temperature=0.1, batch=64, seed=0)
    assert after < before * 0.5
    z = torch.nn.functional.normalize(states @ head.T, dim=-1)
    assert contrastive_loss(z, labels, 0.1).item() == pytest.approx(after, rel=1e-4)
    sims = z @ z.T
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    assert sims[same].mean() > sims[~same].mean() + 0.5


def test_a_batch_edit_adds_one_trainable_entry_per_request(images):
    backbone, method, peft_model = _wrapped(intrinsic=False, steps=80, demos=0)
    requests = [_request(images, 0), _request(images, 1, src="what animal is this", alt="dog")]
    method.edit(peft_model, backbone, requests)
    _, memory = _layers(peft_model)
    assert memory.num_entries("default") == 2
    own = memory.unike_kv_anchor_entry["default"]
    # every request's own pairs train (none was frozen by the next request's entry)
    assert memory.unike_kv_value["default"].shape[0] == own.numel() == memory.num_tokens("default")
    assert sorted(set(own.tolist())) == [0.0, 1.0]
    for i, request in enumerate(requests):
        sample = edit_samples([request])[0]
        logits, labels = _logits(peft_model, backbone, sample)
        assert token_accuracy(logits, labels)[0].item() == 1.0, f"request {i} of the batch does not hold"

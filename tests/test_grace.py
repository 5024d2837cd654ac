"""GRACE-specific checks (the common editor checks run from tests/editor_cases.py): the add / split / expand
rule, rollback shrinking the codebook, bit-identical outputs outside every radius, the replaced positions of
a multi-token target, only the current value trainable, and save/load of a grown codebook."""

from __future__ import annotations

import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import odedit_hf  # noqa: F401  registers the PEFT types
from odedit_hf.backbones import IGNORE_INDEX
from odedit_hf.editing import eval_samples, get_method, model_inputs
from odedit_hf.editors.grace import EXPAND_SLACK, grace_layers
from odedit_hf.evaluation import token_accuracy
from odedit_hf.testing import tiny_backbone, tiny_image

TEXTS = [
    "what color is the cube",
    "which colour has the cube",
    "what is the capital of france",
    "what animal is this",
    "red",
    "blue",
    "paris",
    "cat",
    "green",
    "blue green",
]
ADAPTER = "default"


@pytest.fixture(scope="module")
def requests(tmp_path_factory):  # noqa: ANN001
    """Four edit requests on the tiny LLaVA: 0 and 1 differ in target, 2 shares request 0's target, 3 has a
    two-token target."""
    from odedit_hf.data import EditRequest

    root = tmp_path_factory.mktemp("grace-images")
    paths = []
    for i in range(5):
        path = os.path.join(root, f"img{i}.png")
        tiny_image(i).save(path)
        paths.append(path)
    common = {
        "task": "vqa",
        "source": "in-memory",
        "pred": "red",
        "rephrase": "which colour has the cube",
        "loc": "what is the capital of france",
        "loc_ans": "paris",
        "m_loc": paths[4],
        "m_loc_q": "what animal is this",
        "m_loc_a": "cat",
    }
    specs = [
        ("what color is the cube", "blue", 0),
        ("what animal is this", "green", 1),
        ("which colour has the cube", "blue", 2),
        ("what color is the cube", "blue green", 0),
    ]
    return [
        EditRequest(
            case_id=i, src=src, alt=alt, image=paths[img], image_rephrase=paths[(img + 1) % 4], **common
        )
        for i, (src, alt, img) in enumerate(specs)
    ]


def _backbone():  # noqa: ANN202
    torch.manual_seed(0)
    return tiny_backbone("llava", seed=0, texts=TEXTS)


def _batch(backbone, request, sample: str = "reliability"):  # noqa: ANN001, ANN202
    return backbone.build_batch([eval_samples(request)[sample]])


def _logits(model, batch) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        return model(**model_inputs(batch)).logits


def _query(backbone, method, request) -> torch.Tensor:  # noqa: ANN001
    """The codebook layer's input at the last prompt token of the request's edit sample, on the plain model."""
    module = backbone.model.get_submodule(method.target_module(backbone))
    batch = _batch(backbone, request)
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    try:
        _logits(backbone.model, batch)
    finally:
        handle.remove()
    position = int((batch["labels"][0] != IGNORE_INDEX).int().argmax()) - 1
    return seen[0][0, position].float()


def _wrap(backbone, **options):  # noqa: ANN001, ANN003, ANN202
    method = get_method("grace", **{"steps": 8, **options})
    peft_model = get_peft_model(backbone.model, method.peft_config(backbone))
    layer = grace_layers(peft_model, ADAPTER)[0][1]
    return method, peft_model, layer


def _distance(backbone, requests, i: int, j: int) -> float:  # noqa: ANN001
    method = get_method("grace")
    return float((_query(backbone, method, requests[i]) - _query(backbone, method, requests[j])).norm())


def test_a_far_query_adds_a_key(requests):  # noqa: ANN001
    backbone = _backbone()
    d = _distance(backbone, requests, 0, 1)
    eps = d / 4  # d > eps + eps: out of reach
    method, peft_model, layer = _wrap(backbone, eps_init=eps)
    expected_key = _query(backbone, method, requests[1])
    method.edit(peft_model, backbone, [requests[0]])
    assert method.last_updates == [("add", 0)] and layer.codebook_size(ADAPTER) == 1
    method.edit(peft_model, backbone, [requests[1]])
    assert method.last_updates == [("add", 1)] and layer.codebook_size(ADAPTER) == 2
    torch.testing.assert_close(layer.grace_radii[ADAPTER], torch.tensor([eps, eps]))
    assert torch.equal(layer.grace_keys[ADAPTER][1], expected_key)
    green = backbone.tokenizer(" green", add_special_tokens=False)["input_ids"]
    assert layer.label(ADAPTER, 1) == green
    for request in requests[:2]:
        batch = _batch(backbone, request)
        assert token_accuracy(_logits(peft_model, batch), batch["labels"])[0].item() == 1.0


def test_a_near_query_with_another_label_splits_both_radii(requests):  # noqa: ANN001
    backbone = _backbone()
    d = _distance(backbone, requests, 0, 1)
    method, peft_model, layer = _wrap(backbone, eps_init=0.75 * d)  # eps < d <= 2 eps: within reach
    method.edit(peft_model, backbone, [requests[0]])
    method.edit(peft_model, backbone, [requests[1]])
    assert method.last_updates == [("split", 1)] and layer.codebook_size(ADAPTER) == 2
    keys = layer.grace_keys[ADAPTER]
    half = float((keys[0] - keys[1]).norm()) / 2
    torch.testing.assert_close(layer.grace_radii[ADAPTER], torch.tensor([half, half]))
    for request in requests[:2]:  # both edits hold: each key is the nearest of its own query
        batch = _batch(backbone, request)
        assert token_accuracy(_logits(peft_model, batch), batch["labels"])[0].item() == 1.0


def test_a_near_query_with_the_same_label_expands_the_radius(requests):  # noqa: ANN001
    backbone = _backbone()
    d = _distance(backbone, requests, 0, 2)
    method, peft_model, layer = _wrap(backbone, eps_init=0.75 * d)
    method.edit(peft_model, backbone, [requests[0]])
    value_after_first = layer.grace_values[ADAPTER][0].detach().clone()
    method.edit(peft_model, backbone, [requests[2]])
    assert method.last_updates == [("expand", 0)] and layer.codebook_size(ADAPTER) == 1
    assert float(layer.grace_radii[ADAPTER][0]) == pytest.approx(d * (1 + EXPAND_SLACK), rel=1e-5)
    assert layer.trainable_indices(ADAPTER) == [0]  # the expanded entry's value is trained again
    assert not torch.equal(layer.grace_values[ADAPTER][0], value_after_first)
    batch = _batch(backbone, requests[2])
    assert token_accuracy(_logits(peft_model, batch), batch["labels"])[0].item() == 1.0


def test_rollback_deletes_the_new_entry_and_undoes_the_split(requests):  # noqa: ANN001
    backbone = _backbone()
    d = _distance(backbone, requests, 0, 1)
    method, peft_model, layer = _wrap(backbone, eps_init=0.75 * d)
    empty = method.snapshot(peft_model, ADAPTER)
    method.edit(peft_model, backbone, [requests[0]])
    batch = _batch(backbone, requests[0])
    after_first = _logits(peft_model, batch)
    state = layer.codebook_state(ADAPTER)
    snapshot = method.snapshot(peft_model, ADAPTER)
    method.edit(peft_model, backbone, [requests[1]])
    assert layer.codebook_size(ADAPTER) == 2 and float(layer.grace_radii[ADAPTER][0]) < 0.75 * d
    snapshot.restore()
    assert layer.codebook_size(ADAPTER) == 1 and len(layer.grace_values[ADAPTER]) == 1
    for key in ("keys", "radii", "labels"):
        assert torch.equal(layer.codebook_state(ADAPTER)[key], state[key]), key
    assert torch.equal(layer.grace_values[ADAPTER][0], state["values"][0])
    assert layer.trainable_indices(ADAPTER) == [0]
    assert torch.equal(_logits(peft_model, batch), after_first)
    empty.restore()
    assert layer.codebook_size(ADAPTER) == 0
    with peft_model.disable_adapter():
        base = _logits(peft_model, batch)
    assert torch.equal(_logits(peft_model, batch), base)


@pytest.mark.parametrize("replacement", ["span", "last"])
def test_queries_outside_every_radius_leave_the_output_bit_identical(requests, replacement):  # noqa: ANN001
    backbone = _backbone()
    samples = eval_samples(requests[0])
    loc_batches = [backbone.build_batch([samples[k]]) for k in ("t_locality", "m_locality", "t_generality")]
    base = [_logits(backbone.model, b) for b in loc_batches]
    method, peft_model, layer = _wrap(backbone, eps_init=1e-4, replacement=replacement)
    method.edit(peft_model, backbone, [requests[0]])
    edit_batch = _batch(backbone, requests[0])
    mask, _ = layer.hits(ADAPTER, _layer_input(peft_model, layer, edit_batch))
    assert bool(mask.any()), "the edit prompt itself must hit the codebook: the test could not fail"
    for batch, reference in zip(loc_batches, base):
        mask, _ = layer.hits(ADAPTER, _layer_input(peft_model, layer, batch))
        assert not bool(mask.any())
        assert torch.equal(_logits(peft_model, batch), reference)


def _layer_input(peft_model, layer, batch) -> torch.Tensor:  # noqa: ANN001
    seen = []
    handle = layer.get_base_layer().register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    try:
        _logits(peft_model, batch)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("replacement", ["span", "last"])
def test_replaced_positions_of_a_multi_token_target(requests, replacement):  # noqa: ANN001
    """Teacher forcing scores every position that predicts a target token (the last prompt token and every
    target token but the last). At the last decoder layer a replaced output only reaches its own position,
    so ``span`` must replace exactly those positions; ``last`` replaces only the key's own position."""
    backbone = _backbone()
    request = requests[3]
    batch = _batch(backbone, request)
    targets = (batch["labels"][0] != IGNORE_INDEX).nonzero().flatten()
    assert len(targets) == 2, "the target must have two tokens"
    predicting = (targets - 1).tolist()
    method, peft_model, layer = _wrap(backbone, eps_init=1e-4, replacement=replacement, steps=30)
    method.edit(peft_model, backbone, [request])
    mask, row = layer.hits(ADAPTER, _layer_input(peft_model, layer, batch))
    replaced = mask[0].nonzero().flatten().tolist()
    assert replaced == (predicting if replacement == "span" else predicting[:1])
    assert row[0][mask[0]].tolist() == list(range(len(replaced)))  # one value row per replaced position
    assert layer.value_rows(ADAPTER) == [len(replaced)]
    accuracy, _ = token_accuracy(_logits(peft_model, batch), batch["labels"])
    with peft_model.disable_adapter():
        base_accuracy, _ = token_accuracy(_logits(peft_model, batch), batch["labels"])
    if replacement == "span":
        assert accuracy.item() == 1.0 and base_accuracy.item() < 1.0
    else:  # the second target position is the base model's: at most the first token comes out edited
        second = _logits(peft_model, batch)[0, predicting[1]]
        with peft_model.disable_adapter():
            assert torch.equal(second, _logits(peft_model, batch)[0, predicting[1]])


def test_only_the_current_value_trains_also_under_odedit(requests):  # noqa: ANN001
    for name in ("grace", "odedit+grace"):
        backbone = _backbone()
        options = {"steps": 6, "eps_init": 1e-4}
        if name == "grace":
            method = get_method(name, **options)
        else:
            method = get_method(name, odedit={"lambda_mode": "sketch"}, grace=options)
        peft_model = get_peft_model(backbone.model, method.peft_config(backbone))
        layer = grace_layers(peft_model, ADAPTER)[0][1]
        assert method.adapter_is_identity(peft_model)
        method.edit(peft_model, backbone, [requests[0]])
        assert not method.adapter_is_identity(peft_model)
        first = layer.grace_values[ADAPTER][0].detach().clone()
        method.before_edit(peft_model, backbone, [requests[1]])
        with peft_model.disable_adapter():  # peft re-enables gradients on exit; earlier values stay frozen
            pass
        params = method.edit_parameters(peft_model)
        assert len(params) == 1 and params[0] is layer.grace_values[ADAPTER][1]
        assert [id(p) for p in peft_model.parameters() if p.requires_grad] == [id(params[0])]
        second = params[0].detach().clone()
        method.edit(peft_model, backbone, [requests[1]])  # the same query again: expands entry 1
        assert layer.codebook_size(ADAPTER) == 2
        assert torch.equal(layer.grace_values[ADAPTER][0], first), f"{name}: an earlier value moved"
        assert not torch.equal(layer.grace_values[ADAPTER][1], second), (
            f"{name}: the current value did not train"
        )


def test_save_and_load_a_grown_codebook_of_three_entries(requests, tmp_path):  # noqa: ANN001
    backbone = _backbone()
    d = _distance(backbone, requests, 0, 1)
    method, peft_model, layer = _wrap(backbone, eps_init=0.75 * d)
    # add; split; request 3 has request 0's prompt and image (nearly the same query) and another label:
    # a split to a tiny radius
    updates = []
    for request in (requests[0], requests[1], requests[3]):
        method.edit(peft_model, backbone, [request])
        updates += method.last_updates
    assert layer.codebook_size(ADAPTER) == 3
    batches = [_batch(backbone, r) for r in requests[:4]] + [_batch(backbone, requests[0], "m_locality")]
    assert layer.value_rows(ADAPTER) == [1, 1, 2]
    assert [a for a, _ in updates] == ["add", "split", "split"]
    mask, row = layer.hits(ADAPTER, _layer_input(peft_model, layer, batches[3]))
    assert row[0][mask[0]].tolist() == [2, 3]  # entry 2's two rows (after entries 0 and 1, one row each)
    expected = [_logits(peft_model, b) for b in batches]
    peft_model.save_pretrained(tmp_path)
    saved = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert sorted(k.rsplit(".", 1)[-1] for k in saved if ".grace_values." in k) == ["0", "1", "2"]
    fresh = _backbone()
    loaded = PeftModel.from_pretrained(fresh.model, str(tmp_path))
    loaded_layer = grace_layers(loaded, ADAPTER)[0][1]
    assert loaded_layer.codebook_size(ADAPTER) == 3
    original, copy = layer.codebook_state(ADAPTER), loaded_layer.codebook_state(ADAPTER)
    for key in ("keys", "radii", "labels"):
        assert torch.equal(original[key], copy[key]), key
    assert all(torch.equal(a, b) for a, b in zip(original["values"], copy["values"]))
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference
    for batch, reference in zip(batches, expected):
        assert torch.equal(_logits(loaded, batch), reference)
    # a plain load_state_dict into an empty codebook resizes it too
    other = get_peft_model(_backbone().model, method.peft_config(backbone))
    other.load_state_dict(peft_model.state_dict())
    assert torch.equal(_logits(other, batches[0]), expected[0])


def test_merge_is_refused_and_options_are_checked():
    from odedit_hf.editors.grace import GRACEConfig

    backbone = _backbone()
    method, peft_model, _ = _wrap(backbone)
    with pytest.raises(ValueError, match="cannot be merged"):
        peft_model.merge_adapter()
    with pytest.raises(ValueError, match="cannot be merged"):
        peft_model.merge_and_unload()
    for bad in ({"eps_init": 0.0}, {"replacement": "all"}, {"value_init": "hot"}, {"layer": "1"}):
        with pytest.raises(ValueError, match="GRACEMethod"):
            get_method("grace", **bad)
    for bad in ({"target_modules": None}, {"target_modules": ["x"], "eps_init": -1.0}):
        with pytest.raises(ValueError, match="GRACEConfig"):
            GRACEConfig(**bad)
    assert method.target_module(backbone).endswith("layers.1.mlp.down_proj")  # the last layer's default
    assert get_method("grace", layer=0).target_module(backbone).endswith("layers.0.mlp.down_proj")


def test_exact_ties_go_to_the_newest_entry():
    from odedit_hf.editors.grace import GRACEConfig, Linear

    layer = Linear(torch.nn.Linear(4, 3), ADAPTER, GRACEConfig(target_modules=["x"], replacement="last"))
    key = torch.tensor([1.0, 0.0, 0.0, 0.0])
    layer.add_entry(ADAPTER, key, [5], 0.5, torch.zeros(1, 3))
    layer.add_entry(ADAPTER, key, [6], 0.5, torch.ones(1, 3))
    x = torch.stack([key, torch.tensor([0.0, 0.0, 0.0, 9.0])]).unsqueeze(0)  # (1, 2, 4): a tie, a miss
    mask, row = layer.hits(ADAPTER, x)
    assert mask.tolist() == [[True, False]] and int(row[0, 0]) == 1
    with torch.no_grad():
        out = layer(x)
        assert torch.equal(out[0, 0], torch.ones(3))
        assert torch.equal(out[0, 1], layer.get_base_layer()(x)[0, 1])

"""LDKE's own checks (the wrapper matrix in tests/test_editors.py runs the common ones): the classifier
gates a locality prompt off and the edit prompt on, Fast Localization picks the layer where the
gradient is, rollback restores the classifier, save/load reproduces the logits, switches and options."""

from __future__ import annotations

import os

import pytest
import torch
from peft import PeftModel, get_peft_model

import odedit_hf  # noqa: F401  registers the PEFT types
from odedit_hf.editing import eval_samples, get_method, model_inputs
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
    "which shape is shown",
    "what shape is shown",
]


@pytest.fixture(scope="module")
def requests(tmp_path_factory):  # noqa: ANN001
    from odedit_hf.data import EditRequest

    root = tmp_path_factory.mktemp("ldke_images")
    paths = []
    for i in range(4):
        path = os.path.join(root, f"img{i}.png")
        tiny_image(i).save(path)
        paths.append(path)
    common = {
        "task": "vqa",
        "source": "in-memory",
        "pred": "red",
        "loc": "what is the capital of france",
        "loc_ans": "paris",
        "m_loc": paths[3],
        "m_loc_q": "what animal is this",
        "m_loc_a": "cat",
    }
    first = EditRequest(
        case_id=0,
        src="what color is the cube",
        alt="blue",
        image=paths[0],
        image_rephrase=paths[1],
        rephrase="which colour has the cube",
        **common,
    )
    second = EditRequest(
        case_id=1,
        src="which shape is shown",
        alt="green",
        image=paths[2],
        image_rephrase=paths[0],
        rephrase="what shape is shown",
        **common,
    )
    return first, second


def _logits(model, batch):  # noqa: ANN001, ANN202
    with torch.no_grad():
        return model(**model_inputs(batch)).logits


EDITOR_OPTIONS = {"ftl": {"steps": 40, "lr": 1e-2}, "lora": {"steps": 40, "lr": 5e-2}}


def _setup(method_name: str = "ldke+ftl", **ldke):  # noqa: ANN202
    torch.manual_seed(0)
    backbone = tiny_backbone("llava", seed=0, texts=TEXTS)
    editor = method_name.split("+")[1]
    method = get_method(method_name, ldke=ldke, **{editor: EDITOR_OPTIONS[editor]})
    peft_model = get_peft_model(backbone.model, method.peft_config(backbone))
    return backbone, method, peft_model


def _batches(backbone, request):  # noqa: ANN001, ANN202
    s = eval_samples(request)
    return {name: backbone.build_batch([s[name]]) for name in ("reliability", "t_locality", "m_locality")}


def _answer_mask(batch):  # noqa: ANN001, ANN202
    mask = torch.zeros_like(batch["labels"], dtype=torch.bool)
    mask[:, :-1] = batch["labels"][:, 1:] != -100
    return mask


def test_classifier_gates_locality_off_and_the_edit_on(requests):  # noqa: ANN001
    backbone, method, peft_model = _setup()
    batches = _batches(backbone, requests[0])
    base = {k: _logits(peft_model, b) for k, b in batches.items()}
    method.edit(peft_model, backbone, [requests[0]])
    tuner = peft_model.base_model
    _logits(peft_model, batches["reliability"])
    edit_gate = tuner._ldke_gate_value
    assert bool(edit_gate[_answer_mask(batches["reliability"])].all()), "the gate is off on the edit's answer"
    for name in ("t_locality", "m_locality"):
        _logits(peft_model, batches[name])
        assert not bool(tuner._ldke_gate_value.any()), f"the gate fires on {name}"
        # hard gate: an out-of-scope prompt gets the base model's logits bit for bit
        assert torch.equal(_logits(peft_model, batches[name]), base[name])
    edited = _logits(peft_model, batches["reliability"])
    assert not torch.equal(edited, base["reliability"])
    labels = batches["reliability"]["labels"]
    assert bool(
        (edited[:, :-1].argmax(-1)[labels[:, 1:] != -100] == labels[:, 1:][labels[:, 1:] != -100]).all()
    )


def test_classifier_off_lets_the_edit_leak_into_locality(requests):  # noqa: ANN001
    # the control of the test above: without the gate the same edit changes the locality logits
    backbone, method, peft_model = _setup(classifier=False)
    batches = _batches(backbone, requests[0])
    base = _logits(peft_model, batches["t_locality"])
    method.edit(peft_model, backbone, [requests[0]])
    assert not torch.equal(_logits(peft_model, batches["t_locality"]), base)
    assert int(peft_model.base_model.gate_state().count) == 0


def _plant(backbone, dead_layer: int) -> None:  # noqa: ANN001
    # zero the up projection of one layer: its down_proj (the edited module) then sees a zero input, so
    # dL/dW = g xᵀ = 0 there and all of the gradient lies in the other layer
    up = backbone.decoder_layers()[dead_layer].mlp.up_proj
    with torch.no_grad():
        getattr(up, "get_base_layer", lambda: up)().weight.zero_()


@pytest.mark.parametrize("score", ["grad_x_weight", "grad_norm"])
@pytest.mark.parametrize("dead_layer", [0, 1])
def test_localization_picks_the_layer_with_the_gradient(requests, score: str, dead_layer: int):  # noqa: ANN001
    from odedit_hf.editors.ftl import FTLLayer

    backbone, method, peft_model = _setup(localization_score=score, classifier=False)
    _plant(backbone, dead_layer)
    method.edit(peft_model, backbone, [requests[0]])
    entry = method.localization_log[-1]
    expected = 1 - dead_layer
    assert entry["layers"] == [expected]
    assert entry["localization_s"] > 0
    assert float(entry["scores"][str(dead_layer)]) == 0.0 < float(entry["scores"][str(expected)])
    # only the chosen layer's delta was trained; the other candidate stays exactly zero
    for name, module in peft_model.named_modules():
        if isinstance(module, FTLLayer):
            changed = bool(module.ftl_delta["default"].any())
            assert changed == (f".layers.{expected}." in name), name


def test_localization_off_trains_every_candidate(requests):  # noqa: ANN001
    backbone, method, peft_model = _setup(localization=False)
    method.edit(peft_model, backbone, [requests[0]])
    assert method.localization_log[-1]["layers"] == [0, 1]
    assert peft_model.base_model.gate_state().used_layers.tolist() == [1, 1]


def test_unchosen_layers_contribute_nothing_even_if_not_identity(requests):  # noqa: ANN001
    # a non-identity fresh delta (FT-L init_weights=False) in a layer no edit chose must not act
    from odedit_hf.editors.ftl import FTLLayer

    backbone, method, peft_model = _setup(classifier=False)
    batch = _batches(backbone, requests[0])["reliability"]
    with peft_model.disable_adapter():
        base = _logits(peft_model, batch)
    for module in peft_model.modules():
        if isinstance(module, FTLLayer):
            module.reset_ftl_parameters("default", init_weights=False)
    assert torch.equal(_logits(peft_model, batch), base)


def test_rollback_restores_the_classifier_state(requests):  # noqa: ANN001
    backbone, method, peft_model = _setup()
    snapshot = method.snapshot(peft_model, "default")
    state = peft_model.base_model.gate_state()
    saved = {k: v.clone() for k, v in state.state_dict().items()}
    batch = _batches(backbone, requests[0])["reliability"]
    base = _logits(peft_model, batch)
    method.edit(peft_model, backbone, [requests[0]])
    method.edit(peft_model, backbone, [requests[1]])
    assert int(state.count) == 2 and bool(state.weight[:2].any())
    snapshot.restore()
    for key, value in state.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert torch.equal(_logits(peft_model, batch), base)


def test_save_load_reproduces_logits_and_classifier(requests, tmp_path):  # noqa: ANN001
    backbone, method, peft_model = _setup("ldke+lora")
    method.edit(peft_model, backbone, [requests[0]])
    method.edit(peft_model, backbone, [requests[1]])  # two classifiers, two chosen layers possibly
    batches = [*_batches(backbone, requests[0]).values(), _batches(backbone, requests[1])["reliability"]]
    expected = [_logits(peft_model, b) for b in batches]
    peft_model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert any("ldke_gate" in k for k in saved)
    fresh = tiny_backbone("llava", seed=0, texts=TEXTS)
    loaded = PeftModel.from_pretrained(fresh.model, str(tmp_path))
    for b, logits in zip(batches, expected):
        assert torch.equal(_logits(loaded, b), logits)
    original, restored = peft_model.base_model.gate_state(), loaded.base_model.gate_state()
    for key, value in original.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_merge_is_refused_with_the_classifier(requests):  # noqa: ANN001
    backbone, method, peft_model = _setup()
    assert method.merges is False
    with pytest.raises(ValueError, match="cannot be merged"):
        peft_model.merge_adapter()


def test_unload_removes_the_hooks(requests):  # noqa: ANN001
    backbone, method, peft_model = _setup()
    method.edit(peft_model, backbone, [requests[0]])
    tuner = peft_model.base_model

    def ours(module) -> int:  # noqa: ANN001
        hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
        return sum(getattr(h, "__self__", None) is tuner for h in hooks)

    assert sum(ours(m) for m in peft_model.modules()) > 0  # the check below could fail
    model = peft_model.unload()
    assert sum(ours(m) for m in model.modules()) == 0


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"k": 0}, "k must be a positive int"),
        ({"gate": "maybe"}, "gate must be one of"),
        ({"localization_score": "saliency"}, "localization_score must be one of"),
        ({"classifier_lr": 0}, "classifier_lr must be > 0"),
        ({"negative_pool": -1}, "negative_pool"),
        ({"candidate_layers": []}, "candidate_layers"),
        ({"nope": 1}, "unknown LDKE hyperparameters"),
    ],
)
def test_options_are_validated(options, match):  # noqa: ANN001
    with pytest.raises(ValueError, match=match):
        get_method("ldke+ftl", ldke=options)


def test_candidate_layers_only_for_ffn_editors():
    with pytest.raises(ValueError, match="candidate_layers applies to FFN editors"):
        get_method("ldke+grace", ldke={"candidate_layers": [1]})
    method = get_method("ldke+ftl", ldke={"candidate_layers": [1]})
    backbone = tiny_backbone("llava", seed=0, texts=TEXTS)
    assert sorted(method.peft_config(backbone).editor.target_modules) == [
        "model.language_model.layers.1.mlp.down_proj"
    ]


def test_classifier_capacity_is_enforced(requests):  # noqa: ANN001
    backbone, method, peft_model = _setup(classifier_capacity=1)
    method.edit(peft_model, backbone, [requests[0]])
    with pytest.raises(ValueError, match="classifier_capacity"):
        method.edit(peft_model, backbone, [requests[1]])

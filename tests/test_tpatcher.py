"""T-Patcher specifics (the common editor checks run from tests/editor_cases.py): neuron growth, key
initialisation, the activation and memory losses, rollback, save/load of grown patches, the exact form
of a patch neuron on a SwiGLU and a plain FFN, and locality on the memory."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from peft import PeftModel, get_peft_model

import odedit_hf  # noqa: F401  registers the PEFT types
from odedit_hf.backbones import IGNORE_INDEX
from odedit_hf.editing import edit_samples, get_method, model_inputs
from odedit_hf.testing import tiny_backbone, tiny_image

TEXTS = [
    "what color is the cube",
    "what is the capital of france",
    "what animal is this",
    "red blue green yellow black white",
    "paris cat dog",
]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:  # noqa: ANN001
    root = tmp_path_factory.mktemp("tp_images")
    paths = []
    for i in range(4):
        path = os.path.join(root, f"img{i}.png")
        tiny_image(i).save(path)
        paths.append(path)
    return paths


def _request(images: list[str], case_id: int, src: str, alt: str, image: int = 0):  # noqa: ANN202
    from odedit_hf.data import EditRequest

    return EditRequest(
        case_id=case_id,
        task="vqa",
        source="in-memory",
        src=src,
        pred="red",
        alt=alt,
        image=images[image],
        rephrase=src,
        image_rephrase=images[(image + 1) % 4],
        loc="what is the capital of france",
        loc_ans="paris",
        m_loc=images[3],
        m_loc_q="what animal is this",
        m_loc_a="cat",
    )


def _wrap(method, seed: int = 0):  # noqa: ANN001, ANN202
    backbone = tiny_backbone("llava", seed=seed, texts=TEXTS)
    return backbone, get_peft_model(backbone.model, method.peft_config(backbone))


def _layers(peft_model):  # noqa: ANN001, ANN202
    from odedit_hf.editors.tpatcher.method import _patch_layers

    return _patch_layers(peft_model, "default")


def _logits(model, batch):  # noqa: ANN001, ANN202
    with torch.no_grad():
        return model(**model_inputs(batch)).logits


def _ffn_inputs(backbone, peft_model, batch) -> torch.Tensor:  # noqa: ANN001
    """The last FFN's input (B, T, d), read with a hook of the test's own."""
    seen = []
    mlp = backbone.decoder_layers()[-1].mlp
    handle = mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        _logits(peft_model, batch)
    finally:
        handle.remove()
    return seen[0]


def _wrong_positions(logits: torch.Tensor, labels: torch.Tensor) -> list[list[int]]:
    out = []
    for b in range(labels.shape[0]):
        row = []
        for p in range(labels.shape[1] - 1):
            target = int(labels[b, p + 1])
            if target != IGNORE_INDEX and int(logits[b, p].argmax()) != target:
                row.append(p)
        out.append(row)
    return out


# ---------------------------------------------------------------------------- neuron count, key init
def test_one_neuron_per_wrong_target_token_capped(images):  # noqa: ANN001
    method = get_method("tpatcher", memory="off", max_add_neuron_num=2)
    backbone, peft_model = _wrap(method)
    short = _request(images, 0, "what color is the cube", "blue")
    long = _request(images, 1, "what animal is this", "red green blue yellow black white", image=2)
    batch = backbone.build_batch(edit_samples([short, long]))
    wrong = _wrong_positions(_logits(peft_model, batch), batch["labels"])
    assert len(wrong[0]) == 1 and len(wrong[1]) > 2, wrong  # else the cap would not be exercised
    method.before_edit(peft_model, backbone, [short, long])
    counts = {role: layer.num_neurons("default") for role, layer in _layers(peft_model).items()}
    expected = len(wrong[0]) + min(len(wrong[1]), 2)
    assert counts == {"key": expected, "up": expected, "value": expected}
    method.after_edit(peft_model, backbone, [short, long], None)
    # the next edit counts the errors of the model as it is now and adds to the patch
    method.before_edit(peft_model, backbone, [long])
    assert _layers(peft_model)["key"].num_neurons("default") == expected + 2
    assert _layers(peft_model)["key"].num_current("default") == 2


def test_key_initialisation_starts_the_activation_at_one_and_changes_no_output(images):  # noqa: ANN001
    method = get_method("tpatcher", memory="off")
    backbone, peft_model = _wrap(method)
    request = _request(images, 0, "what animal is this", "red green blue", image=2)
    batch = backbone.build_batch(edit_samples([request]))
    before = _logits(peft_model, batch)
    x = _ffn_inputs(backbone, peft_model, batch)
    wrong = _wrong_positions(before, batch["labels"])[0]
    assert wrong
    method.before_edit(peft_model, backbone, [request])
    layers = _layers(peft_model)
    keys = layers["key"].tpatcher_weight["default"].detach()
    bias = layers["key"].tpatcher_bias["default"].detach()
    queries = x[0, wrong[:5]]
    # neuron i fires exactly 1 at its own error input (key q/|q|^2, bias 0), and so does its up row
    torch.testing.assert_close(torch.diagonal(queries @ keys.T) + bias, torch.ones(len(wrong[:5])))
    up_rows = layers["up"].full("tpatcher_weight", "default").detach()
    torch.testing.assert_close(torch.diagonal(queries @ up_rows.T), torch.ones(len(wrong[:5])))
    assert layers["up"].num_current("default") == 0  # the up rows are fixed (train_up=False)
    a_edit, _ = method.edit_activations(peft_model)
    torch.testing.assert_close(a_edit.detach(), torch.ones(len(wrong[:5])))
    torch.testing.assert_close(
        layers["value"].tpatcher_scale["default"].detach(), torch.full((len(wrong[:5]),), 10.0)
    )
    # the value columns start at zero: the patched model gives the pre-edit logits
    torch.testing.assert_close(_logits(peft_model, batch), before, rtol=0, atol=1e-6)
    # the edit trains this edit's neurons only
    params = method.edit_parameters(peft_model)
    assert {tuple(p.shape) for p in params} == {(len(wrong[:5]), 32), (len(wrong[:5]),), (32, len(wrong[:5]))}


# ---------------------------------------------------------------------------- the losses
def test_activation_and_memory_losses_match_hand_computed_values():
    from odedit_hf.editors.tpatcher import activation_loss, memory_loss

    a_edit = torch.tensor([1.0, 2.0])
    a_mem = torch.tensor([[0.0, 1.0], [-1.0, 0.5], [2.0, -3.0]])
    e = math.exp
    # L_act: top-k mean of exp(margin - a)
    assert activation_loss(a_edit).item() == pytest.approx((e(-1) + e(-2)) / 2)
    assert activation_loss(a_edit, topk=1).item() == pytest.approx(e(-1))
    assert activation_loss(a_edit, margin=0.5, topk=1).item() == pytest.approx(e(-0.5))
    # L_mem, top-2: exp(a_mem - a_edit + 3) has entries e^2, e^2, e^1, e^1.5, e^4, e^-2 -> (e^4 + e^2) / 2;
    # exp(a_mem + 3) has e^3, e^4, e^2, e^3.5, e^5, e^0 -> (e^5 + e^4) / 2
    got = memory_loss(a_mem, a_edit, margin=3.0, floor=-3.0, topk=2).item()
    assert got == pytest.approx((e(4) + e(2)) / 2 + (e(5) + e(4)) / 2)
    # top-1000 over 6 entries = the plain mean
    full = sum(
        e(a_mem[i, j].item() - a_edit[j].item() + 3) + e(a_mem[i, j].item() + 3)
        for i in range(3)
        for j in range(2)
    )
    assert memory_loss(a_mem, a_edit).item() == pytest.approx(full / 6)
    assert memory_loss(torch.zeros(0, 2), a_edit).item() == 0.0


def test_extra_loss_is_the_weighted_losses_on_the_memory_and_past_edits(images):  # noqa: ANN001
    from odedit_hf.editors.tpatcher import activation_loss, memory_loss

    method = get_method("tpatcher", memory="off", act_weight=2.0, mem_weight=0.5, steps=3, stop_loss=None)
    backbone, peft_model = _wrap(method)
    first = _request(images, 0, "what color is the cube", "blue")
    method.before_edit(peft_model, backbone, [first])
    assert set(method.extra_loss(peft_model)) == {"tpatcher_act"}  # no memory yet
    method.after_edit(peft_model, backbone, [first], None)
    past = _layers(peft_model)["key"].tpatcher_memory["default"]
    labels = backbone.build_batch(edit_samples([first]))["labels"]
    assert past.shape == (int((labels != IGNORE_INDEX).sum()), 32)  # one state per target token
    assert method.extra_loss(peft_model) == {}  # no edit in progress
    second = _request(images, 1, "what animal is this", "green", image=2)
    method.before_edit(peft_model, backbone, [second])
    terms = method.extra_loss(peft_model)
    a_edit, a_mem = method.edit_activations(peft_model)
    assert a_mem.shape == (past.shape[0], a_edit.shape[0])  # the memory of the first edit
    torch.testing.assert_close(terms["tpatcher_act"], 2.0 * activation_loss(a_edit))
    torch.testing.assert_close(terms["tpatcher_mem"], 0.5 * memory_loss(a_mem, a_edit))
    terms["tpatcher_mem"].backward()
    key = _layers(peft_model)["key"]
    assert (
        key.tpatcher_weight["default"].grad is not None
        and key.tpatcher_weight["default"].grad.abs().sum() > 0
    )


# ---------------------------------------------------------------------------- rollback, save/load
@pytest.fixture(scope="module")
def two_edits(images):  # noqa: ANN001, ANN202
    method = get_method("tpatcher", memory="off", steps=20, stop_loss=None)
    backbone, peft_model = _wrap(method)
    first = _request(images, 0, "what color is the cube", "blue")
    second = _request(images, 1, "what animal is this", "red green blue", image=2)
    batch = backbone.build_batch(edit_samples([first, second]))
    base_logits = _logits(peft_model, batch)
    fresh = method.snapshot(peft_model, "default")
    method.edit(peft_model, backbone, [first])
    after_first = method.snapshot(peft_model, "default")
    first_logits = _logits(peft_model, batch)
    n_first = _layers(peft_model)["key"].num_neurons("default")
    method.edit(peft_model, backbone, [second])
    return {
        "method": method,
        "backbone": backbone,
        "peft_model": peft_model,
        "batch": batch,
        "base_logits": base_logits,
        "fresh": fresh,
        "after_first": after_first,
        "first_logits": first_logits,
        "n_first": n_first,
        "second": second,
    }


def test_save_load_round_trip_of_a_grown_patch(two_edits, tmp_path):  # noqa: ANN001
    peft_model, batch = two_edits["peft_model"], two_edits["batch"]
    layers = _layers(peft_model)
    n = layers["key"].num_neurons("default")
    assert n > two_edits["n_first"] > 0
    logits = _logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path)
    fresh = tiny_backbone("llava", seed=0, texts=TEXTS)
    loaded = PeftModel.from_pretrained(fresh.model, str(tmp_path), is_trainable=True)
    torch.testing.assert_close(_logits(loaded, batch), logits, rtol=0, atol=1e-6)
    loaded_layers = _layers(loaded)
    for role, layer in layers.items():
        state, again = layer.adapter_state("default"), loaded_layers[role].adapter_state("default")
        assert state.keys() == again.keys()
        for attr in state:
            assert torch.equal(state[attr][0], again[attr][0]), (role, attr)
    # the loaded patch keeps editing: the next edit freezes the loaded neurons and adds its own
    method = two_edits["method"]
    request = _request_like(two_edits["second"], "what color is the cube", "green")
    method.edit(loaded, fresh, [request])
    assert loaded_layers["key"].num_neurons("default") > n
    assert torch.equal(
        loaded_layers["key"].tpatcher_weight_frozen["default"][:n],
        layers["key"].full("tpatcher_weight", "default").detach(),
    )


def _request_like(request, src: str, alt: str):  # noqa: ANN001, ANN202
    import dataclasses

    return dataclasses.replace(request, case_id=request.case_id + 10, src=src, alt=alt)


def test_rollback_shrinks_the_patch_and_restores_the_outputs(two_edits):  # noqa: ANN001
    peft_model, batch = two_edits["peft_model"], two_edits["batch"]
    key = _layers(peft_model)["key"]
    assert key.num_neurons("default") > two_edits["n_first"]
    two_edits["after_first"].restore()
    assert key.num_neurons("default") == two_edits["n_first"] == two_edits["after_first"].num_neurons()
    assert torch.equal(_logits(peft_model, batch), two_edits["first_logits"])
    two_edits["fresh"].restore()
    assert {layer.num_neurons("default") for layer in _layers(peft_model).values()} == {0}
    assert key.tpatcher_memory["default"].shape[0] == 0
    assert torch.equal(_logits(peft_model, batch), two_edits["base_logits"])
    assert two_edits["method"].adapter_is_identity(peft_model)


# ---------------------------------------------------------------------------- the neuron's exact form
@pytest.mark.parametrize("model_type", ["llama", "opt"])
def test_patched_ffn_is_the_ffn_plus_the_neuron_branch(model_type: str):
    from odedit_hf.editors.tpatcher.method import ffn_roles

    method = get_method("tpatcher", memory="off")
    backbone = tiny_backbone(model_type, seed=0)
    key_name, up_name, value_name = ffn_roles(backbone)
    assert (up_name is None) == (model_type == "opt")
    peft_model = get_peft_model(backbone.model, method.peft_config(backbone))
    layers = _layers(peft_model)
    torch.manual_seed(0)
    n, d = 3, 32
    k, b, u, v, a = (
        torch.randn(n, d),
        torch.randn(n),
        torch.randn(n, d),
        torch.randn(d, n),
        torch.rand(n) + 0.5,
    )
    layers["key"].grow("default", k, bias=b)
    if up_name is not None:
        layers["up"].grow("default", u)
    layers["value"].grow("default", v, scale=a)
    x = torch.randn(2, 5, d)
    key_base = layers["key"].get_base_layer()
    value_base = layers["value"].get_base_layer()
    with torch.no_grad():
        if model_type == "llama":
            mlp = backbone.decoder_layers()[-1].mlp
            out = mlp(x)
            act = mlp.act_fn
            base = value_base(act(key_base(x)) * layers["up"].get_base_layer()(x))
            branch = (act(x @ k.T + b) * (x @ u.T)) * a @ v.T  # V diag(a) (σ(K_g x + b) ⊙ K_u x)
        else:
            layer = backbone.decoder_layers()[-1]
            act = layer.activation_fn
            out = layers["value"](act(layers["key"](x)))  # OPT's decoder layer runs fc1 -> σ -> fc2 itself
            base = value_base(act(key_base(x)))
            branch = act(x @ k.T + b) * a @ v.T  # V diag(a) σ(K x + b)
        torch.testing.assert_close(out, base + branch, rtol=1e-5, atol=1e-5)
        with peft_model.disable_adapter():
            if model_type == "llama":
                torch.testing.assert_close(mlp(x), base, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot be merged"):
        peft_model.merge_adapter()


# ---------------------------------------------------------------------------- locality on the memory
def _memory_file(folder: str, images: list[str]) -> str:
    """A one-record MMEdit file whose prompts make the memory (images relative to ``folder/images``)."""
    image_dir = os.path.join(folder, "images")
    os.makedirs(image_dir, exist_ok=True)
    for i, path in enumerate(images):
        tiny_image(i).save(os.path.join(image_dir, os.path.basename(path)))
    record = {
        "src": "what animal is this",
        "pred": "cat",
        "alt": "dog",
        "image": os.path.basename(images[3]),
        "rephrase": "what animal is this",
        "image_rephrase": os.path.basename(images[3]),
        "loc": "what is the capital of france",
        "loc_ans": "paris",
        "m_loc": os.path.basename(images[3]),
        "m_loc_q": "what animal is this",
        "m_loc_a": "cat",
    }
    path = os.path.join(folder, "train.json")
    with open(path, "w") as f:
        json.dump([record], f)
    return path


def test_memory_is_cached_by_weight_hash(images, tmp_path):  # noqa: ANN001
    path = _memory_file(str(tmp_path / "data"), images)
    cache = str(tmp_path / "cache")
    method = get_method("tpatcher", memory=path, cache_dir=cache)
    backbone = tiny_backbone("llava", seed=0, texts=TEXTS)
    memory = method.build_memory(backbone)
    assert memory.shape[1] == 32 and memory.shape[0] > 0
    files = os.listdir(cache)
    assert len(files) == 1
    again = get_method("tpatcher", memory=path, cache_dir=cache).build_memory(backbone)  # from disk
    assert torch.equal(memory, again) and os.listdir(cache) == files
    other = get_method("tpatcher", memory=path, cache_dir=cache).build_memory(
        tiny_backbone("llava", seed=1, texts=TEXTS)
    )
    assert len(os.listdir(cache)) == 2 and not torch.equal(other, memory)
    capped = get_method("tpatcher", memory=path, cache_dir=cache, memory_size=5).build_memory(backbone)
    assert capped.shape == (5, 32)


def _edit_and_measure(method, images, request, far_prompt: str):  # noqa: ANN001, ANN202
    """Edit ``request``; return (FFN inputs of the far prompt, their cosine to the edit's first error input,
    the change of the far prompt's next-token distributions per position, the model)."""
    from odedit_hf.backbones import PromptSample

    backbone, peft_model = _wrap(method)
    far = backbone.build_batch([PromptSample(prompt=far_prompt, target="paris")])
    edit_batch = backbone.build_batch(edit_samples([request]))
    before = _logits(peft_model, far).softmax(-1)
    error = _wrong_positions(_logits(peft_model, edit_batch), edit_batch["labels"])[0][0]
    q = _ffn_inputs(backbone, peft_model, edit_batch)[0, error]
    states = _ffn_inputs(backbone, peft_model, far)[0]
    cosine = torch.nn.functional.cosine_similarity(states, q.unsqueeze(0), dim=-1)
    method.edit(peft_model, backbone, [request])
    labels = edit_batch["labels"][0, 1:]
    predicted = _logits(peft_model, edit_batch)[0, :-1].argmax(-1)
    assert (predicted[labels != IGNORE_INDEX] == labels[labels != IGNORE_INDEX]).all()  # the edit holds
    change = (_logits(peft_model, far).softmax(-1) - before).abs().sum(-1)[0]  # 2 x total variation
    return states, cosine, change, peft_model


def test_a_memory_input_far_from_the_edit_keeps_its_output(images, tmp_path):  # noqa: ANN001
    far_prompt = "what is the capital of france"  # the memory file's text-locality prompt
    path = _memory_file(str(tmp_path / "data"), images)
    request = _request(images, 0, "what color is the cube", "blue")
    options = {"cache_dir": str(tmp_path / "cache"), "steps": 60, "stop_loss": None}
    method = get_method("tpatcher", memory=path, **options)
    states, cosine, change, peft_model = _edit_and_measure(method, images, request, far_prompt)
    far = cosine < 0.5  # the tiny random model maps the prompt-end tokens close to the edit's state
    assert far.sum() >= 5, cosine
    key = _layers(peft_model)["key"]
    acts = states[far] @ key.tpatcher_weight["default"].detach().T + key.tpatcher_bias["default"].detach()
    assert acts.max() < method.mem_floor, acts  # the memory loss switched the new neuron off there
    assert change[far].max() < 0.06, change
    # without the memory the same edit moves those outputs much more
    _, _, change_off, _ = _edit_and_measure(
        get_method("tpatcher", memory="off", **options), images, request, far_prompt
    )
    assert change_off[far].max() > 2 * change[far].max(), (change_off, change)


def test_bad_options_raise_actionable_errors(tmp_path):  # noqa: ANN001
    from odedit_hf.editors.tpatcher import TPatcherConfig

    for bad in ({"max_add_neuron_num": 0}, {"mem_topk": 1.5}, {"scale_init": 0.0}, {"train_up": "yes"}):
        with pytest.raises(ValueError, match="TPatcherMethod"):
            get_method("tpatcher", **bad)
    with pytest.raises(ValueError, match="no file"):
        get_method("tpatcher", memory=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="key_module"):
        TPatcherConfig(value_module="mlp.down_proj")
    with pytest.raises(ValueError, match="must differ"):
        TPatcherConfig(key_module="mlp.down_proj", value_module="mlp.down_proj")

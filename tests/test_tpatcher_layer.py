"""T-Patcher's adapter layers on their own: construction errors, the empty blocks of each role, grow (with
its checks and the frozen/current split), the memory, the state copies, the resize on load, merge, and the
forward of the key / up / value roles with several adapters.

tests/test_tpatcher.py checks the layers through whole edits on tiny models; these pin the contract that
those reach only on their happy path (written against the survivors of a mutation run, issue 20).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from odedit_hf.editors.tpatcher.config import TPatcherConfig
from odedit_hf.editors.tpatcher.layer import Linear

A = "default"


def _config(**kwargs) -> TPatcherConfig:  # noqa: ANN003
    return TPatcherConfig(key_module="fc1", value_module="fc2", **kwargs)


def _layer(role: str, dtype: torch.dtype = torch.float32, **kwargs) -> Linear:  # noqa: ANN003
    torch.manual_seed(0)
    base = nn.Linear(4, 3) if role != "value" else nn.Linear(3, 4)
    return Linear(base.to(dtype), A, _config(**kwargs), role)


def _grow(layer: Linear, n: int, seed: int, name: str = A, trainable: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    if layer.role == "value":
        given = {
            "weight": torch.randn(layer.out_features, n, generator=g),
            "scale": torch.rand(n, generator=g),
        }
    else:
        given = {"weight": torch.randn(n, layer.in_features, generator=g)}
        if layer.role == "key":
            given["bias"] = torch.randn(n, generator=g)
    layer.grow(name, given["weight"], bias=given.get("bias"), scale=given.get("scale"), trainable=trainable)
    return given


# ---------------------------------------------------------------------------------------------- construction
def test_unknown_keywords_roles_and_non_linear_bases_are_refused_with_their_messages():
    with pytest.raises(ValueError) as info:
        Linear(nn.Linear(4, 3), A, _config(), "key", r=1, alpha=2)
    assert str(info.value) == "TPatcherLayer: unknown keyword arguments ['alpha', 'r']"
    with pytest.raises(ValueError) as info:
        Linear(nn.Linear(4, 3), A, _config(), "gate")
    assert str(info.value) == "TPatcherLayer: role must be one of ('key', 'up', 'value'), got 'gate'"
    with pytest.raises(ValueError) as info:
        Linear(nn.Conv1d(4, 3, 1), A, _config(), "key")
    assert str(info.value) == (
        "T-Patcher can only patch torch.nn.Linear FFN projections, got Conv1d; "
        "see the backbone registry's ffn_projections."
    )
    with pytest.raises(ValueError) as info:
        _layer("key").update_layer("other", _config(), r=2)
    assert str(info.value) == "TPatcherLayer.update_layer: unknown keyword arguments ['r']"


@pytest.mark.parametrize("role", ["key", "up", "value"])
def test_a_new_layer_of_each_role_has_empty_float32_blocks(role):  # noqa: ANN001
    layer = _layer(role, torch.bfloat16, scale_init=2.5, init_weights=False)
    assert layer.neuron_dim == (1 if role == "value" else 0)
    assert layer.tpatcher_scale_init == {A: 2.5} and layer.tpatcher_init_weights == {A: False}
    assert layer.num_neurons(A) == 0 and layer.num_current(A) == 0
    assert layer.num_neurons("missing") == 0 and layer.num_current("missing") == 0
    assert not layer.disable_adapters and layer.merged_adapters == []
    assert repr(layer).startswith(f"tpatcher[{role}].Linear(")
    weight_shape = (4, 0) if role == "value" else (0, 4)
    expected = {"tpatcher_weight": weight_shape}
    if role == "key":
        expected["tpatcher_bias"] = (0,)
    if role == "value":
        expected["tpatcher_scale"] = (0,)
    for part in ("tpatcher_weight", "tpatcher_bias", "tpatcher_scale"):
        if part not in expected:
            assert A not in getattr(layer, part) and A not in getattr(layer, part + "_frozen")
            continue
        current, frozen = getattr(layer, part)[A], getattr(layer, part + "_frozen")[A]
        assert isinstance(current, nn.Parameter) and current.requires_grad
        assert tuple(current.shape) == tuple(frozen.shape) == expected[part]
        assert current.dtype == frozen.dtype == torch.float32
    if role == "key":
        memory = layer.tpatcher_memory[A]
        assert memory.shape == (0, 4) and memory.dtype == torch.float32
    else:
        assert A not in layer.tpatcher_memory
    assert [tuple(p.shape) for p in layer.current_parameters(A)] == [expected[p] for p in expected]
    inference = Linear(nn.Linear(4, 4), A, _config(inference_mode=True), role)
    assert not any(p.requires_grad for p in inference.current_parameters(A))


def test_merge_is_refused_with_its_message_and_unmerge_only_warns(caplog):  # noqa: ANN001
    layer = _layer("value")
    for call in (layer.merge, lambda: layer.merge(safe_merge=True, adapter_names=[A])):
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == (
            "T-Patcher adapters cannot be merged: the patch neurons add hidden units to the FFN (a wider "
            "intermediate activation), which no weight of the fixed-size projections can hold. Keep the "
            "adapter unmerged, or save it with save_pretrained and load it with PeftModel.from_pretrained."
        )
    with caplog.at_level(logging.WARNING, logger="odedit_hf.editors.tpatcher.layer"):
        layer.unmerge()
    assert caplog.messages == ["T-Patcher unmerge: nothing is merged"]


# ---------------------------------------------------------------------------------------------- grow, memory
def test_grow_freezes_the_current_block_and_starts_a_new_one():
    key = _layer("key")
    first = _grow(key, 2, seed=1)
    assert key.num_neurons(A) == 2 and key.num_current(A) == 2
    assert torch.equal(key.tpatcher_weight[A], first["weight"]) and key.tpatcher_weight_frozen[A].shape == (
        0,
        4,
    )
    assert torch.equal(key.full("tpatcher_weight", A), first["weight"])
    second = _grow(key, 3, seed=2)
    assert key.num_neurons(A) == 5 and key.num_current(A) == 3
    assert torch.equal(key.tpatcher_weight_frozen[A], first["weight"])
    assert torch.equal(key.tpatcher_bias_frozen[A], first["bias"])
    assert torch.equal(key.tpatcher_weight[A], second["weight"]) and torch.equal(
        key.tpatcher_bias[A], second["bias"]
    )
    assert torch.equal(key.full("tpatcher_weight", A), torch.cat([first["weight"], second["weight"]]))
    assert torch.equal(key.full("tpatcher_bias", A), torch.cat([first["bias"], second["bias"]]))
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in key.current_parameters(A))
    # a frozen current block stays frozen when it is replaced
    for p in key.current_parameters(A):
        p.requires_grad_(False)
    third = _grow(key, 1, seed=3)
    assert not any(p.requires_grad for p in key.current_parameters(A))
    # not trainable: straight into the frozen block; the current block is empty
    fourth = _grow(key, 2, seed=4, trainable=False)
    assert key.num_neurons(A) == 8 and key.num_current(A) == 0
    assert key.tpatcher_weight[A].shape == (0, 4) and key.tpatcher_bias[A].shape == (0,)
    expected = torch.cat([first["weight"], second["weight"], third["weight"], fourth["weight"]])
    assert torch.equal(key.tpatcher_weight_frozen[A], expected)
    assert torch.equal(key.full("tpatcher_weight", A), expected)

    value = _layer("value")
    a = _grow(value, 2, seed=5)
    b = _grow(value, 1, seed=6, trainable=False)
    assert value.num_neurons(A) == 3 and value.num_current(A) == 0
    assert value.tpatcher_weight[A].shape == (4, 0) and value.tpatcher_scale[A].shape == (0,)
    assert torch.equal(value.full("tpatcher_weight", A), torch.cat([a["weight"], b["weight"]], dim=1))
    assert torch.equal(value.full("tpatcher_scale", A), torch.cat([a["scale"], b["scale"]]))
    c = _grow(value, 2, seed=7)
    assert value.num_neurons(A) == 5 and value.num_current(A) == 2
    assert torch.equal(value.tpatcher_weight_frozen[A], torch.cat([a["weight"], b["weight"]], dim=1))
    assert torch.equal(
        value.full("tpatcher_weight", A), torch.cat([a["weight"], b["weight"], c["weight"]], dim=1)
    )


def test_grow_copies_the_initial_values_in_float32():
    up = _layer("up", torch.bfloat16)
    weight = torch.ones(2, 4, dtype=torch.float64)
    up.grow(A, weight)
    weight += 1.0
    assert up.tpatcher_weight[A].dtype == torch.float32 and up.tpatcher_weight[A].tolist() == [[1.0] * 4] * 2
    up.grow(A, torch.zeros(1, 4))
    assert up.tpatcher_weight_frozen[A].dtype == torch.float32
    with torch.no_grad():
        up.tpatcher_weight[A].fill_(5.0)
    assert up.tpatcher_weight_frozen[A].tolist() == [[1.0] * 4] * 2  # the frozen block is a copy


def test_grow_refuses_a_missing_adapter_wrong_parts_and_wrong_shapes_with_their_messages():
    key, up, value = _layer("key"), _layer("up"), _layer("value")
    cases = [
        (
            key,
            "missing",
            torch.zeros(1, 4),
            {"bias": torch.zeros(1)},
            "T-Patcher layer (key) has no adapter 'missing'",
        ),
        (key, A, torch.zeros(1, 4), {}, "T-Patcher key layer: tpatcher_bias must be given"),
        (
            key,
            A,
            torch.zeros(1, 4),
            {"bias": torch.zeros(1), "scale": torch.zeros(1)},
            "T-Patcher key layer: tpatcher_scale must be None",
        ),
        (
            up,
            A,
            torch.zeros(1, 4),
            {"bias": torch.zeros(1)},
            "T-Patcher up layer: tpatcher_bias must be None",
        ),
        (value, A, torch.zeros(4, 1), {}, "T-Patcher value layer: tpatcher_scale must be given"),
        (
            key,
            A,
            torch.zeros(2, 3),
            {"bias": torch.zeros(2)},
            "T-Patcher key layer: new weight has shape (2, 3), expected (2, 4)",
        ),
        (
            value,
            A,
            torch.zeros(3, 2),
            {"scale": torch.zeros(2)},
            "T-Patcher value layer: new weight has shape (3, 2), expected (4, 2)",
        ),
        (
            key,
            A,
            torch.zeros(2, 4),
            {"bias": torch.zeros(3)},
            "T-Patcher key layer: tpatcher_bias has shape (3,), expected (2,)",
        ),
        (
            value,
            A,
            torch.zeros(4, 2),
            {"scale": torch.zeros(2, 1)},
            "T-Patcher value layer: tpatcher_scale has shape (2, 1), expected (2,)",
        ),
    ]
    for layer, name, weight, extra, message in cases:
        with pytest.raises(ValueError) as info:
            layer.grow(name, weight, **extra)
        assert str(info.value) == message
        assert layer.num_neurons(A) == 0


def test_append_memory_is_the_key_layers_and_concatenates_in_float32():
    key = _layer("key", torch.bfloat16)
    key.append_memory(A, torch.ones(2, 4, dtype=torch.float64))
    key.append_memory(A, torch.full((1, 4), 2.0))
    memory = key.tpatcher_memory[A]
    assert memory.dtype == torch.float32 and memory.tolist() == [[1.0] * 4, [1.0] * 4, [2.0] * 4]
    for role in ("up", "value"):
        with pytest.raises(ValueError) as info:
            _layer(role).append_memory(A, torch.ones(1, 4))
        assert str(info.value) == "T-Patcher: only the key layer keeps the memory of past edits"


# ---------------------------------------------------------------------------------------------- state, load
def test_adapter_state_round_trips_sizes_values_and_requires_grad():
    key = _layer("key")
    key.update_layer("other", _config())
    _grow(key, 2, seed=1)
    _grow(key, 1, seed=2)
    key.append_memory(A, torch.ones(3, 4))
    key.tpatcher_bias[A].requires_grad_(False)
    state = key.adapter_state(A)
    assert set(state) == {
        "tpatcher_weight",
        "tpatcher_bias",
        "tpatcher_weight_frozen",
        "tpatcher_bias_frozen",
        "tpatcher_memory",
    }
    assert state["tpatcher_weight"][1] is True and state["tpatcher_bias"][1] is False
    assert state["tpatcher_memory"][1] is False and state["tpatcher_weight_frozen"][1] is False
    saved = {attr: t.clone() for attr, (t, _) in state.items()}
    _grow(key, 2, seed=3)
    key.append_memory(A, torch.zeros(1, 4))
    key.load_adapter_state(A, state)
    assert key.num_neurons(A) == 3 and key.num_current(A) == 1
    for attr, tensor in saved.items():
        assert torch.equal(getattr(key, attr)[A], tensor)
    assert isinstance(key.tpatcher_weight[A], nn.Parameter) and key.tpatcher_weight[A].requires_grad
    assert isinstance(key.tpatcher_bias[A], nn.Parameter) and not key.tpatcher_bias[A].requires_grad
    assert not isinstance(key.tpatcher_memory[A], nn.Parameter)
    assert key.num_neurons("other") == 0
    # both directions are copies
    with torch.no_grad():
        key.tpatcher_weight[A].fill_(9.0)
        key.tpatcher_memory[A].fill_(9.0)
    assert torch.equal(state["tpatcher_weight"][0], saved["tpatcher_weight"])
    assert torch.equal(state["tpatcher_memory"][0], saved["tpatcher_memory"])
    state["tpatcher_weight_frozen"][0].fill_(7.0)
    assert torch.equal(key.tpatcher_weight_frozen[A], saved["tpatcher_weight_frozen"])
    assert not torch.equal(key.adapter_state(A)["tpatcher_weight"][0], saved["tpatcher_weight"])


def test_resize_from_state_dict_takes_the_saved_shapes_and_load_state_dict_copies_the_values():
    source = _layer("value")
    source.update_layer("other", _config())
    _grow(source, 2, seed=1)
    _grow(source, 3, seed=2)
    _grow(source, 1, seed=3, name="other")
    target = _layer("value")
    target.update_layer("other", _config())
    target.tpatcher_scale[A].requires_grad_(False)
    kept = target.tpatcher_weight_frozen["other"]  # the same shape in the file: left as it is
    state = {f"enc.{k}": v for k, v in source.state_dict().items()}
    target.resize_from_state_dict(state, "enc.")
    assert target.tpatcher_weight_frozen["other"] is kept
    assert target.num_neurons(A) == 5 and target.num_current(A) == 3 and target.num_neurons("other") == 1
    assert torch.count_nonzero(target.full("tpatcher_weight", A)) == 0
    assert (
        target.tpatcher_weight[A].dtype == torch.float32
        and target.tpatcher_weight_frozen[A].dtype == torch.float32
    )
    assert isinstance(target.tpatcher_weight[A], nn.Parameter) and target.tpatcher_weight[A].requires_grad
    assert isinstance(target.tpatcher_scale[A], nn.Parameter) and not target.tpatcher_scale[A].requires_grad
    assert not isinstance(target.tpatcher_weight_frozen[A], nn.Parameter)
    # a plain load_state_dict resizes and copies
    fresh = _layer("value")
    fresh.update_layer("other", _config())
    fresh.load_state_dict(source.state_dict())
    for part in ("tpatcher_weight", "tpatcher_scale"):
        for name in (A, "other"):
            assert torch.equal(fresh.full(part, name), source.full(part, name))
    # a saved tensor of another rank is left for torch to report
    bad = dict(source.state_dict())
    bad["tpatcher_scale.default"] = torch.zeros(3, 1)
    before = fresh.tpatcher_scale[A]
    fresh.resize_from_state_dict(bad, "")
    assert fresh.tpatcher_scale[A] is before
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict(bad)


# ---------------------------------------------------------------------------------------------- forward
def test_key_and_up_forwards_append_each_adapters_neurons():
    key = _layer("key", torch.bfloat16)
    key.update_layer("empty", _config())
    key.update_layer("b", _config())
    a = _grow(key, 2, seed=1)
    a2 = _grow(key, 1, seed=2)
    b = _grow(key, 1, seed=3, name="b")
    x = torch.randn(2, 5, 4).to(torch.bfloat16)
    base = key.get_base_layer()
    with torch.no_grad():
        reference = base(x)
        assert torch.equal(key(x), torch.cat([reference, _key_part(x, a, a2, reference.dtype)], dim=-1))
        key.set_adapter(["empty", A, "b"])
        out = key(x)
        assert out.dtype == torch.bfloat16 and out.shape == (2, 5, 7)
        expected = torch.cat(
            [reference, _key_part(x, a, a2, reference.dtype), _key_part(x, b, None, reference.dtype)], -1
        )
        assert torch.equal(out, expected)
        key.set_adapter(["empty"])
        assert torch.equal(key(x), reference)
        key.set_adapter([A, "b"])
        key.enable_adapters(False)
        assert torch.equal(key(x), reference)
    up = _layer("up")
    w = _grow(up, 2, seed=4)["weight"]
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(up(x), torch.cat([up.get_base_layer()(x), F.linear(x, w)], dim=-1))


def _key_part(x: torch.Tensor, a: dict, a2: dict | None, dtype: torch.dtype) -> torch.Tensor:
    weight = a["weight"] if a2 is None else torch.cat([a["weight"], a2["weight"]])
    bias = a["bias"] if a2 is None else torch.cat([a["bias"], a2["bias"]])
    return F.linear(x.float(), weight, bias).to(dtype)


def test_value_forward_adds_each_adapters_scaled_columns_and_checks_the_width():
    value = _layer("value")
    value.update_layer("empty", _config())
    value.update_layer("b", _config())
    a = _grow(value, 2, seed=1)
    a2 = _grow(value, 1, seed=2)
    b = _grow(value, 2, seed=3, name="b")
    value.set_adapter(["empty", A, "b"])
    torch.manual_seed(4)
    hidden = torch.randn(2, 5, 3)
    extra = torch.randn(2, 5, 5)
    x = torch.cat([hidden, extra], dim=-1)
    base = value.get_base_layer()
    wa = torch.cat([a["weight"], a2["weight"]], dim=1)
    sa = torch.cat([a["scale"], a2["scale"]])
    with torch.no_grad():
        reference = base(hidden)
        expected = (
            reference + F.linear(extra[..., :3] * sa, wa) + F.linear(extra[..., 3:] * b["scale"], b["weight"])
        )
        out = value(x)
        assert out.shape == (2, 5, 4)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
        assert torch.equal(value(hidden), reference)  # no patch units: the base projection
        for bad, holds in ((x[..., :-1], 5), (torch.cat([x, extra[..., :1]], -1), 5)):
            with pytest.raises(ValueError) as info:
                value(bad)
            assert str(info.value) == (
                f"T-Patcher value layer: the FFN's hidden activation carries {bad.shape[-1] - 3} patch units "
                f"but the active adapters hold {holds} neurons; enable or disable all T-Patcher layers together"
            )
        value.enable_adapters(False)
        assert torch.equal(value(x), reference)
    half = _layer("value", torch.bfloat16)
    h = _grow(half, 1, seed=5)
    x = torch.randn(3, 4).to(torch.bfloat16)
    with torch.no_grad():
        out = half(x)
        reference = half.get_base_layer()(x[:, :3])
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(
            out, reference + F.linear(x[:, 3:].float() * h["scale"], h["weight"]).to(torch.bfloat16)
        )

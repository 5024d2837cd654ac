"""GRACE's adapter layer on its own: construction errors, the codebook's bookkeeping (entries, labels,
radii, resize, snapshots), the checkpoint reader's checks, the hit rule at its edges, and the forward with
several adapters and a bf16 base.

tests/test_grace.py checks the layer through whole edits on a tiny LLaVA; these pin the contract that those
reach only on their happy path (written against the survivors of a mutation run, issue 20).
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from odedit_hf.editors.grace.config import GRACEConfig
from odedit_hf.editors.grace.layer import Linear, checkpoint_value_rows, codebook_distances

A = "default"


def _config(**kwargs) -> GRACEConfig:  # noqa: ANN003
    return GRACEConfig(target_modules=["x"], **kwargs)


def _layer(dtype: torch.dtype = torch.float32, **kwargs) -> Linear:  # noqa: ANN003
    torch.manual_seed(0)
    return Linear(nn.Linear(4, 3).to(dtype), A, _config(**kwargs))


def _e(i: int) -> torch.Tensor:
    return torch.eye(4)[i]


# ---------------------------------------------------------------------------------------------- construction
def test_unknown_keywords_and_non_linear_bases_are_refused_with_their_messages():
    with pytest.raises(ValueError) as info:
        Linear(nn.Linear(4, 3), A, _config(), r=4, alpha=1)
    assert str(info.value) == "GRACELayer: unknown keyword arguments ['alpha', 'r']"
    layer = _layer()
    with pytest.raises(ValueError) as info:
        layer.update_layer("other", _config(), r=2)
    assert str(info.value) == "GRACELayer.update_layer: unknown keyword arguments ['r']"
    with pytest.raises(ValueError) as info:
        Linear(nn.Conv1d(4, 3, 1), A, _config())
    assert str(info.value) == (
        "GRACE can only wrap torch.nn.Linear modules, got Conv1d; "
        "choose an FFN projection (see the backbone registry's ffn_projections)."
    )


def test_a_new_layer_has_an_empty_codebook_and_keeps_its_options():
    layer = _layer(eps_init=2.5, replacement="last", value_init="warm")
    assert (layer.in_features, layer.out_features) == (4, 3)
    assert layer.grace_eps_init == {A: 2.5}
    assert layer.grace_replacement == {A: "last"}
    assert layer.grace_value_init == {A: "warm"}
    assert layer.codebook_size(A) == 0 and layer.codebook_size("missing") == 0
    assert layer.grace_keys[A].shape == (0, 4) and layer.grace_keys[A].dtype == torch.float32
    assert layer.grace_radii[A].shape == (0,) and layer.grace_radii[A].dtype == torch.float32
    assert layer.grace_labels[A].shape == (0, 0) and layer.grace_labels[A].dtype == torch.int64
    assert layer.value_rows(A) == [] and layer.trainable_indices(A) == []
    matrix = layer.value_matrix(A)
    assert matrix.shape == (0, 3) and matrix.dtype == torch.float32
    assert layer.nearest(A, _e(0)) == (float("inf"), -1)
    assert not layer.disable_adapters and layer.merged_adapters == []
    assert repr(layer).startswith("grace.Linear(")
    x = torch.randn(2, 5, 4)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.get_base_layer()(x))  # an empty codebook is the identity


def test_merge_is_refused_with_its_message_and_unmerge_only_warns(caplog):  # noqa: ANN001
    layer = _layer()
    for call in (layer.merge, lambda: layer.merge(safe_merge=True, adapter_names=[A])):
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == (
            "GRACE adapters cannot be merged into the base weights: the codebook replaces the layer's output "
            "only where a query falls within a key's radius, which no weight change reproduces. Keep the "
            "adapter unmerged (disable_adapter() gives the base model, unload() removes the adapter)."
        )
    with caplog.at_level(logging.WARNING, logger="odedit_hf.editors.grace.layer"):
        layer.unmerge()
    assert caplog.messages == ["GRACE unmerge: nothing is merged (GRACE adapters cannot be merged)"]


# ---------------------------------------------------------------------------------------------- the codebook
def test_add_entry_stores_the_entry_and_pads_the_labels_to_the_widest():
    layer = _layer()
    assert layer.add_entry(A, _e(0), [0], 0.5, torch.full((1, 3), 2.0)) == 0
    # a label with token 0 and a longer label: the older row is padded with -1
    # a 1-D float64 value is one float32 row
    assert layer.add_entry(A, _e(1).double(), (7, 0, 3), 1, torch.ones(3, dtype=torch.float64)) == 1
    assert layer.codebook_size(A) == 2
    assert layer.label(A, 0) == [0] and layer.label(A, 1) == [7, 0, 3]
    assert layer.grace_labels[A].tolist() == [[0, -1, -1], [7, 0, 3]]
    assert layer.grace_labels[A].dtype == torch.int64
    assert layer.grace_keys[A].tolist() == [_e(0).tolist(), _e(1).tolist()]
    assert layer.grace_keys[A].dtype == torch.float32
    assert layer.grace_radii[A].tolist() == [0.5, 1.0] and layer.grace_radii[A].dtype == torch.float32
    assert layer.value_rows(A) == [1, 1]
    assert layer.value_matrix(A).tolist() == [[2.0, 2.0, 2.0], [1.0, 1.0, 1.0]]
    values = list(layer.grace_values[A])
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in values)
    # a shorter label keeps the width; the stored key and value are copies
    key, value = _e(2), torch.zeros(2, 3)
    layer.add_entry(A, key, [4], 0.25, value)
    key += 1.0
    value += 1.0
    assert layer.grace_labels[A].tolist()[2] == [4, -1, -1]
    assert layer.grace_keys[A][2].tolist() == _e(2).tolist()
    assert layer.value_rows(A) == [1, 1, 2] and torch.count_nonzero(layer.grace_values[A][2]) == 0
    layer.set_radius(A, 1, 3)
    assert layer.grace_radii[A].tolist() == [0.5, 3.0, 0.25]
    assert layer.nearest(A, torch.tensor([0.0, 0.9, 0.0, 0.0])) == pytest.approx((0.1, 1))
    assert layer.nearest(A, torch.tensor([[0.0, 0.0, 2.0, 0.0]])) == (1.0, 2)


def test_add_entry_refuses_bad_labels_keys_and_values_with_their_messages():
    layer = _layer()
    for label in ([], [3, -1]):
        with pytest.raises(ValueError) as info:
            layer.add_entry(A, _e(0), label, 1.0, torch.zeros(1, 3))
        assert str(info.value) == f"GRACE: a label must be a non-empty list of token ids >= 0, got {label!r}"
    for key, value, got in (
        (torch.zeros(5), torch.zeros(1, 3), "5 and (1, 3)"),
        (torch.zeros(4), torch.zeros(1, 4), "4 and (1, 4)"),
        (torch.zeros(4), torch.tensor(1.0), "4 and ()"),
    ):
        with pytest.raises(ValueError) as info:
            layer.add_entry(A, key, [1], 1.0, value)
        assert str(info.value) == (
            f"GRACE: a key must have 4 elements and a value shape (rows, 3), got {got}"
        )
    assert layer.codebook_size(A) == 0
    # a (1, 1, 3) value is one row
    layer.add_entry(A, torch.zeros(1, 4), [1], 1.0, torch.ones(1, 1, 3))
    assert layer.value_rows(A) == [1]


def test_set_trainable_makes_only_those_values_trainable_and_set_adapter_keeps_it_so():
    layer = _layer()
    for i in range(3):
        layer.add_entry(A, _e(i), [i], 1.0, torch.zeros(1, 3))
    with pytest.raises(ValueError) as info:
        layer.set_trainable(A, [3])
    assert str(info.value) == "GRACE: no codebook entry 3 (the codebook has 3)"
    with pytest.raises(ValueError) as info:
        layer.set_trainable(A, [-1])
    assert str(info.value) == "GRACE: no codebook entry -1 (the codebook has 3)"
    params = layer.set_trainable(A, [2, 0, 2])
    assert (
        params[0] is layer.grace_values[A][0] and params[1] is layer.grace_values[A][2] and len(params) == 2
    )
    assert [v.requires_grad for v in layer.grace_values[A]] == [True, False, True]
    assert layer.trainable_indices(A) == [0, 2]
    layer.set_adapter(A)  # peft's set_adapter makes every value trainable; the others are frozen again
    assert [v.requires_grad for v in layer.grace_values[A]] == [True, False, True]
    layer.set_trainable(A, [1])
    layer.set_adapter([A])
    assert [v.requires_grad for v in layer.grace_values[A]] == [False, True, False]
    layer.set_adapter(A, inference_mode=True)
    assert not any(v.requires_grad for v in layer.grace_values[A])
    # adding an adapter in inference mode freezes the active ones as well (peft's update_layer convention)
    layer.set_adapter(A)
    assert [v.requires_grad for v in layer.grace_values[A]] == [False, True, False]
    layer.update_layer("frozen", _config(inference_mode=True))
    assert not any(v.requires_grad for v in layer.grace_values[A])
    layer.set_adapter(A)
    layer.update_layer("trained", _config())
    assert [v.requires_grad for v in layer.grace_values[A]] == [False, True, False]
    assert layer.trainable_indices("missing") == []


def test_resize_codebook_makes_zero_entries_keeps_matching_ones_and_refuses_empty_values():
    layer = _layer()
    layer.add_entry(A, _e(0), [5, 6], 1.0, torch.ones(2, 3))
    layer.set_trainable(A, [0])
    kept = layer.grace_values[A][0]
    layer.resize_codebook(A, [2], 2)  # the same shapes: nothing changes
    assert (
        layer.grace_values[A][0] is kept and layer.label(A, 0) == [5, 6] and layer.trainable_indices(A) == [0]
    )
    layer.resize_codebook(A, [2], 3)  # another label width: a fresh codebook
    assert layer.grace_labels[A].tolist() == [[-1, -1, -1]] and layer.trainable_indices(A) == []
    layer.resize_codebook(A, (1, 3), 2)
    assert layer.codebook_size(A) == 2 and layer.value_rows(A) == [1, 3]
    assert layer.grace_keys[A].tolist() == [[0.0] * 4] * 2 and layer.grace_keys[A].dtype == torch.float32
    assert layer.grace_radii[A].tolist() == [0.0, 0.0] and layer.grace_radii[A].dtype == torch.float32
    assert (
        layer.grace_labels[A].tolist() == [[-1, -1], [-1, -1]] and layer.grace_labels[A].dtype == torch.int64
    )
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in layer.grace_values[A])
    assert torch.count_nonzero(layer.value_matrix(A)) == 0 and layer.value_matrix(A).shape == (4, 3)
    with pytest.raises(ValueError) as info:
        layer.resize_codebook(A, [1, 0], 2)
    assert str(info.value) == "GRACE: every value needs at least one row, got [1, 0]"
    layer.resize_codebook("other", [], 0)  # a new name gets its own empty codebook
    assert layer.codebook_size("other") == 0 and layer.codebook_size(A) == 2


def test_codebook_state_round_trips_and_keeps_the_parameters_of_matching_values():
    layer = _layer()
    layer.add_entry(A, _e(0), [1], 0.5, torch.ones(1, 3))
    layer.add_entry(A, _e(1), [2, 3], 0.75, torch.full((2, 3), 2.0))
    layer.set_trainable(A, [1])
    state = layer.codebook_state(A)
    assert state["trainable"] == {1}
    first, second = layer.grace_values[A][0], layer.grace_values[A][1]
    # change everything, including the shape of value 1, then go back
    layer.add_entry(A, _e(2), [4, 5, 6], 2.0, torch.zeros(1, 3))
    layer.set_radius(A, 0, 9.0)
    with torch.no_grad():
        first.fill_(7.0)
        layer.grace_keys[A][0, 0] = 5.0
    layer.grace_values[A][1] = nn.Parameter(torch.zeros(3, 3))
    layer.set_trainable(A, [0, 2])
    layer.load_codebook_state(A, state)
    assert layer.codebook_size(A) == 2 and layer.value_rows(A) == [1, 2]
    assert layer.grace_radii[A].tolist() == [0.5, 0.75]
    assert layer.grace_keys[A].tolist() == [_e(0).tolist(), _e(1).tolist()]
    assert layer.grace_labels[A].tolist() == [[1, -1], [2, 3]]
    assert layer.grace_values[A][0] is first and first.tolist() == [[1.0, 1.0, 1.0]]
    assert layer.grace_values[A][1] is not second and layer.grace_values[A][1].tolist() == [[2.0] * 3] * 2
    assert layer.trainable_indices(A) == [1]
    assert [v.requires_grad for v in layer.grace_values[A]] == [False, True]
    # the state is a copy: loading it did not tie the layer to it
    with torch.no_grad():
        layer.grace_values[A][1].fill_(0.0)
        layer.grace_keys[A].fill_(0.0)
    assert state["values"][1].tolist() == [[2.0] * 3] * 2 and state["keys"][0].tolist() == _e(0).tolist()
    assert layer.codebook_state(A)["values"][1] is not layer.grace_values[A][1]
    # a state with more entries than the codebook now holds (a rollback after a shrink)
    layer.load_codebook_state(A, _one_entry_state(state))
    assert layer.codebook_size(A) == 1
    layer.load_codebook_state(A, state)
    assert layer.value_rows(A) == [1, 2] and layer.grace_values[A][0] is first
    assert layer.grace_values[A][1].tolist() == [[2.0] * 3] * 2 and layer.trainable_indices(A) == [1]


def _one_entry_state(state: dict) -> dict:
    return {
        "keys": state["keys"][:1],
        "radii": state["radii"][:1],
        "labels": state["labels"][:1],
        "values": state["values"][:1],
        "trainable": set(),
    }


def test_moving_to_the_meta_device_is_skipped():
    layer = _layer()
    layer.add_entry(A, _e(0), [1], 0.5, torch.ones(1, 3))
    for device in (torch.device("meta"), "meta"):
        layer._move_adapter_to_device_of_base_layer(A, device)
        assert layer.grace_keys[A].device.type == "cpu" and layer.grace_values[A][0].device.type == "cpu"
    layer._move_adapter_to_device_of_base_layer(A)  # to the base's device (the CPU here): unchanged
    assert (
        layer.grace_keys[A].tolist() == [_e(0).tolist()] and layer.grace_values[A][0].dtype == torch.float32
    )


# ---------------------------------------------------------------------------------------------- checkpoints
def _checkpoint(rows=(1, 2), width: int = 3, suffix: str = ".default") -> dict:  # noqa: ANN001
    state = {
        f"m.grace_keys{suffix}": torch.zeros(len(rows), 4),
        f"m.grace_labels{suffix}": torch.zeros(len(rows), width, dtype=torch.int64),
    }
    for i, r in enumerate(rows):
        state[f"m.grace_values{suffix}.{i}"] = torch.zeros(r, 3)
    return state


def test_checkpoint_value_rows_reads_the_sizes_and_refuses_damaged_codebooks():
    assert checkpoint_value_rows(_checkpoint(), "m.grace_", ".default", where="m") == ([1, 2], 3)
    assert checkpoint_value_rows(_checkpoint((4,), 1, ""), "m.grace_", where="m") == ([4], 1)
    assert checkpoint_value_rows(_checkpoint(), "m.grace_", ".other", where="m") is None
    for missing in ("m.grace_keys.default", "m.grace_labels.default"):
        state = _checkpoint()
        del state[missing]
        assert checkpoint_value_rows(state, "m.grace_", ".default", where="m") is None
    for key, bad in (
        ("m.grace_keys.default", torch.zeros(2, 4, 1)),
        ("m.grace_labels.default", torch.zeros(2)),
        ("m.grace_labels.default", torch.zeros(3, 3)),
    ):
        state = _checkpoint()
        state[key] = bad
        labels = tuple(state["m.grace_labels.default"].shape)
        keys = tuple(state["m.grace_keys.default"].shape)
        with pytest.raises(ValueError) as info:
            checkpoint_value_rows(state, "m.grace_", ".default", where="m.x")
        assert str(info.value) == (
            f"GRACE codebook of 'm.x': keys {keys} and labels {labels} do not describe one codebook "
            "(expected (N, d) and (N, L)); the checkpoint is damaged"
        )
    for entry, bad in ((1, None), (0, torch.zeros(3))):
        state = _checkpoint()
        if bad is None:
            del state[f"m.grace_values.default.{entry}"]
        else:
            state[f"m.grace_values.default.{entry}"] = bad
        with pytest.raises(ValueError) as info:
            checkpoint_value_rows(state, "m.grace_", ".default", where="m")
        assert str(info.value) == (
            f"GRACE codebook of 'm': 2 keys but no (rows, d) value for entry {entry}; "
            "the checkpoint is incomplete, save it again with save_pretrained"
        )


def test_load_state_dict_resizes_every_codebook_it_holds():
    source = _layer()
    source.update_layer("other", _config())
    source.add_entry(A, _e(0), [1, 2], 0.5, torch.ones(2, 3))
    source.add_entry(A, _e(1), [3], 0.5, torch.ones(1, 3))
    source.add_entry("other", _e(2), [4], 0.5, torch.ones(3, 3))
    target = _layer()
    target.update_layer("other", _config())
    target.update_layer("third", _config())
    target.load_state_dict(source.state_dict(), strict=False)
    assert target.value_rows(A) == [2, 1] and target.value_rows("other") == [3]
    assert target.label(A, 0) == [1, 2] and target.codebook_size("third") == 0
    assert torch.equal(target.grace_keys["other"], source.grace_keys["other"])
    # the message names the layer without the prefix's dot (and only the dot is stripped)
    state = {k: v for k, v in source.state_dict().items() if k != "grace_values.default.1"}
    with pytest.raises(
        ValueError, match=r"^GRACE codebook of 'fcX': 2 keys but no \(rows, d\) value for entry 1;"
    ):
        _layer().resize_from_state_dict({f"fcX.{k}": v for k, v in state.items()}, "fcX.")


# ---------------------------------------------------------------------------------------------- hits, forward
def test_codebook_distances_are_exact_for_many_queries():
    torch.manual_seed(1)
    keys = torch.randn(3, 64) * 100
    queries = torch.cat([keys.repeat(20, 1), keys.to(torch.bfloat16).float()])  # 63 rows: cdist's mm range
    dist = codebook_distances(queries.to(torch.bfloat16).float(), keys)
    assert dist.dtype == torch.float32 and dist.shape == (63, 3)
    exact = codebook_distances(keys.repeat(20, 1), keys)
    for i in range(60):
        assert exact[i, i % 3] == 0.0  # a query is at distance 0 from its own key
    half = codebook_distances(keys.to(torch.bfloat16), keys.to(torch.bfloat16))
    assert half.dtype == torch.float32


def test_a_query_exactly_on_the_radius_is_a_hit_and_one_beyond_is_not():
    layer = _layer(replacement="last")
    layer.add_entry(A, torch.zeros(4), [1], 5.0, torch.ones(1, 3))
    x = torch.tensor([[3.0, 4.0, 0.0, 0.0], [3.0, 4.001, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # 5, >5, 0
    mask, row = layer.hits(A, x)  # a 2-D input is one sequence
    assert mask.tolist() == [[True, False, True]] and row.tolist() == [[0, 0, 0]]
    mask, _ = layer.hits(A, torch.tensor([3.0, 4.0, 0.0, 0.0]))  # one query, 1-D
    assert mask.tolist() == [[True]]


def test_span_hits_replace_the_following_positions_and_the_latest_hit_wins():
    layer = _layer()
    layer.add_entry(A, _e(0), [1], 0.5, torch.full((1, 3), 1.0))  # row 0
    layer.add_entry(A, _e(1), [1, 2, 3], 0.5, torch.tensor([[2.0] * 3, [3.0] * 3, [4.0] * 3]))  # rows 1-3
    layer.add_entry(A, _e(2), [1, 2], 0.5, torch.tensor([[5.0] * 3, [6.0] * 3]))  # rows 4-5
    far = torch.full((4,), 9.0)
    # sequence 0: miss, hit e1 (3 rows), -, hit e2 (2 rows; overrides the end of e1's span), -, miss
    # sequence 1: hit e0 at 0 (1 row), miss, hit e1 at the end (its span is cut by the end)
    x = torch.stack(
        [
            torch.stack([far, _e(1), far, _e(2), far, far]),
            torch.stack([_e(0), far, far, far, far, _e(1)]),
        ]
    )
    mask, row = layer.hits(A, x)
    assert mask.tolist() == [
        [False, True, True, True, True, False],
        [True, False, False, False, False, True],
    ]
    assert row.tolist() == [[0, 1, 2, 4, 5, 0], [0, 0, 0, 0, 0, 1]]
    base = layer.get_base_layer()
    with torch.no_grad():
        out, reference = layer(x), base(x)
    assert out.shape == (2, 6, 3)
    assert out[0, :, 0].tolist()[1:5] == [2.0, 3.0, 5.0, 6.0]
    assert out[1, 0].tolist() == [1.0] * 3 and out[1, 5].tolist() == [2.0] * 3
    for s, p in ((0, 0), (0, 5), (1, 1), (1, 2), (1, 3), (1, 4)):
        assert torch.equal(out[s, p], reference[s, p])


def test_forward_with_several_adapters_a_disabled_layer_and_a_bf16_base():
    layer = _layer(torch.bfloat16, replacement="last")
    layer.update_layer("empty", _config(replacement="last"))
    layer.update_layer("miss", _config(replacement="last"))
    layer.update_layer("b", _config(replacement="last"))
    layer.add_entry("miss", torch.full((4,), 9.0), [1], 0.5, torch.full((1, 3), 7.0))
    layer.add_entry(A, _e(0), [1], 0.5, torch.full((1, 3), 1.5))
    layer.add_entry("b", _e(1), [1], 0.5, torch.full((1, 3), 2.5))
    x = torch.stack([_e(0), _e(1), _e(3)]).to(torch.bfloat16).unsqueeze(0)
    base = layer.get_base_layer()
    with torch.no_grad():
        reference = base(x)
        # an empty and a missing codebook first: the later adapters still apply
        layer.set_adapter(["empty", "miss", A, "b"])
        out = layer(x)
        assert out.dtype == torch.bfloat16 and out.shape == (1, 3, 3)
        assert out[0, 0].tolist() == [1.5] * 3 and out[0, 1].tolist() == [2.5] * 3
        assert torch.equal(out[0, 2], reference[0, 2])
        layer.set_adapter([A])
        out = layer(x)
        assert out[0, 0].tolist() == [1.5] * 3 and torch.equal(out[0, 1:], reference[0, 1:])
        layer.enable_adapters(False)
        assert torch.equal(layer(x), reference)


# ---------------------------------------------------------------------------------------------- devices, dtypes
def test_the_codebook_is_created_on_the_base_layers_device():
    """A base on the meta device (accelerate's ``init_empty_weights``, a ``device_map`` load before the weights
    arrive): every tensor of the codebook is made there too, never on the CPU beside it."""
    torch.manual_seed(0)
    layer = Linear(nn.Linear(4, 3, device="meta"), A, _config())
    assert layer.value_matrix(A).device.type == "meta" and layer.value_matrix(A).shape == (0, 3)
    layer.resize_codebook(A, [2, 1], 2)
    layer.add_entry(A, torch.ones(4, device="meta"), [5, 6, 7], 0.5, torch.ones(2, 3, device="meta"))
    state = [layer.grace_keys[A], layer.grace_radii[A], layer.grace_labels[A], *layer.grace_values[A]]
    assert [t.device.type for t in state] == ["meta"] * 6
    assert layer.grace_labels[A].shape == (3, 3) and layer.value_rows(A) == [2, 1, 2]
    mask, row = layer.hits(A, torch.ones(2, 5, 4, device="meta"))
    assert (mask.device.type, row.device.type, mask.shape, row.shape) == ("meta", "meta", (2, 5), (2, 5))


@pytest.mark.parametrize("default", [torch.float64, torch.bfloat16])
def test_the_codebook_keeps_its_dtypes_whatever_the_default_dtype(default):  # noqa: ANN001
    """float32 keys, radii and values and int64 labels, also while another default dtype is set (transformers
    sets one while it builds a model in bf16): distances and the radius test never run in bf16."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        layer = Linear(nn.Linear(4, 3, dtype=torch.float32), A, _config())
        assert layer.value_matrix(A).dtype == torch.float32
        layer.resize_codebook(A, [1], 2)
        layer.add_entry(A, _e(0).to(default), [1, 2, 3], 0.25, torch.ones(1, 3, dtype=default))
        dtypes = [layer.grace_keys[A].dtype, layer.grace_radii[A].dtype, layer.grace_labels[A].dtype]
        assert dtypes == [torch.float32, torch.float32, torch.int64]
        assert [v.dtype for v in layer.grace_values[A]] == [torch.float32, torch.float32]
        assert layer.grace_radii[A].tolist() == [0.0, 0.25] and layer.label(A, 1) == [1, 2, 3]
    finally:
        torch.set_default_dtype(previous)

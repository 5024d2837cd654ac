"""WISE-specific checks (the common editor checks run from tests/editor_cases.py): the router on a
constructed case (edit prompt -> side memory, unrelated prompts -> main memory, bit for bit), routing being
what keeps locality, padding-independent distances, the shard mask's ratio and support, the clamp, shards
and TIES merges in both variants (checked against an independent implementation of EasyEdit's normalised
TIES), save/load of stored shards, snapshots, the single protocol's rollback before every edit, batch edits."""

from __future__ import annotations

import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import odedit_hf  # noqa: F401  registers the PEFT types
from odedit_hf.backbones import PromptSample
from odedit_hf.editing import eval_samples, get_method, model_inputs
from odedit_hf.editors.wise import WISEConfig, activation_margin_loss, ties_merge, wise_layers
from odedit_hf.editors.wise.layer import EDITS, MASK_SHARD, MERGES, SHARDS
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
    "which shape is shown",
    "what shape is shown",
    "describe every object you can see in this picture in detail please",
]
ADAPTER = "default"


@pytest.fixture(scope="module")
def requests(tmp_path_factory):  # noqa: ANN001
    from odedit_hf.data import EditRequest

    root = tmp_path_factory.mktemp("wise-images")
    paths = []
    for i in range(5):
        path = os.path.join(root, f"img{i}.png")
        tiny_image(i).save(path)
        paths.append(path)
    common = {
        "task": "vqa",
        "source": "in-memory",
        "pred": "red",
        "loc": "what is the capital of france",
        "loc_ans": "paris",
        "m_loc": paths[4],
        "m_loc_q": "what animal is this",
        "m_loc_a": "cat",
    }
    specs = [
        ("what color is the cube", "which colour has the cube", "blue", 0),
        ("which shape is shown", "what shape is shown", "green", 1),
        ("what color is the cube", "which colour has the cube", "green", 2),
        ("which shape is shown", "what shape is shown", "blue", 3),
    ]
    return [
        EditRequest(
            case_id=i, src=src, rephrase=reph, alt=alt, image=paths[img], image_rephrase=paths[img], **common
        )
        for i, (src, reph, alt, img) in enumerate(specs)
    ]


def _setup(**options):  # noqa: ANN003, ANN202
    torch.manual_seed(0)
    backbone = tiny_backbone("llava", seed=0, texts=TEXTS)
    method = get_method("wise", **{"steps": 40, **options})
    peft_model = get_peft_model(backbone.model, method.peft_config(backbone))
    layer = wise_layers(peft_model, ADAPTER)[0][1]
    return backbone, method, peft_model, layer


def _logits(model, batch):  # noqa: ANN001, ANN202
    with torch.no_grad():
        return model(**model_inputs(batch)).logits


def _batch(backbone, request, name):  # noqa: ANN001, ANN202
    return backbone.build_batch([eval_samples(request)[name]])


def _holds(peft_model, backbone, request) -> bool:  # noqa: ANN001
    batch = _batch(backbone, request, "reliability")
    acc, _ = token_accuracy(_logits(peft_model, batch), batch["labels"])
    return bool(acc.item() == 1.0)


def _route(peft_model, layer, batch) -> tuple[int, torch.Tensor]:  # noqa: ANN001
    logits = _logits(peft_model, batch)
    return int(layer.last_choice[ADAPTER][0]), logits


def _construct_side_memory(backbone, method, peft_model, layer, request):  # noqa: ANN001, ANN202
    """A side memory that reacts to ``request``'s edit prompt and (almost) not to its unrelated prompts:
    ``Δ = s·u vᵀ + noise`` with ``v`` the edit prompt's mean layer input made orthogonal to every layer input
    of the unrelated prompts; then the edit is recorded as an edit would be. Returns the distances."""
    method.before_edit(peft_model, backbone, [request])  # caches the layer inputs, draws the mask
    pending = method._pending
    layer.set_editing(ADAPTER, False)
    edit_x = pending.edit.x[0][pending.edit.mask[0].bool()].float()
    loc_x = torch.cat([c.x[0][c.mask[0].bool()] for c in pending.loc]).float()
    basis, _ = torch.linalg.qr(loc_x.T)
    v = edit_x.mean(0)
    v = v - basis @ (basis.T @ v)
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(layer.out_features, generator=gen)
    noise = torch.randn(layer.out_features, layer.in_features, generator=gen) * 1e-3
    with torch.no_grad():
        layer.wise_mask[ADAPTER].fill_(True)
        layer.wise_side[ADAPTER].copy_(5.0 * torch.outer(u, v / v.norm()) + noise)
        d_edit, d_loc = method.distances(peft_model)
    method._pending = None
    layer.record_edit(ADAPTER, d_edit, 1)
    assert float(d_loc.max()) < method.act_ratio * float(d_edit.min()), "the construction failed"
    return d_edit, d_loc


def test_router_sends_the_edit_to_the_side_memory_and_unrelated_prompts_to_the_main_memory(requests):  # noqa: ANN001
    backbone, method, peft_model, layer = _setup()
    edit = _batch(backbone, requests[0], "reliability")
    locs = [_batch(backbone, requests[0], name) for name in ("t_locality", "m_locality")]
    with peft_model.disable_adapter():
        base_edit = _logits(peft_model, edit)
        bases = [_logits(peft_model, b) for b in locs]
    d_edit, _ = _construct_side_memory(backbone, method, peft_model, layer, requests[0])
    choice, logits = _route(peft_model, layer, edit)
    assert choice == 0, "the edit prompt must go to the side memory"
    torch.testing.assert_close(layer.last_distances[ADAPTER][0, 0], d_edit[0], rtol=1e-4, atol=1e-6)
    assert not torch.equal(logits, base_edit)
    for batch, base in zip(locs, bases):
        choice, logits = _route(peft_model, layer, batch)
        assert choice == -1, "an unrelated prompt must stay with the main memory"
        assert torch.equal(logits, base), "the main memory's output must be the base output bit for bit"
    # the same memories with τ = 0 (act_ratio 0): the unrelated prompts go to the side memory and move
    layer.wise_config[ADAPTER].act_ratio = 0.0
    for batch, base in zip(locs, bases):
        choice, logits = _route(peft_model, layer, batch)
        assert choice == 0
        assert not torch.equal(logits, base), "routing is what keeps the unrelated prompts at the base"


def test_the_activation_loss_separates_edit_and_unrelated_distances(requests):  # noqa: ANN001
    gaps = {}
    for weight in (0.0, 1.0):
        backbone, method, peft_model, layer = _setup(
            act_weight=weight, loc_margin=0.01, edit_margin=0.1, gap_margin=0.05, stop_loss=1e-9
        )
        method.edit(peft_model, backbone, [requests[0]])
        with torch.no_grad():
            method.before_edit(peft_model, backbone, [requests[0]])
            d_edit, d_loc = method.distances(peft_model)
            method._finish(peft_model)
        gaps[weight] = float(d_edit.min() - d_loc.max())
    assert gaps[1.0] > 0.005 and gaps[1.0] > 5 * max(gaps[0.0], 1e-4), gaps


def test_routing_distances_ignore_padding(requests):  # noqa: ANN001
    backbone, method, peft_model, layer = _setup()
    _construct_side_memory(backbone, method, peft_model, layer, requests[0])
    short = eval_samples(requests[0])["reliability"]
    long = PromptSample(prompt=" ".join([TEXTS[-1]] * 3), target="red", image=short.image)
    alone_choice, alone = _route(peft_model, layer, backbone.build_batch([short]))
    alone_distance = layer.last_distances[ADAPTER][0].clone()
    batch = backbone.build_batch([short, long])
    assert int(batch["attention_mask"][0].sum()) < batch["attention_mask"].shape[1] / 2, (
        "no padding to ignore"
    )
    choice, together = _route(peft_model, layer, batch)
    torch.testing.assert_close(layer.last_distances[ADAPTER][0], alone_distance, rtol=1e-4, atol=1e-4)
    assert choice == alone_choice == 0
    n = alone.shape[1]
    torch.testing.assert_close(together[0, :n], alone[0], rtol=1e-4, atol=1e-4)


def test_the_shard_mask_has_the_ratio_and_bounds_what_is_trained(requests):  # noqa: ANN001
    backbone, method, peft_model, layer = _setup(mask_ratio=0.3, save_freq=1, merge_freq=4)
    method.edit(peft_model, backbone, [requests[0]])
    first = layer.wise_mask[ADAPTER].clone()
    assert first.float().mean().item() == pytest.approx(0.3, abs=0.01)
    stored = layer.wise_memories[ADAPTER][0]
    assert bool(stored.ne(0).any()), "the edit trained nothing"
    assert not bool(stored[~first].ne(0).any()), "entries outside the mask were trained"
    assert layer.count(ADAPTER, MASK_SHARD) == 0 and layer.count(ADAPTER, SHARDS) == 1
    method.edit(peft_model, backbone, [requests[1]])
    second = layer.wise_mask[ADAPTER]
    assert layer.count(ADAPTER, MASK_SHARD) == 1
    assert second.float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert not torch.equal(first, second), "every shard draws its own mask"
    assert not bool(layer.wise_memories[ADAPTER][1][~second].ne(0).any())
    # the masks are seeded: a fresh adapter draws the same first mask
    _, method2, peft_model2, layer2 = _setup(mask_ratio=0.3, save_freq=1, merge_freq=4)
    layer2.draw_mask(ADAPTER)
    assert torch.equal(layer2.wise_mask[ADAPTER], first)


def test_the_side_memory_is_clamped_to_w_plus_minus_c(requests):  # noqa: ANN001
    backbone, method, peft_model, layer = _setup(norm_constraint=1e-3, steps=5, stop_loss=None)
    method.edit(peft_model, backbone, [requests[0]])
    side = layer.side_delta(ADAPTER).detach()
    bound = torch.tensor(1e-3, dtype=side.dtype)
    assert torch.equal(side.abs().max(), bound), "the clamp was never reached: the test could not fail"


def _easyedit_ties(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """EasyEdit's GTA('magnitude', 'sum', normalize=True) on task vectors, written out independently."""
    kept = []
    for d in deltas:
        k = int(density * d.numel())
        keep = torch.zeros(d.numel())
        keep[d.abs().reshape(-1).topk(k).indices] = 1
        kept.append(d * keep.reshape(d.shape))
    stacked = torch.stack(kept)
    w = torch.tensor(weights).view(-1, *([1] * deltas[0].dim()))
    weighted = stacked * w
    majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = (weighted.sign() == majority).float()
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1
    return (weighted * agree).sum(0) / divisor


def test_ties_merge_is_easyedits_normalised_ties_through_peft():
    from peft.utils.merge_utils import ties

    gen = torch.Generator().manual_seed(0)
    deltas = [torch.randn(6, 5, generator=gen) * (torch.rand(6, 5, generator=gen) < 0.4) for _ in range(3)]
    for weights in ([1.0, 1.0, 1.0], [0.4 / 2, 0.4 / 2, 0.6], [1 / 3] * 3):
        torch.testing.assert_close(ties_merge(deltas, weights, 0.53), _easyedit_ties(deltas, weights, 0.53))
    # equal weights: exactly peft's ties with unit weights
    torch.testing.assert_close(ties_merge(deltas, [0.5] * 3, 0.53), ties(deltas, torch.ones(3), 0.53))
    assert not torch.allclose(ties_merge(deltas, [0.2, 0.2, 0.6], 0.53), ties_merge(deltas, [1.0] * 3, 0.53))


def _spy_on_merges(layer):  # noqa: ANN001, ANN202
    """Record the stored shards and the merged memory right before every merge."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    merge = layer.merge_memories

    def spy(name: str) -> None:
        seen.append((layer.wise_memories[name].clone(), layer.wise_merged[name].clone()))
        merge(name)

    layer.merge_memories = spy
    return seen


def test_shards_and_merges_of_the_merged_memory_variant(requests):  # noqa: ANN001
    backbone, method, peft_model, layer = _setup(save_freq=1, merge_freq=2)
    seen = _spy_on_merges(layer)
    method.edit(peft_model, backbone, [requests[0]])
    assert method.last_events == ["shard"]
    assert layer.memory_count(ADAPTER) == 1 and not bool(layer.wise_side[ADAPTER].ne(0).any())
    choice, _ = _route(peft_model, layer, _batch(backbone, requests[0], "reliability"))
    assert choice == 1, "a stored shard not merged yet is routed too (candidates: side, shard)"
    assert _holds(peft_model, backbone, requests[0])
    method.edit(peft_model, backbone, [requests[1]])
    assert method.last_events == ["shard", "merge"]
    counts = layer.wise_counts[ADAPTER].tolist()
    assert counts[EDITS] == 2 and counts[SHARDS] == 2 and counts[MERGES] == 1
    assert layer.memory_count(ADAPTER) == 0
    ((shards, _),) = seen
    merged = layer.wise_merged[ADAPTER]
    assert (
        bool(merged.ne(0).any()) and not torch.equal(merged, shards[0]) and not torch.equal(merged, shards[1])
    )
    # the first merge: TIES of the shards with equal weights (= peft's ties with unit weights)
    torch.testing.assert_close(merged, _easyedit_ties(list(shards), [0.5, 0.5], 0.53))
    for request in requests[:2]:  # both edits now answer from the merged memory (candidates: side, merged)
        choice, _ = _route(peft_model, layer, _batch(backbone, request, "reliability"))
        assert choice == 1
    # the second merge weights the new shards 0.4 / n and the merged memory 0.6, as EasyEdit
    method.edit(peft_model, backbone, [requests[2]])
    method.edit(peft_model, backbone, [requests[3]])
    assert layer.count(ADAPTER, MERGES) == 2 and len(seen) == 2
    shards, previous = seen[1]
    expected = _easyedit_ties([*shards, previous], [0.2, 0.2, 0.6], 0.53)
    torch.testing.assert_close(layer.wise_merged[ADAPTER], expected)


def test_retrieve_keeps_a_memory_and_a_threshold_per_shard(requests):  # noqa: ANN001
    backbone, method, peft_model, layer = _setup(retrieve=True, save_freq=1, merge_freq=2)
    method.edit(peft_model, backbone, [requests[0]])
    first_act = float(layer.wise_memory_min_act[ADAPTER][0])
    assert layer.memory_count(ADAPTER) == 1 and first_act > 0
    assert float(layer.wise_min_act[ADAPTER]) == float("inf"), "the new side memory has no edit yet"
    choice, _ = _route(peft_model, layer, _batch(backbone, requests[0], "reliability"))
    assert choice == 1 and _holds(peft_model, backbone, requests[0])
    seen = _spy_on_merges(layer)
    method.edit(peft_model, backbone, [requests[1]])
    assert method.last_events == ["shard", "merge"]
    ((shards, _),) = seen
    assert shards.shape[0] == 2
    # the two shards became one memory whose threshold statistic is the smaller of theirs
    assert layer.memory_count(ADAPTER) == 1
    torch.testing.assert_close(
        layer.wise_memories[ADAPTER][0], _easyedit_ties(list(shards), [1.0, 1.0], 0.53)
    )
    second_act = float(layer.wise_memory_min_act[ADAPTER][0])
    assert second_act <= first_act


def test_save_load_round_trip_with_stored_shards(requests, tmp_path):  # noqa: ANN001
    backbone, method, peft_model, layer = _setup(retrieve=True, save_freq=1, merge_freq=4)
    method.edit(peft_model, backbone, [requests[0]])
    method.edit(peft_model, backbone, [requests[1]])
    method.edit(peft_model, backbone, [requests[2]])
    assert layer.memory_count(ADAPTER) == 3
    batches = [_batch(backbone, r, n) for r in requests[:3] for n in ("reliability", "m_locality")]
    before = [_logits(peft_model, b) for b in batches]
    peft_model.save_pretrained(tmp_path)
    saved = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert all("wise_" in key for key in saved)
    memories = next(v for k, v in saved.items() if k.endswith("wise_memories"))
    assert tuple(memories.shape) == (3, layer.out_features, layer.in_features)
    fresh = tiny_backbone("llava", seed=0, texts=TEXTS)
    loaded = PeftModel.from_pretrained(fresh.model, str(tmp_path))
    loaded_layer = wise_layers(loaded, ADAPTER)[0][1]
    for key in ("wise_memories", "wise_memory_min_act", "wise_mask", "wise_counts", "wise_min_act"):
        assert torch.equal(getattr(loaded_layer, key)[ADAPTER], getattr(layer, key)[ADAPTER]), key
    for batch, logits in zip(batches, before):
        assert torch.equal(_logits(loaded, batch), logits)


def test_snapshot_restores_shards_counters_and_outputs(requests):  # noqa: ANN001
    backbone, method, peft_model, layer = _setup(save_freq=1, merge_freq=2)
    batch = _batch(backbone, requests[0], "reliability")
    base = _logits(peft_model, batch)
    snapshot = method.snapshot(peft_model, ADAPTER)
    assert method.adapter_is_identity(peft_model)
    method.edit(peft_model, backbone, [requests[0]])
    method.edit(peft_model, backbone, [requests[1]])
    assert layer.count(ADAPTER, MERGES) == 1 and not method.adapter_is_identity(peft_model)
    snapshot.restore()
    assert layer.wise_counts[ADAPTER].tolist() == [0, 0, 0, -1]
    assert layer.memory_count(ADAPTER) == 0 and not bool(layer.wise_merged[ADAPTER].ne(0).any())
    assert float(layer.wise_min_act[ADAPTER]) == float("inf")
    assert method.adapter_is_identity(peft_model)
    assert torch.equal(_logits(peft_model, batch), base)


def test_the_single_protocol_starts_every_edit_from_the_fresh_adapter(requests):  # noqa: ANN001
    from odedit_hf.evaluation import run_protocol

    backbone, method, _, _ = _setup(save_freq=1, merge_freq=2)
    backbone = tiny_backbone("llava", seed=0, texts=TEXTS)  # run_protocol wraps the model itself
    states = []
    before_edit = method.before_edit

    def spy(peft_model, bb, reqs):  # noqa: ANN001
        layer = wise_layers(peft_model, ADAPTER)[0][1]
        states.append(
            (layer.wise_counts[ADAPTER].tolist(), layer.memory_count(ADAPTER), layer.has_state(ADAPTER))
        )
        before_edit(peft_model, bb, reqs)

    method.before_edit = spy
    run = run_protocol("single", method, backbone, requests[:3])
    assert states == [([0, 0, 0, -1], 0, False)] * 3, (
        "an edit of the single protocol saw an earlier edit's state"
    )
    assert run.rollback_checks >= 3
    assert all(r.post.reliability == 1.0 for r in run.results)


def test_batch_edit_holds_every_request(requests):  # noqa: ANN001
    backbone, method, peft_model, layer = _setup()
    method.edit(peft_model, backbone, requests[:2])
    assert layer.count(ADAPTER, EDITS) == 2
    assert all(_holds(peft_model, backbone, r) for r in requests[:2])


def test_activation_margin_loss_is_zero_only_when_every_margin_holds():
    ok = activation_margin_loss(
        torch.tensor([25.0]), torch.tensor([2.0]), loc_margin=5, edit_margin=20, gap_margin=10
    )
    assert ok.item() == 0.0
    loss = activation_margin_loss(
        torch.tensor([12.0]), torch.tensor([7.0]), loc_margin=5, edit_margin=20, gap_margin=10
    )
    assert loss.item() == pytest.approx((7 - 5) + (20 - 12) + (7 - 12 + 10))


@pytest.mark.parametrize(
    "options, match",
    [
        ({"merge_freq": 3, "save_freq": 2}, "multiple of save_freq"),
        ({"mask_ratio": 0.0}, "mask_ratio"),
        ({"mask_ratio": 1.5}, "mask_ratio"),
        ({"act_fn": "nope"}, "act_fn"),
        ({"locality": "none"}, "locality"),
        ({"norm_constraint": -1.0}, "norm_constraint"),
    ],
)
def test_options_are_validated(options, match):  # noqa: ANN001
    with pytest.raises(ValueError, match=match):
        get_method("wise", **options)


def test_config_needs_a_target():
    with pytest.raises(ValueError, match="target_modules is required"):
        WISEConfig()


def test_a_failed_edit_leaves_editing_mode(requests, monkeypatch):  # noqa: ANN001
    import odedit_hf.editing.loop as loop

    backbone, method, peft_model, layer = _setup()

    def boom(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        assert layer.is_editing(ADAPTER), "the loop must run in editing mode"
        raise RuntimeError("boom")

    monkeypatch.setattr(loop, "run_edit_loop", boom)
    with pytest.raises(RuntimeError, match="boom"):
        method.edit(peft_model, backbone, [requests[0]])
    assert not layer.is_editing(ADAPTER) and method._pending is None


def test_distance_reduction_mean_max_and_mask():
    backbone, method, peft_model, layer = _setup(act_fn="identity", long_sequence=3)
    base = torch.zeros(2, 4, layer.out_features)
    delta = torch.zeros(2, 4, layer.out_features)
    delta[:, :, 0] = torch.tensor([[1.0, 2.0, 3.0, 6.0], [1.0, 2.0, 3.0, 6.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    train = layer.distances(ADAPTER, base, delta, mask, infer=False)
    torch.testing.assert_close(train, torch.tensor([3.0, 1.5]))  # the mean over attended tokens
    infer = layer.distances(ADAPTER, base, delta, mask, infer=True)
    torch.testing.assert_close(infer, torch.tensor([6.0, 2.0]))  # 4 tokens > long_sequence: the largest


def test_the_attention_mask_lines_up_with_the_last_positions():
    from odedit_hf.editors.wise import AttentionMaskHolder

    backbone, method, peft_model, layer = _setup()
    assert isinstance(layer._wise_attention, AttentionMaskHolder), "the tuner gave the layer no mask holder"
    holder = layer._wise_attention
    holder.mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert torch.equal(layer._attention_mask(2, 4, torch.device("cpu")), holder.mask)
    assert torch.equal(layer._attention_mask(2, 1, torch.device("cpu")), holder.mask[:, -1:])  # a cached step
    assert layer._attention_mask(3, 4, torch.device("cpu")) is None  # another batch: no mask
    holder.mask = None
    # a real forward fills the holder while it runs and clears it afterwards
    seen = []
    hook = layer.register_forward_pre_hook(lambda mod, args: seen.append(holder.mask))
    batch = backbone.build_batch([PromptSample(prompt=TEXTS[0], target="red")])
    _logits(peft_model, batch)
    hook.remove()
    assert torch.equal(seen[0], batch["attention_mask"]) and holder.mask is None


def test_save_load_round_trip_of_the_merged_memory(requests, tmp_path):  # noqa: ANN001
    backbone, method, peft_model, layer = _setup(save_freq=1, merge_freq=2)
    for request in requests[:3]:
        method.edit(peft_model, backbone, [request])
    assert layer.count(ADAPTER, MERGES) == 1 and layer.memory_count(ADAPTER) == 1  # merged + one pending
    batches = [_batch(backbone, r, "reliability") for r in requests[:3]]
    before = [_logits(peft_model, b) for b in batches]
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_backbone("llava", seed=0, texts=TEXTS).model, str(tmp_path))
    loaded_layer = wise_layers(loaded, ADAPTER)[0][1]
    assert torch.equal(loaded_layer.wise_merged[ADAPTER], layer.wise_merged[ADAPTER])
    for batch, logits in zip(batches, before):
        assert torch.equal(_logits(loaded, batch), logits)


def test_a_batch_that_crosses_a_shard_boundary_stores_one_shard(requests):  # noqa: ANN001
    backbone, method, peft_model, layer = _setup(save_freq=2, merge_freq=4)
    method.edit(peft_model, backbone, requests[:3])
    assert method.last_events == ["shard"]
    assert layer.wise_counts[ADAPTER].tolist() == [3, 1, 0, 0]
    first_mask = layer.wise_mask[ADAPTER].clone()
    method.edit(peft_model, backbone, [requests[3]])  # starts the second shard: a new mask
    assert layer.count(ADAPTER, MASK_SHARD) == 1 and not torch.equal(layer.wise_mask[ADAPTER], first_mask)
    assert method.last_events == ["shard", "merge"] and layer.count(ADAPTER, MERGES) == 1


def test_odedit_optimises_the_side_memory_with_the_activation_loss(requests):  # noqa: ANN001
    torch.manual_seed(0)
    backbone = tiny_backbone("llava", seed=0, texts=TEXTS)
    method = get_method("odedit+wise", odedit={"lambda_mode": "sketch"}, wise={"steps": 5})
    peft_model = get_peft_model(backbone.model, method.peft_config(backbone))
    layer = wise_layers(peft_model, ADAPTER)[0][1]
    terms = []
    extra_loss = method.editor.extra_loss

    def spy(model):  # noqa: ANN001
        out = extra_loss(model)
        terms.append(sorted(out))
        return out

    method.editor.extra_loss = spy
    assert method.edit_parameters(peft_model) == [layer.wise_side[ADAPTER]]
    method.edit(peft_model, backbone, [requests[0]])
    assert terms and all(t == ["wise_act"] for t in terms), "ODEdit must keep WISE's activation loss"
    assert layer.count(ADAPTER, EDITS) == 1 and not layer.is_editing(ADAPTER)
    assert float(layer.wise_min_act[ADAPTER]) < float("inf"), "the edit's distance was not recorded"

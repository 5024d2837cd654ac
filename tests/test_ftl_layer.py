"""FT-L's adapter layer on its own: construction errors, the delta's dtype, merge / unmerge (exact, safe,
by name), the forward in each state, the clamp and the reset.

The editor matrix (tests/test_editors.py) checks FT-L through a whole edit; these pin the layer's contract
that the matrix reaches only on its happy path (written against the survivors of a mutation run, issue 20).
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from odedit_hf.editors.ftl.config import FTLConfig
from odedit_hf.editors.ftl.layer import Linear


def _layer(dtype: torch.dtype = torch.float32, **config) -> Linear:  # noqa: ANN003
    torch.manual_seed(0)
    base = nn.Linear(4, 3, bias=True).to(dtype)
    return Linear(base, "default", FTLConfig(target_modules=["x"], **config))


def _set_delta(layer: Linear, value: torch.Tensor, name: str = "default") -> None:
    with torch.no_grad():
        layer.ftl_delta[name].copy_(value)


def test_unknown_keywords_and_non_linear_bases_are_refused_with_their_messages():
    with pytest.raises(ValueError) as info:
        Linear(nn.Linear(4, 3), "default", FTLConfig(target_modules=["x"]), rank=4, alpha=1)
    assert str(info.value) == "FTLLayer: unknown keyword arguments ['alpha', 'rank']"
    layer = _layer()
    with pytest.raises(ValueError) as info:
        layer.update_layer("other", FTLConfig(target_modules=["x"]), rank=2)
    assert str(info.value) == "FTLLayer.update_layer: unknown keyword arguments ['rank']"
    with pytest.raises(ValueError) as info:
        Linear(nn.Conv1d(4, 3, 1), "default", FTLConfig(target_modules=["x"]))
    assert str(info.value) == (
        "FT-L can only edit torch.nn.Linear modules, got Conv1d; "
        "choose FFN projections (see the backbone registry's ffn_projections)."
    )


def test_a_new_delta_is_zero_in_the_base_shape_and_the_test_init_is_small_noise():
    layer = _layer()
    delta = layer.ftl_delta["default"]
    assert delta.shape == (3, 4) and delta.requires_grad
    assert torch.count_nonzero(delta) == 0
    assert (layer.in_features, layer.out_features) == (4, 3)
    noisy = _layer(init_weights=False).ftl_delta["default"]
    assert torch.count_nonzero(noisy) == noisy.numel()
    assert 1e-4 < noisy.abs().max().item() < 1e-2  # std 1e-3
    layer.reset_ftl_parameters("missing")  # no such adapter: nothing happens
    _set_delta(layer, torch.ones(3, 4))
    layer.reset_ftl_parameters("default")
    assert torch.count_nonzero(layer.ftl_delta["default"]) == 0


def test_get_delta_weight_is_in_the_base_weights_dtype():
    layer = _layer(torch.bfloat16)
    _set_delta(layer, torch.full((3, 4), 0.3))
    delta = layer.get_delta_weight("default")
    assert delta.dtype == torch.bfloat16
    assert torch.equal(delta, torch.full((3, 4), 0.3).to(torch.bfloat16))


def test_forward_adds_x_delta_transposed_and_a_disabled_adapter_gives_the_base():
    layer = _layer()
    x = torch.randn(2, 4)
    base = layer.base_layer(x)
    torch.testing.assert_close(layer(x), base, rtol=0, atol=0)
    delta = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 10
    _set_delta(layer, delta)
    torch.testing.assert_close(layer(x), base + x @ delta.T)
    layer.enable_adapters(False)
    torch.testing.assert_close(layer(x), base, rtol=0, atol=0)


def test_forward_with_a_bf16_base_adds_an_fp32_delta_and_returns_bf16():
    layer = _layer(torch.bfloat16)
    layer.ftl_delta["default"].data = layer.ftl_delta["default"].data.float()  # as peft's autocast leaves it
    _set_delta(layer, torch.full((3, 4), 0.25))
    x = torch.randn(2, 4).to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    expected = layer.base_layer(x) + (x.float() @ torch.full((4, 3), 0.25)).to(torch.bfloat16)
    torch.testing.assert_close(out, expected)


def test_merge_then_unmerge_restores_the_base_weight_bit_for_bit():
    layer = _layer()
    original = layer.base_layer.weight.detach().clone()
    x = torch.randn(2, 4)
    _set_delta(layer, torch.full((3, 4), 0.1234567))
    unmerged_out = layer(x)
    layer.merge()
    assert layer.merged and layer.merged_adapters == ["default"]
    torch.testing.assert_close(layer.base_layer.weight, original + 0.1234567)
    # merged: the base holds the delta, the forward must not add it a second time
    torch.testing.assert_close(layer(x), unmerged_out)
    layer.unmerge()
    assert not layer.merged and layer.merged_adapters == []
    assert torch.equal(layer.base_layer.weight, original)
    torch.testing.assert_close(layer(x), unmerged_out)


def _two_adapters() -> tuple[Linear, torch.Tensor]:
    """A layer holding "default" (delta 0.1) and "second" (delta 0.2), and its unmerged base weight."""
    layer = _layer()
    layer.update_layer("second", FTLConfig(target_modules=["x"]))
    _set_delta(layer, torch.full((3, 4), 0.1), "default")
    _set_delta(layer, torch.full((3, 4), 0.2), "second")
    return layer, layer.base_layer.weight.detach().clone()


def test_two_merges_unmerge_to_the_weight_before_the_first():
    layer, original = _two_adapters()
    layer.merge(adapter_names=["default"])
    layer.merge(adapter_names=["second"])
    assert layer.merged_adapters == ["default", "second"]
    torch.testing.assert_close(layer.base_layer.weight, original + 0.3)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)


def test_merge_by_name_merges_only_that_adapter_and_skips_unknown_names():
    layer, original = _two_adapters()
    # unknown names on both sides of the known one: each is skipped, neither ends the loop
    layer.merge(adapter_names=["missing", "second", "gone"])
    assert layer.merged_adapters == ["second"]
    torch.testing.assert_close(layer.base_layer.weight, original + 0.2)


def test_safe_merge_refuses_a_non_finite_result_and_the_default_merge_does_not_check():
    layer = _layer()
    original = layer.base_layer.weight.detach().clone()
    bad = torch.zeros(3, 4)
    bad[1, 2] = float("inf")
    _set_delta(layer, bad)
    with pytest.raises(ValueError) as info:
        layer.merge(safe_merge=True)
    assert str(info.value) == "FT-L adapter 'default': merging would put NaN/inf into Linear.weight"
    assert torch.equal(layer.base_layer.weight, original) and not layer.merged  # nothing written
    layer.merge()  # peft's contract: safe_merge defaults to False, no check
    assert layer.merged and torch.isinf(layer.base_layer.weight[1, 2])
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)


def test_unmerge_without_a_merge_warns_and_changes_nothing(caplog: pytest.LogCaptureFixture):
    layer = _layer()
    original = layer.base_layer.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="odedit_hf.editors.ftl.layer"):
        layer.unmerge()
    assert [r.getMessage() for r in caplog.records] == ["FT-L unmerge: nothing is merged"]
    assert torch.equal(layer.base_layer.weight, original)


def test_disabling_a_merged_adapter_unmerges_it_and_gives_the_base():
    layer = _layer()
    original = layer.base_layer.weight.detach().clone()
    x = torch.randn(2, 4)
    base = layer.base_layer(x)
    _set_delta(layer, torch.full((3, 4), 0.5))
    layer.merge()
    layer.enable_adapters(False)
    torch.testing.assert_close(layer(x), base, rtol=0, atol=0)
    assert not layer.merged and torch.equal(layer.base_layer.weight, original)


def test_the_constraint_clamps_each_entry_only_when_a_bound_is_set():
    layer = _layer(norm_constraint=0.2)
    _set_delta(layer, torch.tensor([[0.5, -0.5, 0.1, -0.1]] * 3))
    layer.apply_constraint("default")
    assert torch.equal(layer.ftl_delta["default"], torch.tensor([[0.2, -0.2, 0.1, -0.1]] * 3))
    layer.apply_constraint("missing")  # no such adapter: nothing happens
    free = _layer()
    _set_delta(free, torch.full((3, 4), 5.0))
    free.apply_constraint("default")
    assert torch.equal(free.ftl_delta["default"], torch.full((3, 4), 5.0))
    assert free.ftl_norm_constraint == {"default": None} and layer.ftl_norm_constraint == {"default": 0.2}


def test_repr_names_the_editor():
    assert repr(_layer()).startswith("ftl.Linear(")


def test_an_fp32_delta_on_a_bf16_base_is_given_in_bf16():
    layer = _layer(torch.bfloat16)
    layer.ftl_delta["default"].data = torch.full((3, 4), 0.3)  # fp32, as peft's autocast leaves it
    assert layer.get_delta_weight("default").dtype == torch.bfloat16


def test_an_inference_mode_config_gives_a_frozen_delta():
    assert not _layer(inference_mode=True).ftl_delta["default"].requires_grad


def test_a_second_merge_after_an_unmerge_still_unmerges_exactly():
    layer = _layer()
    original = layer.base_layer.weight.detach().clone()
    _set_delta(layer, torch.full((3, 4), 0.1))
    layer.merge()
    layer.unmerge()
    _set_delta(layer, torch.full((3, 4), 0.7))
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight, original + 0.7)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)


def test_forward_skips_an_active_adapter_this_layer_does_not_hold():
    layer = _layer()
    x = torch.randn(2, 4)
    delta = torch.full((3, 4), 0.2)
    _set_delta(layer, delta)
    layer._active_adapter = ["elsewhere", "default"]  # an adapter of other layers first, then this one's
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ delta.T)

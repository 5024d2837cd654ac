"""The rollback machinery on small torch modules: what the base-weight hash covers, what a failed check
says, what a snapshot holds (issue 20: the mutation survivors of ``editing/rollback.py``)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from odedit_hf.editing import AdapterSnapshot, BaseWeights, RollbackError
from odedit_hf.editing.rollback import hash_tensors


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(5, 4)
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.embed.weight  # tied: counted once


def _lora(model: nn.Module, adapter_name: str = "default"):  # noqa: ANN202
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        model, LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False), adapter_name
    )


def test_hash_covers_every_tensor_after_an_empty_one_and_its_width():
    a, b = torch.zeros(0), torch.arange(3.0)
    digest = hash_tensors([("a", a), ("b", b)])
    assert len(digest) == 32  # 16 bytes, hex
    assert digest != hash_tensors([("a", a), ("b", b + 1)])  # an empty tensor does not end the hash
    assert digest != hash_tensors([("a", a), ("c", b)])  # names count
    assert digest != hash_tensors([("a", a), ("b", b.double())])  # dtypes count
    assert digest == hash_tensors([("a", a.clone()), ("b", b.clone())])


def test_base_weights_refuse_a_wrapped_model_and_a_model_holding_tuner_layers():
    peft_model = _lora(_Tiny())
    with pytest.raises(ValueError) as info:
        BaseWeights(peft_model)  # has peft_config
    assert str(info.value) == (
        "BaseWeights must record the model before it is wrapped by PEFT, so that adapter parameters are not "
        "mistaken for base weights; call it before get_peft_model"
    )
    with pytest.raises(ValueError, match="call it before get_peft_model"):
        BaseWeights(peft_model.base_model.model)  # no peft_config, but LoRA layers inside
    BaseWeights(_Tiny())  # a plain model is fine


def test_base_weights_record_tied_tensors_once_and_restore_requires_grad():
    model = _Tiny()
    model.proj.bias.requires_grad_(False)
    base = BaseWeights(model)
    assert len(base) == 3  # embed (= head), proj.weight, proj.bias
    for p in model.parameters():
        p.requires_grad_(False)  # as PEFT does
    base.restore_requires_grad()
    assert model.embed.weight.requires_grad and model.proj.weight.requires_grad
    assert not model.proj.bias.requires_grad


def test_failed_check_names_what_changed_and_what_it_means():
    model = _Tiny()
    base = BaseWeights(model)
    expected = base.digest()
    assert base.check(expected, context="at the start") == expected
    with torch.no_grad():
        model.proj.weight[0, 0] += 1
    with pytest.raises(RollbackError) as info:
        base.check(expected, context="after rolling back edit 7")
    current = base.digest()
    assert str(info.value) == (
        f"base weights changed after rolling back edit 7 (changed: proj.weight): hash {current} != {expected}. "
        "An editor wrote into the base model instead of its adapter (or an adapter was merged and not "
        "unmerged); the results of this run are not valid"
    )


def test_failed_check_lists_at_most_five_names_and_none_without_a_matching_reference():
    model = nn.Sequential(*[nn.Linear(2, 2, bias=False) for _ in range(7)])
    base = BaseWeights(model)
    expected = base.digest()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)
    with pytest.raises(
        RollbackError, match=re.escape("(changed: 0.weight, 1.weight, 2.weight, 3.weight, 4.weight, ...)")
    ):
        base.check(expected, context="now")
    base.digest()  # the reference now is the changed state: nothing to compare names against
    with pytest.raises(RollbackError, match=r"^base weights changed now: hash "):
        base.check(expected, context="now")


def test_snapshot_holds_only_the_named_adapters_parameters_and_restores_them():
    model = _Tiny()
    base = BaseWeights(model)
    peft_model = _lora(model, "edit")
    peft_model.add_adapter("other", peft_model.peft_config["edit"])
    snap = AdapterSnapshot(peft_model, "edit", base=base)
    assert snap.names and all(".edit." in n for n in snap.names)
    before = snap.digest()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".edit." in name or ".other." in name:
                p.add_(1)
    other = {n: p.detach().clone() for n, p in peft_model.named_parameters() if ".other." in n}
    assert snap.digest() != before
    snap.restore()
    assert snap.digest() == before
    for n, p in peft_model.named_parameters():
        if n in other:
            assert torch.equal(p, other[n])  # another adapter is not the snapshot's business


def test_snapshot_defaults_to_the_default_adapter_and_refuses_a_model_without_it():
    model = _Tiny()
    base = BaseWeights(model)
    with pytest.raises(
        ValueError, match=re.escape("no parameter of adapter 'default'; wrap it with get_peft_model first")
    ):
        AdapterSnapshot(model, base=base)
    peft_model = _lora(model)
    assert (
        AdapterSnapshot(peft_model, base=base).names
        == AdapterSnapshot(peft_model, "default", base=base).names
    )


def test_cpu_hash_is_blake2b_of_the_raw_bytes():
    """Pinned by hand: on the CPU the digest reads the tensor's raw bytes (the on-device fingerprint is for
    accelerators only)."""
    import hashlib

    t = torch.tensor([[1.5, -0.0], [2.0, 3.0]])
    by_hand = hashlib.blake2b(digest_size=16)
    by_hand.update(b"w|torch.float32|(2, 2)|cpu|")
    by_hand.update(t.numpy().tobytes())
    assert hash_tensors([("w", t)]) == by_hand.hexdigest()
    assert hash_tensors([("w", t)]) != hash_tensors([("w", torch.tensor([[1.5, 0.0], [2.0, 3.0]]))])  # -0.0


def test_cpu_hash_reads_the_same_bytes_as_a_copy_of_them():
    """Hashing the array's buffer in place gives the digest of a byte copy (``tobytes``), for every layout:
    non-contiguous views, an offset slice, 0-dim, bf16, bool and int tensors."""
    import hashlib

    torch.manual_seed(0)
    w = torch.randn(6, 5)
    tensors = [
        ("f32", w),
        ("transposed", w.t()),
        ("strided", w[:, ::2]),
        ("offset", w[2:4, 1:]),
        ("scalar", torch.tensor(-0.0)),
        ("bf16", w.to(torch.bfloat16)),
        ("bool", w > 0),
        ("int", torch.arange(7, dtype=torch.int64)),
        ("empty", torch.empty(0, 3)),
    ]
    by_copy = hashlib.blake2b(digest_size=16)
    for name, t in tensors:
        by_copy.update(f"{name}|{t.dtype}|{tuple(t.shape)}|cpu|".encode())
        if t.numel():
            by_copy.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    assert hash_tensors(tensors) == by_copy.hexdigest()
    assert hash_tensors([("strided", w[:, ::2])]) != hash_tensors([("strided", w[:, 1::2])])


def test_base_weights_refuse_either_sign_of_peft_alone():
    plain = _Tiny()
    plain.peft_config = {}  # a PEFT attribute without tuner layers (e.g. a half-unwrapped model)
    with pytest.raises(ValueError, match="before it is wrapped by PEFT"):
        BaseWeights(plain)
    inner = _lora(_Tiny()).base_model.model
    if hasattr(inner, "peft_config"):
        del inner.peft_config
    assert not hasattr(inner, "peft_config")
    with pytest.raises(ValueError, match="before it is wrapped by PEFT"):
        BaseWeights(inner)  # tuner layers without the attribute


def test_failed_check_adds_no_ellipsis_for_exactly_five_names():
    model = nn.Sequential(*[nn.Linear(2, 2, bias=False) for _ in range(5)])
    base = BaseWeights(model)
    expected = base.digest()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)
    with pytest.raises(
        RollbackError, match=re.escape("(changed: 0.weight, 1.weight, 2.weight, 3.weight, 4.weight):")
    ):
        base.check(expected, context="now")


def test_snapshot_leaves_out_base_weights_whose_name_has_the_adapter_component():
    class _Named(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.edit = nn.Linear(4, 4)  # a base module called like the adapter
            self.proj = nn.Linear(4, 4)

    model = _Named()
    base = BaseWeights(model)
    peft_model = _lora(model, "edit")
    names = AdapterSnapshot(peft_model, "edit", base=base).names
    assert names and all("lora_" in n for n in names), names
    unguarded = AdapterSnapshot(peft_model, "edit").names  # without base: the base module's weights join
    assert set(names) < set(unguarded)


@pytest.mark.parametrize(("n", "tail"), [(6, ", ..."), (7, ", ...")])
def test_failed_check_marks_more_than_five_names(n, tail):
    model = nn.Sequential(*[nn.Linear(2, 2, bias=False) for _ in range(n)])
    base = BaseWeights(model)
    expected = base.digest()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)
    with pytest.raises(RollbackError, match=re.escape("3.weight, 4.weight" + tail + "):")):
        base.check(expected, context="now")


def test_a_check_against_another_record_s_digest_needs_no_earlier_digest():
    """``check`` on a fresh record (no ``digest()`` taken on it) compares hashes and names nothing."""
    model = _Tiny()
    expected = BaseWeights(model).digest()
    with torch.no_grad():
        model.proj.bias.add_(1)
    with pytest.raises(RollbackError, match=r"^base weights changed at the end: hash [0-9a-f]{32} != "):
        BaseWeights(model).check(expected, context="at the end")

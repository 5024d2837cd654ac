"""The editor matrix: every row of ``tests/editor_cases.py`` (and every row crossed with every wrapper
method) through one set of checks, via the public ``method.edit``:

the edit holds; locality (layers before the first edited one untouched); save/load round trip with
stock peft after ``import odedit_hf``; ``disable_adapter`` gives the base outputs; rollback restores the
base outputs and the base-weight hash; a second sequential edit accumulates; merge/unmerge.

One edit per row serves the checks (the row is a module-scoped parameter, so pytest runs every check of
a row before the next row). A check that changes the adapter (the sequential edit; the rollback, which
unloads it) marks the edit ``dirty`` first, and the next check of that row gets a fresh edit: each check
passes or fails on its own, in any order (mutmut reorders tests by duration), and in this file's order
no edit is made twice. Merge/unmerge gets its own edit (LoRA's unmerge is not bit-exact, so it would
taint the rollback check).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

import odedit_hf  # noqa: F401  registers the PEFT types
from odedit_hf.editing import BaseWeights, get_method, model_inputs
from odedit_hf.evaluation import token_accuracy
from odedit_hf.testing import tiny_backbone, tiny_image

from .editor_cases import EDITOR_CASES, WRAPPERS, EditorCase

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


@dataclass(frozen=True)
class Row:
    case: EditorCase
    wrapper: tuple[str, dict[str, Any]] | None = None

    @property
    def id(self) -> str:
        return self.case.case if self.wrapper is None else f"{self.wrapper[0]}+{self.case.case}"

    def method(self) -> Any:
        if self.wrapper is None:
            return get_method(self.case.method, **self.case.options)
        name, options = self.wrapper
        return get_method(
            f"{name}+{self.case.method}", **{name: options, self.case.method: self.case.options}
        )


def _wrappable(case: EditorCase, wrapper: str | None = None) -> bool:
    from odedit_hf.editing import method_class

    cls = method_class(case.method)
    # a wrapper may accept only some editors (ASAM: the intrinsic ones), named in its `supported_editors`
    supported = getattr(method_class(wrapper), "supported_editors", None) if wrapper else None
    return cls.wrappable and cls.trains_at_edit and (supported is None or cls.name in supported)


ROWS = [Row(c) for c in EDITOR_CASES] + [
    Row(c, w) for w in WRAPPERS for c in EDITOR_CASES if _wrappable(c, w[0])
]


@pytest.fixture(scope="module")
def requests(tmp_path_factory):  # noqa: ANN001
    from odedit_hf.data import EditRequest

    root = tmp_path_factory.mktemp("images")
    paths = []
    for i in range(4):
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
        "m_loc": paths[3],
        "m_loc_q": "what animal is this",
        "m_loc_a": "cat",
    }
    first = EditRequest(
        case_id=0, src="what color is the cube", alt="blue", image=paths[0], image_rephrase=paths[1], **common
    )
    second = EditRequest(
        case_id=1,
        src="which shape is shown",
        alt="green",
        image=paths[2],
        image_rephrase=paths[0],
        **{**common, "rephrase": "what shape is shown"},  # its own rephrase: R_gen pulls towards it
    )
    return first, second


@dataclass
class Edited:
    row: Row
    backbone: Any
    method: Any
    peft_model: Any
    base: BaseWeights
    base_digest: str
    snapshot: Any
    edit_batch: dict[str, torch.Tensor]
    loc_batch: dict[str, torch.Tensor]
    base_edit_logits: torch.Tensor
    base_loc_logits: torch.Tensor
    base_hidden: tuple[torch.Tensor, ...]
    dirty: bool = False  # set by a check that changes the adapter: the next check makes a new edit


def _run(model: Any, batch: dict[str, torch.Tensor], **kwargs: Any) -> Any:
    with torch.no_grad():
        return model(**model_inputs(batch), **kwargs)


def _batches(backbone: Any, request: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from odedit_hf.editing import eval_samples

    samples = eval_samples(request)
    return backbone.build_batch([samples["reliability"]]), backbone.build_batch([samples["t_locality"]])


def _edit(row: Row, requests) -> Edited:  # noqa: ANN001
    torch.manual_seed(0)
    backbone = tiny_backbone(row.case.model_type, seed=0, texts=TEXTS)
    edit_batch, loc_batch = _batches(backbone, requests[0])
    base_out = _run(backbone.model, edit_batch, output_hidden_states=True)
    base_loc = _run(backbone.model, loc_batch).logits
    base = BaseWeights(backbone.model)
    digest = base.digest()
    method = row.method()
    peft_model = get_peft_model(backbone.model, method.peft_config(backbone))
    snapshot = method.snapshot(peft_model, "default", base=base)
    method.edit(peft_model, backbone, [requests[0]])
    return Edited(
        row,
        backbone,
        method,
        peft_model,
        base,
        digest,
        snapshot,
        edit_batch,
        loc_batch,
        base_out.logits,
        base_loc,
        tuple(h.clone() for h in base_out.hidden_states),
    )


@pytest.fixture(scope="module", params=ROWS, ids=[r.id for r in ROWS])
def row_state(request: pytest.FixtureRequest) -> dict[str, Any]:
    return {"row": request.param, "edited": None}


@pytest.fixture
def edited(row_state: dict[str, Any], requests) -> Edited:  # noqa: ANN001
    current = row_state["edited"]
    if current is None or current.dirty:
        current = row_state["edited"] = _edit(row_state["row"], requests)
    return current


@pytest.fixture(params=ROWS, ids=[r.id for r in ROWS])
def fresh_edited(request: pytest.FixtureRequest, requests) -> Edited:  # noqa: ANN001
    return _edit(request.param, requests)


def _edited_layer_indices(peft_model: Any) -> list[int]:
    names = [n for n, m in peft_model.named_modules() if isinstance(m, BaseTunerLayer)]
    return sorted({int(m.group(1)) for n in names if (m := re.search(r"\.layers\.(\d+)\.", n))})


def test_edit_holds(edited: Edited):
    labels = edited.edit_batch["labels"]
    before, _ = token_accuracy(edited.base_edit_logits, labels)
    after, exact = token_accuracy(_run(edited.peft_model, edited.edit_batch).logits, labels)
    assert before.item() < 1.0, "the base model already gives the target: the test could not fail"
    assert after.item() == 1.0 and exact.item() == 1.0


def test_locality_layers_before_the_edit_are_untouched(edited: Edited):
    layers = _edited_layer_indices(edited.peft_model)
    assert layers, "no adapter layer inside the decoder layers"
    hidden = _run(edited.peft_model, edited.edit_batch, output_hidden_states=True).hidden_states
    # hidden_states[i] is the input of decoder layer i: everything up to the first edited layer is unchanged
    for i in range(layers[0] + 1):
        assert torch.equal(hidden[i], edited.base_hidden[i]), f"hidden state {i} changed"
    assert not torch.equal(hidden[-1], edited.base_hidden[-1]), "the edit changed nothing downstream"


def test_disable_adapter_gives_base_outputs(edited: Edited):
    with edited.peft_model.disable_adapter():
        assert torch.equal(_run(edited.peft_model, edited.edit_batch).logits, edited.base_edit_logits)
        assert torch.equal(_run(edited.peft_model, edited.loc_batch).logits, edited.base_loc_logits)
    assert not torch.equal(_run(edited.peft_model, edited.edit_batch).logits, edited.base_edit_logits)


def test_save_load_round_trip_with_stock_peft(edited: Edited, tmp_path):
    edited_logits = _run(edited.peft_model, edited.edit_batch).logits
    edited.peft_model.save_pretrained(tmp_path)
    with open(os.path.join(tmp_path, "adapter_config.json")) as f:
        config = json.load(f)
    expected_type = edited.row.case.peft_type if edited.row.wrapper is None else edited.row.wrapper[0].upper()
    assert config["peft_type"] == expected_type
    if edited.row.wrapper is not None:
        assert config["editor"]["peft_type"] == edited.row.case.peft_type
    from safetensors.torch import load_file

    saved = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    # the editor's tensors, plus a wrapper's own adapter state (LDKE's classifier) under its prefix
    prefixes = [edited.row.case.prefix] + ([f"{edited.row.wrapper[0]}_"] if edited.row.wrapper else [])
    assert saved and all(any(p in key for p in prefixes) for key in saved), (
        "the file must hold adapter state only"
    )
    fresh = tiny_backbone(edited.row.case.model_type, seed=0, texts=TEXTS)  # same seed: the same base weights
    loaded = PeftModel.from_pretrained(fresh.model, str(tmp_path))
    torch.testing.assert_close(_run(loaded, edited.edit_batch).logits, edited_logits, rtol=0, atol=1e-6)


NORM_ROWS = [r for r in ROWS if "norm_constraint" in r.case.options]


@pytest.mark.parametrize("row_state", NORM_ROWS, ids=[r.id for r in NORM_ROWS], indirect=True)
def test_rollback_check_catches_a_write_into_the_base(edited: Edited):
    from odedit_hf.editing import RollbackError

    layer_name = next(n for n, m in edited.peft_model.named_modules() if isinstance(m, BaseTunerLayer))
    weight = next(
        p for n, p in edited.peft_model.get_submodule(layer_name).get_base_layer().named_parameters()
    )
    original = weight.detach().clone()
    with torch.no_grad():
        weight.view(-1)[0] += 1e-3
    short = layer_name.removeprefix("base_model.model.")
    try:
        with pytest.raises(RollbackError, match="base weights changed .*" + re.escape(short)):
            edited.base.check(edited.base_digest, context="after a bad editor")
    finally:
        with torch.no_grad():
            weight.copy_(original)  # the later checks of this row use the same model
    edited.base.check(edited.base_digest, context="after undoing the bad write")


def test_sequential_edits_accumulate(edited: Edited, requests):  # noqa: ANN001
    edited.dirty = True  # a second edit on top: the other checks need the one-edit state
    after_first = _run(edited.peft_model, edited.edit_batch).logits
    second_batch, _ = _batches(edited.backbone, requests[1])
    before_second, _ = token_accuracy(_run(edited.peft_model, second_batch).logits, second_batch["labels"])
    assert before_second.item() < 1.0, "the second target already holds: the test could not fail"
    edited.method.edit(edited.peft_model, edited.backbone, [requests[1]])  # no restore in between
    acc, _ = token_accuracy(_run(edited.peft_model, second_batch).logits, second_batch["labels"])
    assert acc.item() == 1.0, "the second edit does not hold"
    assert not torch.equal(_run(edited.peft_model, edited.edit_batch).logits, after_first), (
        "nothing accumulated"
    )
    if edited.row.case.keeps_earlier_edits:
        first, _ = token_accuracy(
            _run(edited.peft_model, edited.edit_batch).logits, edited.edit_batch["labels"]
        )
        assert first.item() == 1.0, "the second edit erased the first"
    edited.base.check(edited.base_digest, context="after two sequential edits")


def test_rollback_restores_base_outputs_and_hash(edited: Edited):
    edited.dirty = True  # restores and unloads the adapter
    assert edited.base.digest() == edited.base_digest, "the edit wrote into the base weights"
    edited.snapshot.restore()
    assert torch.equal(_run(edited.peft_model, edited.edit_batch).logits, edited.base_edit_logits)
    edited.base.check(edited.base_digest, context="after restoring the adapter")
    model = edited.peft_model.unload()
    assert not hasattr(model, "peft_config")
    assert edited.base.digest() == edited.base_digest
    assert torch.equal(_run(model, edited.edit_batch).logits, edited.base_edit_logits)


def test_merge_unmerge(fresh_edited: Edited):
    edited = fresh_edited
    if not edited.row.case.merge or not getattr(edited.method, "merges", True):
        with pytest.raises((ValueError, NotImplementedError, TypeError)):
            edited.peft_model.merge_adapter()
        return
    edited_logits = _run(edited.peft_model, edited.edit_batch).logits
    edited.peft_model.merge_adapter()
    assert edited.base.digest() != edited.base_digest  # merged: the base weights hold the edit
    torch.testing.assert_close(
        _run(edited.peft_model, edited.edit_batch).logits, edited_logits, rtol=1e-4, atol=1e-4
    )
    edited.peft_model.unmerge_adapter()
    if edited.row.case.exact_unmerge:
        edited.base.check(edited.base_digest, context="after unmerge")
    torch.testing.assert_close(
        _run(edited.peft_model, edited.edit_batch).logits, edited_logits, rtol=1e-4, atol=1e-4
    )


def test_every_wrappable_editor_has_a_row_and_every_method_is_discovered():
    from odedit_hf.editing import available_methods, method_class

    # editors that change no weight (IKE: in-context) are outside the matrix; tests/test_ike.py covers them
    editors = {
        n for n in available_methods() if method_class(n).kind == "editor" and method_class(n).trains_at_edit
    }
    assert {c.method for c in EDITOR_CASES} == editors, (
        "every base editor needs a row in tests/editor_cases.py"
    )
    assert {name for name, _ in WRAPPERS} == {
        n for n in available_methods() if method_class(n).kind == "wrapper"
    }


def test_ftl_config_validates_and_defaults_from_the_registry():
    from odedit_hf.editors.ftl import FTLConfig, FTLLayer

    for bad in (
        {"norm_constraint": -1.0},
        {"target_modules": []},
        {"layers_to_transform": [-1]},
        {"target_modules": 3},
    ):
        with pytest.raises(ValueError, match="FTLConfig"):
            FTLConfig(**bad)
    backbone = tiny_backbone("llama", seed=0)
    peft_model = get_peft_model(backbone.model, FTLConfig(layers_to_transform=[1]))
    edited = [n for n, m in peft_model.named_modules() if isinstance(m, FTLLayer)]
    assert edited == ["base_model.model.model.layers.1.mlp.down_proj"]  # llama's default_edit_projections


def test_ftl_refuses_modules_that_are_not_linear():
    from odedit_hf.editors.ftl import FTLConfig

    backbone = tiny_backbone("llama", seed=0)
    with pytest.raises(ValueError, match="not torch.nn.Linear"):
        get_peft_model(backbone.model, FTLConfig(target_modules=["model.layers.0.input_layernorm"]))


def test_ftl_alias_and_one_name():
    from odedit_hf.editing import method_class

    assert method_class("ft") is method_class("ftl")
    assert get_method("ft").name == "ftl"
    assert get_method("odedit", editor="ft").name == "odedit+ftl"

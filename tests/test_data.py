"""Data contract: MMEdit loading and validation, EditRequest, EditScores / EditResult."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pickle
import subprocess
import sys

import pytest
from PIL import Image

from odedit_hf.data import (
    MMEDIT_FIELDS,
    DataValidationError,
    EditRequest,
    EditResult,
    EditScores,
    MMEditDataset,
    load_mmedit,
)

# ---------------------------------------------------------------------------------------------
# helpers


def _png(path, color, mode="RGB", size=(5, 3)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def _record(i, *, question=True):
    src = f"What colour is thing {i}?" if question else f"a photo of thing {i}"
    return {
        "src": src,
        "pred": f"red{i}",
        "alt": f"blue{i}",
        "image": f"img/{i}.png",
        "rephrase": f"Which colour does thing {i} have?" if question else f"an image of thing {i}",
        "image_rephrase": f"reph/{i}.png",
        "loc": f"Who wrote book {i}?",
        "loc_ans": f"author{i}",
        "m_loc": f"img/loc{i}.png",
        "m_loc_q": f"How many dots in picture {i}?",
        "m_loc_a": str(i),
    }


@pytest.fixture
def world(tmp_path):
    """A data folder: image_root with img/, a separate rephrase root, and a writer for files."""
    root = tmp_path / "images"
    reph_root = tmp_path / "rephrase_images"
    for i in range(6):
        _png(root / "img" / f"{i}.png", (10 * i, 20, 30))
        _png(root / "img" / f"loc{i}.png", (0, 10 * i, 0))
        _png(reph_root / "reph" / f"{i}.png", (0, 0, 10 * i))

    def write(records, name="edits.json"):
        p = tmp_path / name
        p.write_text(json.dumps(records), encoding="utf-8")
        return p

    return {"tmp": tmp_path, "root": root, "reph": reph_root, "write": write}


def _load(world, records, **kwargs):
    return load_mmedit(world["write"](records), world["root"], world["reph"], **kwargs)


def _assert_names(exc: DataValidationError, file_name: str, index: int | None, field: str | None):
    msg = str(exc)
    assert file_name in msg, msg
    assert exc.path is not None and exc.path.endswith(file_name)
    if index is not None:
        assert f"record {index}" in msg, msg
        assert exc.index == index
    if field is not None:
        assert repr(field) in msg, msg
        assert exc.field == field


# ---------------------------------------------------------------------------------------------
# good files


def test_vqa_file_loads_and_resolves_paths(world):
    import datasets

    ds = _load(world, [_record(i) for i in range(3)])
    assert isinstance(ds, MMEditDataset)
    assert len(ds) == 3 and ds.task == "vqa" and ds.skipped == 0 and ds.skip_reasons == []
    assert isinstance(ds.hf_dataset, datasets.Dataset)
    assert set(ds.hf_dataset.column_names) == {"case_id", "task", *MMEDIT_FIELDS}
    assert ds.path == str(world["tmp"] / "edits.json")

    req = ds[1]
    assert isinstance(req, EditRequest)
    assert req.case_id == 1 and req.task == "vqa" and req.source == ds.path
    assert req.src == "What colour is thing 1?" and req.alt == "blue1" and req.m_loc_a == "1"
    assert req.image == os.path.realpath(world["root"] / "img" / "1.png")
    assert req.image_rephrase == os.path.realpath(world["reph"] / "reph" / "1.png")
    assert req.m_loc == os.path.realpath(world["root"] / "img" / "loc1.png")
    assert [r.case_id for r in ds] == [0, 1, 2]
    assert ds[-1].case_id == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.alt = "x"


def test_load_image_is_lazy_rgb(world):
    # A grayscale edit image and a corrupt m_loc image: loading must not open either.
    _png(world["root"] / "img" / "0.png", 77, mode="L", size=(4, 2))
    (world["root"] / "img" / "loc0.png").write_bytes(b"not a png")
    ds = _load(world, [_record(0)])
    req = ds[0]

    img = req.load_image()
    assert img.mode == "RGB" and img.size == (4, 2) and img.getpixel((0, 0)) == (77, 77, 77)
    assert req.load_image("image_rephrase").getpixel((1, 1)) == (0, 0, 0)
    with pytest.raises(DataValidationError) as info:
        req.load_image("m_loc")
    _assert_names(info.value, "edits.json", 0, "m_loc")
    assert "loc0.png" in str(info.value)
    with pytest.raises(ValueError, match="field must be one of"):
        req.load_image("src")


def test_caption_file_and_task_rule(world):
    caption = [_record(i, question=False) for i in range(3)]
    assert _load(world, caption).task == "caption"
    assert _load(world, caption, task="vqa")[0].task == "vqa"  # explicit wins
    mixed = [_record(0), _record(1), _record(2, question=False), _record(3, question=False)]
    with pytest.raises(DataValidationError, match="task='vqa' or task='caption'"):
        _load(world, mixed)
    assert _load(world, mixed, task="caption").task == "caption"


def test_rephrase_root_defaults_to_image_root(world):
    p = world["write"]([_record(0)])
    with pytest.raises(DataValidationError) as info:
        load_mmedit(p, world["root"])  # reph/0.png lives only under the rephrase root
    _assert_names(info.value, "edits.json", 0, "image_rephrase")
    _png(world["root"] / "reph" / "0.png", (1, 2, 3))
    req = load_mmedit(p, world["root"])[0]
    assert req.image_rephrase == os.path.realpath(world["root"] / "reph" / "0.png")


def test_dotdot_inside_root_is_allowed(world):
    rec = _record(0)
    rec["image"] = "img/../img/0.png"
    assert _load(world, [rec])[0].image == os.path.realpath(world["root"] / "img" / "0.png")


def test_empty_list(world):
    ds = _load(world, [])
    assert len(ds) == 0 and list(ds) == [] and "src" in ds.hf_dataset.column_names


# ---------------------------------------------------------------------------------------------
# bad records: each raises naming the file, record 1 and the field


def _set(field, value):
    def mutate(rec, world):
        rec[field] = value

    return mutate


def _drop(field):
    def mutate(rec, world):
        del rec[field]

    return mutate


def _absolute(rec, world):
    rec["image"] = str(world["root"] / "img" / "1.png")  # exists, inside the root, but absolute


def _symlinked_file(rec, world):
    target = _png(world["tmp"] / "outside" / "secret.png", (1, 1, 1))
    os.symlink(target, world["root"] / "img" / "link.png")
    rec["image"] = "img/link.png"


def _symlinked_dir(rec, world):
    _png(world["tmp"] / "outside" / "secret.png", (1, 1, 1))
    os.symlink(world["tmp"] / "outside", world["reph"] / "ext", target_is_directory=True)
    rec["image_rephrase"] = "ext/secret.png"


def _dotdot(rec, world):
    _png(world["tmp"] / "outside.png", (1, 1, 1))  # exists: the root check, not existence, must fail
    rec["m_loc"] = "../outside.png"


BAD_RECORDS = {
    "missing field": (_drop("loc_ans"), "loc_ans", "missing fields"),
    "non-string": (_set("alt", 3), "alt", "expected a string"),
    "null": (_set("pred", None), "pred", "expected a string"),
    "empty": (_set("src", ""), "src", "empty value"),
    "whitespace only": (_set("rephrase", "  \n"), "rephrase", "empty value"),
    "image missing": (_set("image", "img/nope.png"), "image", "not found"),
    "rephrase image missing": (_set("image_rephrase", "reph/nope.png"), "image_rephrase", "not found"),
    "image is a directory": (_set("m_loc", "img"), "m_loc", "not found"),
    "absolute path": (_absolute, "image", "absolute"),
    "dotdot escape": (_dotdot, "m_loc", "outside"),
    "symlinked file escape": (_symlinked_file, "image", "outside"),
    "symlinked dir escape": (_symlinked_dir, "image_rephrase", "outside"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_record_raises_with_location(world, case):
    mutate, field, reason = BAD_RECORDS[case]
    records = [_record(i) for i in range(3)]
    mutate(records[1], world)
    with pytest.raises(DataValidationError) as info:
        _load(world, records)
    _assert_names(info.value, "edits.json", 1, field)
    assert reason in str(info.value)
    assert isinstance(info.value, ValueError)


def test_record_not_an_object(world):
    with pytest.raises(DataValidationError) as info:
        _load(world, [_record(0), ["not", "a", "dict"]])
    _assert_names(info.value, "edits.json", 1, None)
    assert "not an object" in str(info.value)


@pytest.mark.parametrize(
    ("text", "reason"),
    [('{"src": "a"}', "expected a list"), ("[{", "not valid JSON"), ('{"a": 1}\n{"a": 2}', "not valid JSON")],
)
def test_bad_file_raises(world, text, reason):
    p = world["tmp"] / "broken.json"
    p.write_text(text, encoding="utf-8")
    for skip in (False, True):  # whole-file errors are never skipped
        with pytest.raises(DataValidationError, match=reason) as info:
            load_mmedit(p, world["root"], skip_invalid=skip)
        _assert_names(info.value, "broken.json", None, None)


def test_missing_file_and_root(world):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_mmedit(world["tmp"] / "nope.json", world["root"])
    p = world["write"]([_record(0)])
    with pytest.raises(DataValidationError, match="image_root is not a directory"):
        load_mmedit(p, world["tmp"] / "no_such_dir")
    with pytest.raises(DataValidationError, match="rephrase_image_root is not a directory"):
        load_mmedit(p, world["root"], world["tmp"] / "no_such_dir")


def test_bad_arguments(world):
    p = world["write"]([_record(0)])
    with pytest.raises(ValueError, match="task must be"):
        load_mmedit(p, world["root"], task="qa")
    for limit in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="limit must be"):
            load_mmedit(p, world["root"], limit=limit)
    with pytest.raises(TypeError):
        load_mmedit(p, world["root"], skip_bad=True)


# ---------------------------------------------------------------------------------------------
# skipping, limit, selection


def test_skip_invalid_counts_and_reports(world, caplog):
    records = [_record(i) for i in range(5)]
    records[1]["alt"] = ""
    records[3]["image"] = "../escape.png"
    with caplog.at_level(logging.WARNING, logger="odedit_hf.data.loader"):
        ds = _load(world, records, skip_invalid=True)
    assert len(ds) == 3 and [r.case_id for r in ds] == [0, 2, 4]
    assert ds.skipped == 2 and len(ds.skip_reasons) == 2
    assert "record 1" in ds.skip_reasons[0] and "'alt'" in ds.skip_reasons[0]
    assert "record 3" in ds.skip_reasons[1] and "'image'" in ds.skip_reasons[1]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 2 invalid record(s)" in warnings[0].getMessage()


def test_limit(world):
    records = [_record(i) for i in range(5)]
    assert [r.case_id for r in _load(world, records, limit=2)] == [0, 1]
    records[3]["alt"] = 7  # past the limit: never read
    assert len(_load(world, records, limit=3)) == 3
    records[1]["alt"] = ""  # with skipping, the limit counts valid records
    ds = _load(world, records, limit=2, skip_invalid=True)
    assert [r.case_id for r in ds] == [0, 2] and ds.skipped == 1
    assert len(_load(world, records[:1], limit=10)) == 1


def test_select_getitem_and_iteration(world):
    ds = _load(world, [_record(i) for i in range(5)])
    sub = ds.select([4, 1])
    assert isinstance(sub, MMEditDataset) and len(sub) == 2
    assert [r.case_id for r in sub] == [4, 1] and sub[0].alt == "blue4"
    assert sub.path == ds.path and sub.task == ds.task
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(IndexError):
        ds[-6]
    with pytest.raises(IndexError):
        ds.select([0, 9])
    with pytest.raises(TypeError, match="select"):
        ds[0:2]


def test_edit_request_validates(world):
    req = _load(world, [_record(0)])[0]
    fields = dataclasses.asdict(req)
    with pytest.raises(DataValidationError, match="'alt'"):
        EditRequest(**{**fields, "alt": " "})
    with pytest.raises(DataValidationError, match="not absolute"):
        EditRequest(**{**fields, "image": "img/0.png"})
    with pytest.raises(DataValidationError, match="task must be"):
        EditRequest(**{**fields, "task": "qa"})
    assert EditRequest(**fields) == req


def test_error_pickles():
    exc = DataValidationError("bad", path="f.json", index=3, field="alt", hint="fix it")
    back = pickle.loads(pickle.dumps(exc))
    assert str(back) == str(exc) == "f.json, record 3, field 'alt': bad (fix it)"
    assert (back.path, back.index, back.field, back.hint) == ("f.json", 3, "alt", "fix it")


def test_import_is_light():
    code = "import sys, odedit_hf.data; print('datasets' in sys.modules, 'PIL' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# ---------------------------------------------------------------------------------------------
# results


def _scores(seed: float) -> EditScores:
    names = [
        "reliability",
        "reliability_em",
        "t_generality",
        "t_generality_em",
        "m_generality",
        "m_generality_em",
        "t_locality",
        "m_locality",
        "t_locality_easyedit",
        "m_locality_easyedit",
    ]
    return EditScores(**{n: (seed + 0.07 * k) % 1.0 for k, n in enumerate(names)})


def test_scores_and_result_round_trip():
    s = _scores(0.1)
    assert EditScores.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    for final, loss in ((None, None), (_scores(0.5), 0.25)):
        r = EditResult(
            case_id=3,
            method="odedit+lora",
            protocol="sequential",
            post=s,
            final=final,
            wall_time_s=1.5,
            peak_memory_mb=512.0,
            steps=10,
            final_loss=loss,
        )
        d = json.loads(json.dumps(r.to_dict()))
        assert d["post"]["reliability"] == s.reliability
        assert EditResult.from_dict(d) == r


def test_from_dict_rejects_unknown_and_missing_keys():
    d = _scores(0.2).to_dict()
    with pytest.raises(ValueError, match=r"unknown keys \['rel'\]"):
        EditScores.from_dict({**d, "rel": 1.0})
    d.pop("m_locality")
    with pytest.raises(ValueError, match=r"missing keys \['m_locality'\]"):
        EditScores.from_dict(d)
    r = EditResult(3, "ft_l", "single", _scores(0.1), None, 1.0, 2.0, 5, 0.5).to_dict()
    with pytest.raises(ValueError, match="unknown keys"):
        EditResult.from_dict({**r, "seed": 0})
    r["post"]["extra"] = 0.0
    with pytest.raises(ValueError, match=r"EditScores.from_dict: unknown keys \['extra'\]"):
        EditResult.from_dict(r)


def test_scores_validation_and_mean():
    a, b = _scores(0.1), _scores(0.6)
    m = EditScores.mean([a, b])
    for name, value in m.to_dict().items():
        assert value == pytest.approx((getattr(a, name) + getattr(b, name)) / 2)
    with pytest.raises(ValueError, match="empty"):
        EditScores.mean([])
    nan = EditScores(**{**a.to_dict(), "m_locality": math.nan})
    with pytest.raises(ValueError, match=r"'m_locality' is NaN in items \[1\]"):
        EditScores.mean([a, nan])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        EditScores(**{**a.to_dict(), "reliability": 1.5})
    with pytest.raises(ValueError, match="real number"):
        EditScores(**{**a.to_dict(), "reliability": "0.5"})
    with pytest.raises(ValueError, match="steps"):
        EditResult(0, "ft_l", "single", a, None, 1.0, 2.0, -1, None)
    with pytest.raises(ValueError, match="wall_time_s"):
        EditResult(0, "ft_l", "single", a, None, math.nan, 2.0, 1, None)


# ---------------------------------------------------------------------------------------------
# optional probe fields (portability, hard-negative locality, knowledge unit)


def _probe_record(i):
    rec = _record(i)
    rec.update(
        {
            "portability": {
                "by_name": [{"prompt": f"Which colour does item {i} have?", "ground_truth": f"blue{i}"}],
                "one_hop": [
                    {
                        "prompt": "describe the image",
                        "ground_truth": f"a blue{i} thing",
                        "image": f"img/{i}.png",
                    }
                ],
            },
            "hard_loc": f"Who wrote book {i + 1}?",
            "hard_loc_ans": f"author{i + 1}",
            "hard_m_loc": f"img/loc{i + 1}.png",
            "hard_m_loc_q": "How many dots?",
            "hard_m_loc_a": "2",
            "rephrases": [f"Which colour does thing {i} have?", f"Thing {i} is of which colour?"],
            "image_rephrases": [f"reph/{i}.png", f"reph/{i + 1}.png"],
        }
    )
    return rec


def test_probe_fields_load_validated_and_resolved(world):
    ds = _load(world, [_probe_record(0), _record(1)])
    assert {"portability", "hard_loc", "hard_m_loc", "rephrases", "image_rephrases"} <= set(
        ds.hf_dataset.column_names
    )
    req, plain = ds[0], ds[1]
    by_name, one_hop = req.portability
    assert (by_name.kind, by_name.prompt, by_name.target, by_name.image) == (
        "by_name",
        "Which colour does item 0 have?",
        "blue0",
        None,
    )
    assert by_name.task == "vqa" and one_hop.task == "caption"
    assert one_hop.kind == "one_hop" and one_hop.image == os.path.realpath(world["root"] / "img" / "0.png")
    assert req.hard_loc_ans == "author1" and req.has_hard_t_locality and req.has_hard_m_locality
    assert req.hard_m_loc == os.path.realpath(world["root"] / "img" / "loc1.png")
    assert req.load_image("hard_m_loc").getpixel((0, 0)) == (0, 10, 0)
    assert req.rephrases == ("Which colour does thing 0 have?", "Thing 0 is of which colour?")
    assert req.image_rephrases == tuple(os.path.realpath(world["reph"] / "reph" / f"{j}.png") for j in (0, 1))
    # a record without probes in the same file: absent, not empty strings
    assert plain.portability == () and plain.hard_loc is None and plain.hard_m_loc is None
    assert not (plain.has_unit or plain.has_hard_t_locality or plain.has_hard_m_locality)
    with pytest.raises(ValueError, match="no 'hard_m_loc' image"):
        plain.load_image("hard_m_loc")
    # the request survives asdict (probes become dicts) and the comparison
    assert EditRequest(**dataclasses.asdict(req)) == req
    # a file without probes keeps exactly the old columns (test_vqa_file_loads_and_resolves_paths)
    assert set(_load(world, [_record(0)]).hf_dataset.column_names) == {"case_id", "task", *MMEDIT_FIELDS}


def test_knowedit_and_vlkeb_portability_keys_load(world):
    knowedit = _record(0)
    knowedit["portability"] = {
        "Reasoning": [
            {"prompt": "The colour of the sky over thing 0 is", "ground_truth": [["azure", "sky blue"]]},
            {"prompt": ["The maker of thing 0 is", "unused"], "ground_truth": ["acme"]},
        ],
        "Subject_Aliasing": [{"prompt": "What colour is object zero?", "ground_truth": "blue0"}],
    }
    vlkeb = _record(1)
    vlkeb["port_new"] = [
        {"port_type": "1-hop", "Q&A": {"Question": "Where is thing 1 sold?", "Answer": "market"}},
        {"port_type": "2-hop", "Q&A": {"Question": "Who runs it?", "Answer": "Ann"}, "image": "img/2.png"},
    ]
    listed = _record(2)
    listed["portability"] = [{"prompt": "Name thing 2?", "ground_truth": "bob", "kind": "alias"}]
    ds = _load(world, [knowedit, vlkeb, listed])
    p0, p1, p2 = ds[0].portability, ds[1].portability, ds[2].portability
    assert [(p.kind, p.prompt, p.target, p.image) for p in p0] == [
        ("Reasoning", "The colour of the sky over thing 0 is", "azure", None),  # the first alias
        ("Reasoning", "The maker of thing 0 is", "acme", None),  # the first of a list of prompts
        ("Subject_Aliasing", "What colour is object zero?", "blue0", None),
    ]
    assert [(p.kind, p.target) for p in p1] == [("1-hop", "market"), ("2-hop", "Ann")]
    assert p1[0].image == ds[1].image  # VLKEB asks portability on the edit image
    assert p1[1].image == os.path.realpath(world["root"] / "img" / "2.png")
    assert [(p.kind, p.prompt) for p in p2] == [("alias", "Name thing 2?")]
    assert ds[0].hard_loc is None and ds[0].rephrases == ()


def _bad_probe(field, value):
    def mutate(rec, world):
        rec.update(_probe_record(1))
        if value is _DROP:
            del rec[field]
        else:
            rec[field] = value

    return mutate


_DROP = object()
BAD_PROBES = {
    "portability not a container": ("portability", "x", "portability", "an object or a list"),
    "portability item not an object": ("portability", {"a": ["x"]}, "portability.a[0]", "not an object"),
    "portability empty prompt": (
        "portability",
        [{"prompt": " ", "ground_truth": "y"}],
        "portability[0].prompt",
        "empty value",
    ),
    "portability no ground truth": (
        "portability",
        [{"prompt": "q?"}],
        "portability[0].ground_truth",
        "string",
    ),
    "portability image escapes": (
        "portability",
        [{"prompt": "q?", "ground_truth": "y", "image": "../x.png"}],
        "portability[0]",
        "outside",
    ),
    "port_new not a list": ("port_new", {"Q&A": {}}, "port_new", "expected a list"),
    "hard group incomplete": ("hard_loc_ans", _DROP, "hard_loc_ans", "come together"),
    "hard m group incomplete": ("hard_m_loc_q", _DROP, "hard_m_loc_q", "come together"),
    "hard loc not a string": ("hard_loc", 3, "hard_loc", "expected a string"),
    "hard image missing": ("hard_m_loc", "img/nope.png", "hard_m_loc", "not found"),
    "rephrases not a list": ("rephrases", "one", "rephrases", "list of strings"),
    "rephrase empty": ("rephrases", ["a", ""], "rephrases[1]", "empty value"),
    "image rephrase missing": ("image_rephrases", ["reph/nope.png"], "image_rephrases[0]", "not found"),
}


@pytest.mark.parametrize("case", list(BAD_PROBES))
def test_bad_probe_fields_raise_with_location(world, case):
    field, value, where, reason = BAD_PROBES[case]
    records = [_record(i) for i in range(3)]
    _bad_probe(field, value)(records[1], world)
    with pytest.raises(DataValidationError) as info:
        _load(world, records)
    _assert_names(info.value, "edits.json", 1, where)
    assert reason in str(info.value)


def test_edit_request_validates_probes(world):
    fields = dataclasses.asdict(_load(world, [_probe_record(0)])[0])
    with pytest.raises(DataValidationError, match="come together"):
        EditRequest(**{**fields, "hard_loc": None})
    with pytest.raises(DataValidationError, match="not absolute"):
        EditRequest(**{**fields, "image_rephrases": ("reph/0.png",)})
    with pytest.raises(DataValidationError, match="unknown keys"):
        EditRequest(**{**fields, "portability": ({"prompt": "q", "target": "a", "answer": "b"},)})
    with pytest.raises(DataValidationError, match="list or tuple"):
        EditRequest(**{**fields, "rephrases": "one"})
    plain = {k: v for k, v in fields.items() if k in ("case_id", "task", "source", *MMEDIT_FIELDS)}
    req = EditRequest(**plain)  # the probes are optional: the old constructor call still works
    assert req.portability == () and req.rephrases == () and not req.has_unit


def test_optional_scores_are_absent_not_zero():
    from odedit_hf.data import OPTIONAL_SCORE_FIELDS

    a, b, c = _scores(0.1), _scores(0.6), _scores(0.3)
    assert a.present() == () and set(a.to_dict()) == set(_scores(0.0).to_dict())
    assert not set(OPTIONAL_SCORE_FIELDS) & set(a.to_dict())
    b.portability, b.portability_em, b.unit_consistency = 0.5, 0.0, 1.0
    c.portability, c.portability_em = 1.0, 1.0
    m = EditScores.mean([a, b, c])
    assert m.reliability == pytest.approx((a.reliability + b.reliability + c.reliability) / 3)
    assert m.portability == pytest.approx(0.75) and m.portability_em == pytest.approx(0.5)  # over b and c
    assert m.unit_consistency == 1.0 and math.isnan(m.hard_m_locality)
    assert "hard_m_locality" not in m.to_dict() and m.to_dict()["portability"] == pytest.approx(0.75)
    assert EditScores.counts([a, b, c]) == {"portability": 2, "portability_em": 2, "unit_consistency": 1}
    assert EditScores.from_dict(json.loads(json.dumps(b.to_dict()))) == b
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        EditScores(**{**a.to_dict(), "portability": 2.0})


def test_image_path_errors_say_what_where_and_what_to_do(tmp_path):
    """Each refusal of ``resolve_image_path`` carries its reason, the record's location and its hint, in
    the message and as attributes (the message is the user's only guide: pinned whole)."""
    import os

    from odedit_hf.data import DataValidationError
    from odedit_hf.data.images import resolve_image_path

    root = os.path.realpath(tmp_path / "images")
    os.makedirs(root)
    where = {"root_arg": "image_root", "source": "edits.json", "index": 3, "field": "m_loc"}
    cases = {
        "/abs/x.png": (
            "absolute image path '/abs/x.png'; MMEdit image paths are relative to image_root",
            f"store the path relative to image_root ({root})",
        ),
        "a\0b.png": (None, "fix the path in the record"),
        "../images_evil/x.png": (
            f"image path '../images_evil/x.png' resolves to {os.path.realpath(tmp_path / 'images_evil/x.png')}, "
            f"outside image_root {root}",
            "image paths may not leave image_root (no '..' or symlinks pointing outside); "
            "move the image under the root or point the root higher",
        ),
        "missing.png": (
            f"image file not found: {os.path.join(root, 'missing.png')}",
            f"check that image_root ({root}) is the folder the paths are relative to "
            "and that the images are downloaded",
        ),
    }
    for relative, (reason, hint) in cases.items():
        with pytest.raises(DataValidationError) as info:
            resolve_image_path(root, relative, **where)
        err = info.value
        assert (err.path, err.index, err.field, err.hint) == ("edits.json", 3, "m_loc", hint), relative
        if reason is None:  # the OS's own words vary: only the start is ours
            assert err.reason.startswith("invalid image path 'a\\x00b.png' (") and err.__cause__ is not None
            reason = err.reason
        assert err.reason == reason
        assert str(err) == f"edits.json, record 3, field 'm_loc': {reason} ({hint})"


def test_unreadable_image_error_names_the_file_the_record_and_the_fix(tmp_path):
    from odedit_hf.data import DataValidationError
    from odedit_hf.data.images import load_rgb_image

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataValidationError) as info:
        load_rgb_image(str(bad), source="edits.json", index=2, field="image")
    err = info.value
    assert (err.path, err.index, err.field) == ("edits.json", 2, "image")
    assert err.hint == "replace or re-download the file, or drop the record"
    assert err.reason.startswith(f"cannot read image {bad}: ")
    assert str(err).startswith(f"edits.json, record 2, field 'image': cannot read image {bad}: ")
    assert str(err).endswith(" (replace or re-download the file, or drop the record)")


# ---------------------------------------------------------------------------------------------
# mutation survivors of data/loader.py (issue 20): messages pinned whole, bounds, attributes kept


#: the hint of every probe-field error of the loader
PROBE_HINT = "see load_mmedit's docstring for the optional probe fields"


def _error(world, records, **kwargs) -> DataValidationError:
    with pytest.raises(DataValidationError) as info:
        _load(world, records, **kwargs)
    return info.value


def test_indexing_errors_say_what_and_the_bounds(world):
    ds = _load(world, [_record(i) for i in range(3)])
    with pytest.raises(TypeError) as info:
        ds["0"]
    assert (
        str(info.value)
        == "MMEditDataset indices must be integers, got str; use .select(indices) for a subset"
    )
    for bad in (3, -4):
        with pytest.raises(IndexError) as info:
            ds[bad]
        assert str(info.value) == f"MMEditDataset index {bad} out of range for 3 records"
    assert ds[2].case_id == 2 and ds[-3].case_id == 0 and ds[-1].case_id == 2
    with pytest.raises(IndexError) as info:
        ds.select([0, 3, -1, 2, 5])
    assert str(info.value) == "MMEditDataset.select: indices [3, -1, 5] out of range for 3 records"
    assert [r.case_id for r in ds.select([2])] == [2] and len(ds.select([])) == 0


def test_select_keeps_the_roots_and_the_skip_record(world):
    records = [_record(0), {**_record(1), "alt": ""}, _record(2)]
    ds = _load(world, records, skip_invalid=True)
    sub = ds.select([1])
    assert sub.image_root == ds.image_root == os.path.realpath(world["root"])
    assert sub.rephrase_image_root == ds.rephrase_image_root == os.path.realpath(world["reph"])
    assert (
        sub.skipped == ds.skipped == 1 and sub.skip_reasons == ds.skip_reasons and len(sub.skip_reasons) == 1
    )
    assert sub[0].case_id == 2 and sub[0].image == ds[1].image


def test_requests_of_a_probe_file_hold_tuples(world):
    ds = _load(world, [_probe_record(0), _record(1)])
    for req in ds:
        assert type(req.portability) is tuple and type(req.rephrases) is tuple
        assert type(req.image_rephrases) is tuple


def test_text_field_errors_are_pinned(world):
    bad_type = {**_record(0), "rephrases": ["fine", 7]}
    exc = _error(world, [bad_type])
    assert (exc.reason, exc.field, exc.index, exc.hint) == (
        "expected a string, got a JSON int (7)",
        "rephrases[1]",
        0,
        PROBE_HINT,
    )
    empty = {**_record(0), "hard_loc": " ", "hard_loc_ans": "a"}
    exc = _error(world, [empty])
    assert (exc.reason, exc.field, exc.hint) == ("empty value ' '", "hard_loc", PROBE_HINT)
    not_list = {**_record(0), "rephrases": "one"}
    exc = _error(world, [not_list])
    assert (exc.reason, exc.field, exc.hint) == (
        "expected a list of strings, got a JSON str",
        "rephrases",
        PROBE_HINT,
    )
    not_list = {**_record(0), "image_rephrases": {"a": 1}}
    exc = _error(world, [not_list])
    assert (exc.reason, exc.field) == ("expected a list of strings, got a JSON dict", "image_rephrases")
    # an empty list is no probe at all
    assert _load(world, [{**_record(0), "rephrases": []}])[0].rephrases == ()


def test_hard_groups_come_together(world):
    exc = _error(world, [{**_record(0), "hard_m_loc_q": "How many?"}])
    assert (
        exc.reason
        == "hard_m_loc, hard_m_loc_q, hard_m_loc_a come together; missing ['hard_m_loc', 'hard_m_loc_a']"
    )
    assert (exc.field, exc.hint) == ("hard_m_loc", "give the whole group or none of it")
    exc = _error(world, [{**_record(0), "hard_loc_ans": "x"}])
    assert (
        exc.reason == "hard_loc, hard_loc_ans come together; missing ['hard_loc']" and exc.field == "hard_loc"
    )
    req = _load(world, [{**_record(0), "hard_loc": "Who wrote book 9?", "hard_loc_ans": "author9"}])[0]
    assert (req.hard_loc, req.hard_loc_ans, req.hard_m_loc) == ("Who wrote book 9?", "author9", None)


def test_portability_layouts_and_their_errors(world):
    # KnowEdit: a category holding one object (not a list) is one item of that kind
    one = {**_record(0), "portability": {"reasoning": {"prompt": ["p0", "alias"], "ground_truth": [["t0"]]}}}
    (probe,) = _load(world, [one])[0].portability
    assert (probe.kind, probe.prompt, probe.target, probe.image) == ("reasoning", "p0", "t0", None)
    # a plain list: kind "portability" unless the item names its own
    listed = {
        **_record(0),
        "portability": [
            {"prompt": "p1", "ground_truth": "t1"},
            {"prompt": "p2", "ground_truth": "t2", "kind": "k"},
        ],
    }
    first, second = _load(world, [listed])[0].portability
    assert (first.kind, first.prompt, second.kind, second.target) == ("portability", "p1", "k", "t2")
    exc = _error(world, [{**_record(0), "portability": "p"}])
    assert (exc.reason, exc.field, exc.hint) == (
        "expected an object or a list, got a JSON str",
        "portability",
        'KnowEdit layout: {"category": [{"prompt": ..., "ground_truth": ...}]}, or a list of items',
    )
    exc = _error(world, [{**_record(0), "port_new": {"Q&A": {}}}])
    assert (exc.reason, exc.field, exc.hint) == (
        "expected a list, got a JSON dict",
        "port_new",
        'VLKEB layout: [{"port_type": "1-hop", "Q&A": {"Question": ..., "Answer": ...}}]',
    )
    exc = _error(world, [{**_record(0), "portability": {"a": [{"prompt": "p", "ground_truth": "t"}, 3]}}])
    assert (exc.reason, exc.field, exc.hint) == (
        "portability item is a JSON int, not an object",
        "portability.a[1]",
        PROBE_HINT,
    )
    exc = _error(
        world, [{**_record(0), "port_new": [{"Q&A": {"Question": "q", "Answer": "a"}}, {"Q&A": "x"}]}]
    )
    assert (exc.reason, exc.field, exc.hint) == ("'Q&A' must be an object", "port_new[1]", PROBE_HINT)
    exc = _error(world, [{**_record(0), "portability": [{"prompt": "p", "ground_truth": ""}]}])
    assert (exc.reason, exc.field) == ("empty value ''", "portability[0].ground_truth")
    exc = _error(world, [{**_record(0), "portability": [{"prompt": None, "ground_truth": "t"}]}])
    assert (exc.reason, exc.field) == (
        "expected a string, got a JSON NoneType (None)",
        "portability[0].prompt",
    )
    exc = _error(world, [{**_record(0), "portability": [{"prompt": "p", "ground_truth": "t", "image": 5}]}])
    assert exc.field == "portability[0].image"
    # VLKEB: asked on the edit image, its kind from port_type; both layouts in one record, in file order
    both = {
        **_record(0),
        "portability": [{"prompt": "p", "ground_truth": "t"}],
        "port_new": [
            {"port_type": "1-hop", "Q&A": {"Question": "q", "Answer": "a"}},
            {"Q&A": {"Question": "q2", "Answer": "a2"}},
        ],
    }
    req = _load(world, [both])[0]
    assert [(p.kind, p.prompt, p.target) for p in req.portability] == [
        ("portability", "p", "t"),
        ("1-hop", "q", "a"),
        ("portability", "q2", "a2"),
    ]
    assert req.portability[1].image == req.image and req.portability[0].image is None


@pytest.mark.parametrize(
    ("questions", "expected"),
    [(5, "vqa"), (4, "vqa"), (1, "caption"), (0, "caption"), (3, None), (2, None)],
)
def test_task_inference_thresholds(world, questions, expected, caplog):
    records = [_record(i, question=i < questions) for i in range(5)]
    if expected is None:
        exc = _error(world, records, task="auto")
        share = questions / 5
        assert exc.reason == (
            f"task='auto' cannot tell VQA from captioning: {share:.0%} of the records' 'src' end with '?'"
        )
        assert (exc.field, exc.hint, exc.index) == ("src", "pass task='vqa' or task='caption'", None)
        assert exc.path == os.path.realpath(world["tmp"] / "edits.json")
        return
    with caplog.at_level(logging.INFO, logger="odedit_hf"):
        ds = _load(world, records, task="auto")
    assert ds.task == expected
    assert f"task={expected!r} inferred ({100 * questions / 5:.0f}% of 'src' end with '?')" in caplog.text


def test_task_inference_ignores_trailing_space_and_an_empty_file(world):
    records = [{**_record(i), "src": f"What colour is thing {i}?  "} for i in range(3)]
    assert _load(world, records, task="auto").task == "vqa"
    assert _load(world, [], task="auto").task == "vqa"


def test_default_image_root_prefers_the_folder_then_images(tmp_path):
    from odedit_hf.data.loader import IMAGES_SUBFOLDER, default_image_root

    assert IMAGES_SUBFOLDER == "images"
    source = str(tmp_path / "edits.json")
    records = [{"src": "x"}, "not a record", {"image": 3}, {"image": "a/1.png"}, {"image": "b/2.png"}]
    assert default_image_root(source, records) == str(tmp_path)  # found nowhere: the folder
    _png(tmp_path / "images" / "a" / "1.png", (1, 2, 3))
    assert default_image_root(source, records) == os.path.join(str(tmp_path), "images")
    _png(tmp_path / "a" / "1.png", (1, 2, 3))  # in the folder itself too: the folder wins
    assert default_image_root(source, records) == str(tmp_path)
    absolute = [{"image": str(tmp_path / "images" / "a" / "1.png")}]
    assert default_image_root(source, absolute) == str(tmp_path)
    assert default_image_root(source, []) == str(tmp_path)
    # only the first record with an image decides
    assert default_image_root(source, [{"image": "b/2.png"}, {"image": "a/1.png"}]) == str(tmp_path)


def test_extra_fields_collects_sorted_keys_or_rejects_them():
    from odedit_hf.data.loader import ExtraFields

    extra = ExtraFields("f.json", strict=False, known="MMEdit reads src, pred")
    extra.check(["zeta", "alpha"], {"path": "f.json", "index": 0})
    extra.check([], {"path": "f.json", "index": 1})
    extra.check(iter(["alpha"]), {"path": "f.json", "index": 2})
    assert extra.counts == {"alpha": 2, "zeta": 1}
    strict = ExtraFields("f.json", strict=True, known="MMEdit reads src, pred")
    strict.check([], {"path": "f.json", "index": 0})  # nothing unknown: no error
    with pytest.raises(DataValidationError) as info:
        strict.check(["zeta", "alpha"], {"path": "f.json", "index": 3})
    exc = info.value
    assert (exc.reason, exc.field, exc.index, exc.path) == (
        "unknown fields ['alpha', 'zeta']",
        "alpha",
        3,
        "f.json",
    )
    assert exc.hint == (
        "MMEdit reads src, pred; rename or drop the others, or load without strict_fields "
        "(--strict-fields) to ignore them with a warning"
    )
    assert strict.counts == {}


def test_extra_fields_warning_is_one_line_naming_each_key(caplog):
    from odedit_hf.data.loader import ExtraFields

    extra = ExtraFields("f.json", strict=False, known="k")
    with caplog.at_level(logging.WARNING, logger="odedit_hf"):
        extra.warn()  # nothing collected: silent
        assert caplog.records == []
        extra.check(["b", "a"], {"path": "f.json", "index": 0})
        extra.check(["a"], {"path": "f.json", "index": 1})
        extra.warn()
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "f.json: ignoring 2 field(s) odedit-hf does not read: 'a' (2 records), 'b' (1 record) "
        "(strict_fields=True / --strict-fields makes them an error)"
    )


def test_skipped_records_warning_is_pinned(caplog):
    from odedit_hf.data.loader import log_skipped

    with caplog.at_level(logging.WARNING, logger="odedit_hf"):
        log_skipped("f.json", [], 3)
        assert caplog.records == []
        log_skipped("f.json", ["first reason", "second"], 3)
    (record,) = caplog.records
    assert record.getMessage() == (
        "f.json: skipped 2 invalid record(s), kept 3; first: first reason (all in dataset.skip_reasons)"
    )


def test_probe_errors_carry_the_probe_hint_and_the_root_name(world):
    for item in ({"prompt": 1, "ground_truth": "t"}, {"prompt": "p", "ground_truth": " "}):
        exc = _error(world, [{**_record(0), "portability": [item]}])
        assert exc.hint == PROBE_HINT, exc
    exc = _error(world, [{**_record(0), "portability": [{"prompt": "p", "ground_truth": "t", "image": ""}]}])
    assert (exc.reason, exc.hint) == ("empty value ''", PROBE_HINT)
    hard = {**_record(0), "hard_m_loc": "/abs/x.png", "hard_m_loc_q": "q", "hard_m_loc_a": "a"}
    exc = _error(world, [hard])
    assert exc.field == "hard_m_loc" and "relative to image_root" in exc.reason, exc
    reph = {**_record(0), "image_rephrases": ["/abs/y.png"]}
    exc = _error(world, [reph])
    assert exc.field == "image_rephrases[0]" and "relative to rephrase_image_root" in exc.reason, exc


def test_dataset_defaults_and_log_lines_name_the_file(world, caplog):
    import datasets

    ds = MMEditDataset(
        datasets.Dataset.from_dict({"x": [1]}),
        path="p",
        task="vqa",
        image_root=None,
        rephrase_image_root=None,
    )
    assert (ds.skipped, ds.skip_reasons) == (0, [])
    assert repr(ds) == "MMEditDataset(path='p', task='vqa', num_records=1, skipped=0)"
    with pytest.raises(ValueError) as info:
        MMEditDataset(ds.hf_dataset, path="p", task="qa", image_root=None, rephrase_image_root=None)
    assert str(info.value) == "MMEditDataset: task must be one of ('vqa', 'caption'), got 'qa'"
    source = os.path.realpath(world["tmp"] / "edits.json")
    with caplog.at_level(logging.INFO, logger="odedit_hf"):
        _load(world, [_record(0)], task="auto")
    assert f"{source}: task='vqa' inferred (100% of 'src' end with '?')" in caplog.messages


def test_default_image_root_logs_where_it_found_the_images(tmp_path, caplog):
    from odedit_hf.data.loader import default_image_root

    _png(tmp_path / "images" / "a.png", (1, 2, 3))
    source = str(tmp_path / "edits.json")
    with caplog.at_level(logging.INFO, logger="odedit_hf"):
        default_image_root(source, [{"image": "a.png"}])
    assert caplog.messages == [f"{source}: no image root given; images found under {tmp_path / 'images'}"]


def test_a_subject_column_only_when_a_record_has_one(world):
    with_subject = _load(world, [{**_record(0), "subject": "thing 0"}, _record(1)])
    assert "subject" in with_subject.hf_dataset.column_names
    assert with_subject[0].subject == "thing 0" and with_subject[1].subject is None
    assert "subject" not in _load(world, [_record(0)]).hf_dataset.column_names


# ---------------------------------------------------------------------------------------------
# mutation survivors of data/loader.py, full run (issue 20, session 12): the text-only branch of
# load_mmedit, the file-level messages, the argument checks, the default root, the fixed schema


def _mend(i: int) -> dict:
    """A text-only MMEdit record (EasyEdit's ZsRE file in MEND's layout), with its two ignored keys."""
    return {
        "src": f"What is the capital of X{i}?",
        "pred": f"A{i}",
        "alt": f"B{i}",
        "answers": [f"A{i}"],
        "rephrase": f"Which city is the capital of X{i}?",
        "loc": f"nq question: who sang y{i}",
        "loc_ans": f"Z{i}",
        "cond": f"A{i} >> B{i} || X{i}",
    }


def _hint_missing(text_only: bool) -> str:
    from odedit_hf.data.loader import _OPTIONAL_KEYS
    from odedit_hf.data.schema import MULTIMODAL_FIELDS

    hint = f"MMEdit records have the fields {list(MMEDIT_FIELDS)} and optionally {list(_OPTIONAL_KEYS)}"
    return hint if text_only else hint + f"; a text-only record leaves out all of {list(MULTIMODAL_FIELDS)}"


def test_text_only_records_load_through_load_mmedit(world):
    for strict in (False, True):  # answers / cond are known keys of a text-only record
        ds = _load(world, [_mend(0), _mend(1)], task="auto", strict_fields=strict)
        assert ds.task == "caption" and len(ds) == 2
        r = ds[1]
        assert r.text_only and (r.src, r.pred, r.alt) == ("What is the capital of X1?", "A1", "B1")
        assert (r.rephrase, r.loc, r.loc_ans) == (
            "Which city is the capital of X1?",
            "nq question: who sang y1",
            "Z1",
        )
        assert r.image is r.image_rephrase is r.m_loc is r.m_loc_q is r.m_loc_a is None
        assert ds.hf_dataset[0]["image"] is None and ds.hf_dataset[0]["m_loc_a"] is None
    # an explicit task is kept
    assert _load(world, [_mend(0)], task="vqa").task == "vqa"
    # a mixed file is not all text-only: the rule on 'src' decides (both end with '?': VQA)
    assert _load(world, [_mend(0), _record(1)], task="auto").task == "vqa"


def test_missing_fields_hint_says_whether_text_only_records_exist(world):
    exc = _error(world, [{k: v for k, v in _record(0).items() if k != "m_loc_a"}])
    assert (exc.reason, exc.field, exc.index, exc.hint) == (
        "missing fields ['m_loc_a']",
        "m_loc_a",
        0,
        _hint_missing(text_only=False),
    )
    exc = _error(world, [{k: v for k, v in _mend(0).items() if k != "loc_ans"}])
    assert (exc.reason, exc.field, exc.hint) == ("missing fields ['loc_ans']", "loc_ans", _hint_missing(True))


def test_strict_fields_rejects_unknown_keys_and_the_default_warns(world, caplog):
    from odedit_hf.data.loader import _OPTIONAL_KEYS

    known = f"MMEdit records have the fields {list(MMEDIT_FIELDS)} and optionally {list(_OPTIONAL_KEYS)}"
    tail = "; rename or drop the others, or load without strict_fields (--strict-fields) to ignore them with a warning"
    # the ZsRE keys are ignored only in a text-only record; other keys are unknown in both kinds
    cases = [
        ({**_record(0), "answers": ["x"]}, "answers"),
        ({**_record(0), "case_id": 7}, "case_id"),
        ({**_mend(0), "textual_rephrase": "t"}, "textual_rephrase"),
    ]
    for record, key in cases:
        exc = _error(world, [_record(1), record], strict_fields=True)
        assert (exc.reason, exc.field, exc.index, exc.hint) == (
            f"unknown fields [{key!r}]",
            key,
            1,
            known + tail,
        )
        assert exc.path == os.path.realpath(world["tmp"] / "edits.json")
    # the probe keys and 'subject' are known
    probe = {
        **_probe_record(0),
        "subject": "thing 0",
        "port_new": [{"Q&A": {"Question": "q", "Answer": "a"}}],
    }
    assert len(_load(world, [probe], strict_fields=True)) == 1
    # by default (not strict) the same records load, with one warning naming the file
    source = os.path.realpath(world["tmp"] / "edits.json")
    with caplog.at_level(logging.WARNING, logger="odedit_hf"):
        ds = _load(world, [record for record, _ in cases])
    assert len(ds) == 3
    assert caplog.messages == [
        f"{source}: ignoring 3 field(s) odedit-hf does not read: 'answers' (1 record), 'case_id' (1 record), "
        "'textual_rephrase' (1 record) (strict_fields=True / --strict-fields makes them an error)"
    ]


def test_validate_record_defaults_to_strict_and_needs_a_root_for_images(world):
    from odedit_hf.data.loader import _validate_record

    root = os.path.realpath(world["root"])
    kwargs = {"index": 4, "source": "f.json", "image_root": root, "rephrase_image_root": root}
    with pytest.raises(DataValidationError) as info:
        _validate_record({**_mend(0), "zeta": 1}, **kwargs)
    assert (info.value.reason, info.value.field, info.value.index, info.value.path, info.value.hint) == (
        "unknown fields ['zeta']",
        "zeta",
        4,
        "f.json",
        f"MMEdit records have the fields {list(MMEDIT_FIELDS)}; rename or drop the others, or load without "
        "strict_fields (--strict-fields) to ignore them with a warning",
    )
    with pytest.raises(DataValidationError) as info:
        _validate_record(_record(0), **{**kwargs, "image_root": None})
    assert str(info.value) == (
        "f.json, record 4: the record has images but no image root was given "
        "(pass image_root (--image-root), the folder the image paths are relative to)"
    )
    row = _validate_record(_mend(0), **{**kwargs, "image_root": None, "rephrase_image_root": None})
    assert row["image"] is None and row["case_id"] == 4 and row["loc_ans"] == "Z0"


def test_record_field_errors_are_pinned_whole(world):
    exc = _error(world, [_record(0), [1, 2]])
    assert (exc.reason, exc.index, exc.hint) == (
        "record is a JSON list, not an object",
        1,
        f"each record must be an object with the fields {list(MMEDIT_FIELDS)}",
    )
    exc = _error(world, [{**_record(0), "alt": 3}])
    assert (exc.reason, exc.field, exc.hint) == (
        "expected a string, got a JSON int (3)",
        "alt",
        "every MMEdit field is a string",
    )
    exc = _error(world, [{**_record(0), "loc": "  "}])
    assert (exc.reason, exc.field, exc.hint) == (
        "empty value '  '",
        "loc",
        "fill the field or drop the record",
    )
    # 'subject' is checked like the eleven
    exc = _error(world, [{**_record(0), "subject": 5}])
    assert (exc.reason, exc.field) == ("expected a string, got a JSON int (5)", "subject")
    exc = _error(world, [{**_record(0), "subject": ""}])
    assert (exc.reason, exc.field) == ("empty value ''", "subject")


def test_image_errors_name_the_root_each_path_is_relative_to(world):
    exc = _error(world, [{**_record(0), "image_rephrase": "/abs/r.png"}])
    assert exc.field == "image_rephrase" and exc.reason.endswith("relative to rephrase_image_root"), exc
    exc = _error(world, [{**_record(0), "image": "/abs/i.png"}])
    assert exc.field == "image" and exc.reason.endswith("relative to image_root"), exc
    item = {"prompt": "p", "ground_truth": "t", "image": "/abs/p.png"}
    exc = _error(world, [{**_record(0), "portability": [item]}])
    assert exc.field == "portability[0]" and exc.reason.endswith("relative to image_root"), exc
    # the Q&A error names the record too
    exc = _error(world, [_record(0), {**_record(1), "port_new": [{"Q&A": "x"}]}])
    assert (exc.index, exc.path) == (1, os.path.realpath(world["tmp"] / "edits.json"))


def test_bad_root_error_names_the_root_and_the_fix(world):
    p = world["write"]([_record(0)])
    missing = world["tmp"] / "no_such_dir"
    for args, name in (((missing,), "image_root"), ((world["root"], missing), "rephrase_image_root")):
        with pytest.raises(DataValidationError) as info:
            load_mmedit(p, *args)
        exc = info.value
        assert (exc.reason, exc.path, exc.hint) == (
            f"{name} is not a directory: {os.path.realpath(missing)}",
            str(missing),
            f"pass as {name} the folder the record's image paths are relative to",
        )


def test_file_level_errors_are_pinned_whole(world):
    from odedit_hf.data import load_edits

    p = world["tmp"] / "bad.json"
    p.write_text("[{", encoding="utf-8")
    with pytest.raises(DataValidationError) as info:
        load_mmedit(p, world["root"])
    assert (info.value.path, info.value.hint) == (
        str(p),
        "an MMEdit file is one JSON list of records (not JSON Lines)",
    )
    p.write_text('{"src": "a"}', encoding="utf-8")
    with pytest.raises(DataValidationError) as info:
        load_mmedit(p, world["root"])
    assert (info.value.reason, info.value.hint) == (
        "top level is a JSON dict, expected a list of records",
        "an MMEdit file is one JSON list of record objects",
    )
    p.write_bytes('[{"src": "caf\xe9"}]'.encode("latin-1"))
    with pytest.raises(DataValidationError) as info:
        load_mmedit(p, world["root"])
    exc = info.value
    assert exc.reason.startswith("not UTF-8 text: 'utf-8' codec can't decode byte 0xe9"), exc
    assert (exc.path, exc.hint) == (str(p), "re-save the file as UTF-8 JSON")
    with pytest.raises(FileNotFoundError) as info:
        load_edits(world["tmp"] / "nope.json")
    assert str(info.value) == f"MMEdit file not found: {world['tmp'] / 'nope.json'}"


def test_a_utf8_file_loads_whatever_the_locale(world):
    """The file is read as UTF-8, not in the locale's encoding (ASCII here, cp1252 on many Windows hosts)."""
    import odedit_hf

    record = {**_record(0), "alt": "bleu clair \u00e9t\u00e9", "loc_ans": "\u00c9mile Zola"}
    p = world["tmp"] / "edits.json"
    p.write_text(json.dumps([record], ensure_ascii=False), encoding="utf-8")  # raw UTF-8, not \u escapes
    assert b"\xc3\xa9" in p.read_bytes()
    # here, in this process's locale (UTF-8, most likely)
    assert load_mmedit(p, world["root"], world["reph"])[0].alt == record["alt"]
    code = (
        "import sys; from odedit_hf.data import load_mmedit; "
        "r = load_mmedit(sys.argv[1], sys.argv[2], sys.argv[3])[0]; print(ascii([r.alt, r.loc_ans]))"
    )
    package_parent = os.path.dirname(os.path.dirname(odedit_hf.__file__))
    env = {
        **os.environ,
        "LC_ALL": "C",
        "LANG": "C",
        "PYTHONCOERCECLOCALE": "0",
        "PYTHONUTF8": "0",
        "PYTHONPATH": os.pathsep.join([package_parent, os.environ.get("PYTHONPATH", "")]),
    }
    probe = subprocess.run(
        [sys.executable, "-c", "import locale; print(locale.getpreferredencoding(False))"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip().lower() not in ("utf-8", "utf8"), probe.stdout  # the check means something
    out = subprocess.run(
        [sys.executable, "-c", code, str(p), str(world["root"]), str(world["reph"])],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ascii(["bleu clair \u00e9t\u00e9", "\u00c9mile Zola"])


def test_bool_and_limit_argument_messages(world):
    p = world["write"]([_record(0), _record(1)])
    for name in ("skip_invalid", "strict_fields"):
        with pytest.raises(ValueError) as info:
            load_mmedit(p, world["root"], **{name: 1})
        assert str(info.value) == f"load_mmedit: {name} must be a bool, got 1"
    with pytest.raises(ValueError) as info:
        load_mmedit(p, world["root"], task="qa")
    assert str(info.value) == "load_mmedit: task must be 'auto', 'vqa' or 'caption', got 'qa'"
    assert [r.case_id for r in load_mmedit(p, world["root"], world["reph"], limit=1)] == [0]


def test_default_root_is_used_when_none_is_given(tmp_path):
    """load_mmedit without image_root: the file's folder, or its images/ subfolder (both sorts of file)."""
    rec = {**_record(0), "image_rephrase": "img/0.png"}
    for folder in (tmp_path / "flat", tmp_path / "nested"):
        root = folder if folder.name == "flat" else folder / "images"
        _png(root / "img" / "0.png", (1, 2, 3))
        _png(root / "img" / "loc0.png", (3, 2, 1))
        p = folder / "edits.json"
        p.write_text(json.dumps([rec]), encoding="utf-8")
        ds = load_mmedit(p)
        assert ds.image_root == ds.rephrase_image_root == os.path.realpath(root)
        assert ds[0].image == os.path.realpath(root / "img" / "0.png")


def test_skip_warning_from_load_mmedit_names_the_file(world, caplog):
    source = os.path.realpath(world["tmp"] / "edits.json")
    with caplog.at_level(logging.WARNING, logger="odedit_hf"):
        ds = _load(world, [_record(0), {**_record(1), "alt": ""}], skip_invalid=True)
    assert caplog.messages == [
        f"{source}: skipped 1 invalid record(s), kept 1; first: {ds.skip_reasons[0]} (all in dataset.skip_reasons)"
    ]


def test_select_error_lists_the_first_ten_bad_indices(world):
    ds = _load(world, [_record(0)])
    with pytest.raises(IndexError) as info:
        ds.select(range(12))
    assert str(info.value) == (
        "MMEditDataset.select: indices [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] out of range for 1 records"
    )


def test_hf_dataset_keeps_its_schema_and_empty_probe_lists(world):
    import datasets

    string = datasets.Value("string")
    empty = _load(world, [])
    assert empty.hf_dataset.features == datasets.Features(
        {"case_id": datasets.Value("int64"), "task": string, **{n: string for n in MMEDIT_FIELDS}}
    )
    ds = _load(world, [_probe_record(0), _record(1)])
    row = ds.hf_dataset[1]  # the record without probes: empty lists, None strings
    assert (row["portability"], row["rephrases"], row["image_rephrases"]) == ([], [], [])
    assert row["hard_loc"] is None and row["hard_m_loc"] is None
    portability = [{"kind": string, "prompt": string, "target": string, "image": string}]
    assert ds.hf_dataset.features["portability"] == datasets.Features({"p": portability})["p"]

"""Text-only records: ZsRE and CounterFact loaders (good and bad files), text-only EditRequest and scores,
extra MMEdit keys (warn once / --strict-fields), the default image root next to the file."""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
from PIL import Image

from odedit_hf.data import (
    MULTIMODAL_SCORE_FIELDS,
    DataValidationError,
    EditRequest,
    EditScores,
    load_edits,
    load_mmedit,
    load_text_edits,
)


def _zsre(i: int) -> dict:
    return {
        "case_id": 100 + i,  # EasyEdit's files carry one; ignored silently
        "prompt": f"The capital of country{i} is",
        "target_new": f"town{i}",
        "ground_truth": [f"city{i}", f"alias{i}"],  # KnowEdit-style aliases: the first is used
        "rephrase_prompt": f"The capital city of country{i} is",
        "locality_prompt": f"The currency of land{i} is the",
        "locality_ground_truth": f"coin{i}",
        "subject": f"country{i}",
    }


def _counterfact(i: int) -> dict:
    return {
        "case_id": i,
        "pararel_idx": 7,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "relation_id": "P103",
            "target_new": {"str": f"English{i}", "id": "Q1860"},
            "target_true": {"str": f"French{i}", "id": "Q150"},
            "subject": f"Person {i}",
        },
        "paraphrase_prompts": [f"Person {i} spoke the language", "Another paraphrase"],
        "neighborhood_prompts": [f"The native language of Neighbour {i} is", "x"],
        "attribute_prompts": ["a"],
        "generation_prompts": ["b"],
    }


def _write(tmp_path, records, name="edits.json"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / name
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# ------------------------------------------------------------------------------------ good files
def test_zsre_file_loads_as_text_only_requests(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="odedit_hf.data"):
        ds = load_text_edits(_write(tmp_path, [_zsre(0), _zsre(1)]))
    assert _warnings(caplog) == []  # case_id is a known EasyEdit key: no warning
    assert len(ds) == 2 and ds.task == "caption" and ds.image_root is None
    r = ds[1]
    assert r.text_only and r.case_id == 1 and r.source == str(tmp_path / "edits.json")
    assert (r.src, r.alt, r.pred) == ("The capital of country1 is", "town1", "city1")
    assert (r.rephrase, r.loc, r.loc_ans, r.subject) == (
        "The capital city of country1 is",
        "The currency of land1 is the",
        "coin1",
        "country1",
    )
    assert r.image is r.image_rephrase is r.m_loc is r.m_loc_q is r.m_loc_a is None
    with pytest.raises(ValueError, match="has no 'image' image"):
        r.load_image()
    assert load_text_edits(_write(tmp_path, [_zsre(0)]), task="vqa")[0].task == "vqa"


def test_counterfact_file_loads_nested_layout(tmp_path):
    records = [_counterfact(0), _counterfact(1)]
    records[1]["neighborhood_prompts"] = [{"prompt": "Neighbour speaks", "target": "Dutch"}]
    ds = load_text_edits(_write(tmp_path, records))  # layout detected
    a, b = list(ds)
    assert a.src == "The mother tongue of Person 0 is" and a.subject == "Person 0"
    assert (a.alt, a.pred, a.rephrase) == ("English0", "French0", "Person 0 spoke the language")
    assert (a.loc, a.loc_ans) == ("The native language of Neighbour 0 is", "French0")  # the true target
    assert (b.loc, b.loc_ans) == ("Neighbour speaks", "Dutch")  # an object neighbour has its own target
    assert all(r.text_only for r in ds)


def test_load_edits_picks_the_layout(tmp_path):
    assert load_edits(_write(tmp_path, [_zsre(0)], "z.json"))[0].alt == "town0"
    assert load_edits(_write(tmp_path, [_counterfact(0)], "c.json"))[0].alt == "English0"
    # EasyEdit's ZsRE file in MEND's layout: the MMEdit names without images ("answers", "cond" ignored)
    mend = {
        "subject": "X",
        "src": "What is X's capital?",
        "pred": "A",
        "alt": "B",
        "answers": ["A"],
        "rephrase": "Which city is X's capital?",
        "loc": "nq question: who sang y",
        "loc_ans": "Z",
        "cond": "A >> B || X",
    }
    ds = load_edits(_write(tmp_path, [mend], "m.json"))
    assert ds[0].text_only and ds[0].subject == "X" and ds.task == "caption"  # text-only: prompts as they are
    with pytest.raises(ValueError, match="text only, no images"):
        load_edits(_write(tmp_path, [_zsre(0)], "z2.json"), image_root=tmp_path)
    with pytest.raises(DataValidationError, match="load_mmedit"):
        load_text_edits(_write(tmp_path, [mend], "m2.json"))


# ------------------------------------------------------------------------------------ bad files
def _cf_set(path: str, value):
    def mutate(rec):
        *parents, last = path.split(".")
        node = rec
        for p in parents:
            node = node[p]
        if value is _DROP:
            del node[last]
        else:
            node[last] = value

    return mutate


_DROP = object()

BAD_COUNTERFACT = {
    "no rewrite": (_cf_set("requested_rewrite", _DROP), "requested_rewrite", "missing fields"),
    "rewrite not an object": (_cf_set("requested_rewrite", "x"), "requested_rewrite", "expected an object"),
    "no target_new": (
        _cf_set("requested_rewrite.target_new", _DROP),
        "requested_rewrite.target_new",
        "missing fields",
    ),
    "target str missing": (
        _cf_set("requested_rewrite.target_true", {"id": "Q1"}),
        "requested_rewrite.target_true.str",
        "missing key 'str'",
    ),
    "target str not a string": (
        _cf_set("requested_rewrite.target_new", {"str": 3}),
        "requested_rewrite.target_new.str",
        "expected a string",
    ),
    "prompt without slot": (
        _cf_set("requested_rewrite.prompt", "The mother tongue is"),
        "requested_rewrite.prompt",
        "exactly one '{}'",
    ),
    "empty subject": (_cf_set("requested_rewrite.subject", " "), "requested_rewrite.subject", "empty value"),
    "no paraphrases": (_cf_set("paraphrase_prompts", []), "paraphrase_prompts", "non-empty list"),
    "neighbour not a string": (
        _cf_set("neighborhood_prompts", [5]),
        "neighborhood_prompts[0]",
        "expected a string",
    ),
    "neighbour object without target": (
        _cf_set("neighborhood_prompts", [{"prompt": "p"}]),
        "neighborhood_prompts[0].target",
        "missing fields",
    ),
}


@pytest.mark.parametrize("case", list(BAD_COUNTERFACT))
def test_bad_counterfact_record_names_file_index_and_field(tmp_path, case):
    mutate, field, reason = BAD_COUNTERFACT[case]
    records = [_counterfact(i) for i in range(3)]
    mutate(records[2])
    with pytest.raises(DataValidationError) as info:
        load_text_edits(_write(tmp_path, records), layout="counterfact")
    exc = info.value
    assert (exc.index, exc.field) == (2, field), str(exc)
    assert reason in str(exc) and "edits.json, record 2" in str(exc) and repr(field) in str(exc)
    assert exc.hint and "requested_rewrite" in exc.hint  # says what a record looks like


BAD_ZSRE = {
    "missing": ("locality_ground_truth", _DROP, "missing fields"),
    "not a string": ("target_new", 3, "expected a string"),
    "empty": ("prompt", "", "empty value"),
    "empty alias list": ("ground_truth", [], "empty list"),
    "subject null": ("subject", None, "expected a string"),
}


@pytest.mark.parametrize("case", list(BAD_ZSRE))
def test_bad_zsre_record_names_file_index_and_field(tmp_path, case):
    field, value, reason = BAD_ZSRE[case]
    records = [_zsre(i) for i in range(3)]
    _cf_set(field, value)(records[1])
    with pytest.raises(DataValidationError) as info:
        load_text_edits(_write(tmp_path, records))
    assert (info.value.index, info.value.field) == (1, field)
    assert reason in str(info.value) and "record 1" in str(info.value)
    # skipping keeps the others, with the reason
    ds = load_text_edits(_write(tmp_path, records), skip_invalid=True)
    assert [r.case_id for r in ds] == [0, 2] and ds.skipped == 1 and "record 1" in ds.skip_reasons[0]


def test_whole_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_text_edits(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"prompt": "a"}')
    with pytest.raises(DataValidationError, match="expected a list of records"):
        load_text_edits(bad)
    with pytest.raises(ValueError, match="layout must be"):
        load_text_edits(_write(tmp_path, [_zsre(0)]), layout="knowedit")
    with pytest.raises(DataValidationError, match="not an object"):
        load_text_edits(_write(tmp_path, [_zsre(0), "x"]))


# ------------------------------------------------------------------------------------ extra keys
def test_text_extra_keys_warn_once_or_fail_strict(tmp_path, caplog):
    records = [{**_zsre(i), "source": "wiki", "note": i} for i in range(3)]
    records[0]["only_here"] = 1
    path = _write(tmp_path, records)
    with caplog.at_level(logging.WARNING, logger="odedit_hf.data"):
        assert len(load_text_edits(path)) == 3
    (message,) = _warnings(caplog)
    assert "'note' (3 records)" in message and "'only_here' (1 record)" in message and "'source'" in message
    with pytest.raises(DataValidationError) as info:
        load_text_edits(path, strict_fields=True)
    assert info.value.index == 0 and info.value.field == "note" and "strict" in str(info.value)
    cf = _counterfact(0)
    cf["requested_rewrite"]["extra"] = 1
    with pytest.raises(DataValidationError) as info:
        load_text_edits(_write(tmp_path, [cf], "cf.json"), strict_fields=True)
    assert info.value.field == "requested_rewrite.extra"


def _png(path, color=(1, 2, 3)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path)


def _mmedit(i: int) -> dict:
    return {
        "src": f"What is thing {i}?",
        "pred": "a",
        "alt": "b",
        "image": f"{i}.png",
        "rephrase": f"Which thing is {i}?",
        "image_rephrase": f"{i}.png",
        "loc": "Who wrote it?",
        "loc_ans": "me",
        "m_loc": f"{i}.png",
        "m_loc_q": "How many?",
        "m_loc_a": "2",
    }


def test_mmedit_extra_keys_warn_and_load_strict_rejects(tmp_path, caplog):
    for i in range(3):
        _png(tmp_path / f"{i}.png")
    records = [{**_mmedit(i), "case_id": i, "source": "vqa", "textual_rephrase": "t"} for i in range(3)]
    path = _write(tmp_path, records)
    with caplog.at_level(logging.WARNING, logger="odedit_hf.data"):
        ds = load_mmedit(path, tmp_path)
    assert len(ds) == 3 and not ds[0].text_only  # not 0 records, as --skip-invalid kept before
    (message,) = _warnings(caplog)
    assert "ignoring 3 field(s)" in message
    assert all(f"'{k}' (3 records)" in message for k in ("case_id", "source", "textual_rephrase"))
    assert "--strict-fields" in message
    with pytest.raises(DataValidationError) as info:
        load_mmedit(path, tmp_path, strict_fields=True)
    assert (info.value.index, info.value.field) == (0, "case_id") and "unknown fields" in str(info.value)
    # strict + skip: every record is skipped with its reason
    skipped = load_mmedit(path, tmp_path, strict_fields=True, skip_invalid=True)
    assert len(skipped) == 0 and skipped.skipped == 3


def test_partial_image_fields_are_an_error(tmp_path):
    _png(tmp_path / "0.png")
    rec = _mmedit(0)
    del rec["m_loc"]
    with pytest.raises(DataValidationError) as info:
        load_mmedit(_write(tmp_path, [rec]), tmp_path)
    assert info.value.field == "m_loc" and "text-only record leaves out all of" in str(info.value)


def test_default_image_root_is_next_to_the_file(tmp_path):
    """The world's layout: data/evqa_eval.json with paths relative to data/images/; no image root given."""
    data = tmp_path / "data"
    for i in range(2):
        _png(data / "images" / f"{i}.png")
    path = _write(data, [_mmedit(0), _mmedit(1)], "evqa_eval.json")
    ds = load_mmedit(path)
    assert ds.image_root == str((data / "images").resolve())
    assert ds[1].image == str((data / "images" / "1.png").resolve()) and ds[1].load_image().size == (4, 4)
    assert load_edits(path)[0].image == ds[0].image
    # images beside the file: the file's folder
    _png(tmp_path / "flat" / "0.png")
    flat = load_mmedit(_write(tmp_path / "flat", [_mmedit(0)]))
    assert flat.image_root == str((tmp_path / "flat").resolve())
    # neither: the file's folder, and the error names it
    with pytest.raises(DataValidationError, match="image file not found") as info:
        load_mmedit(_write(tmp_path / "none", [_mmedit(5)]))
    assert info.value.field == "image"


# ------------------------------------------------------------------------------ request and scores
def _text_request(**overrides) -> EditRequest:
    fields = dict(
        case_id=0,
        task="caption",
        source="mem",
        src="The capital of France is",
        pred="Paris",
        alt="Rome",
        rephrase="France's capital is",
        loc="The sky is",
        loc_ans="blue",
    )
    return EditRequest(**{**fields, **overrides})


def test_edit_request_accepts_absent_image_fields():
    r = _text_request()
    assert r.text_only and r.image is None and r.subject is None
    with pytest.raises(DataValidationError) as info:
        _text_request(m_loc_q="q")  # a part of the multimodal group
    assert info.value.field == "image" and "come together" in str(info.value)
    with pytest.raises(DataValidationError, match="subject"):
        _text_request(subject=" ")
    with pytest.raises(TypeError):
        EditRequest(0, "caption", "mem", "a", "b", "c")  # keywords only


def _text_scores(v: float) -> EditScores:
    nan = math.nan
    return EditScores(
        reliability=v,
        reliability_em=v,
        t_generality=v,
        t_generality_em=v,
        m_generality=nan,
        m_generality_em=nan,
        t_locality=v,
        m_locality=nan,
        t_locality_easyedit=v,
        m_locality_easyedit=nan,
    )


def test_text_only_scores_have_no_multimodal_keys():
    s = _text_scores(0.5)
    d = s.to_dict()
    assert not set(MULTIMODAL_SCORE_FIELDS) & set(d) and d["reliability"] == 0.5 and not s.has_multimodal
    assert EditScores.from_dict(d) == s
    mean = EditScores.mean([s, _text_scores(1.0)])
    assert mean.to_dict() == {k: 0.75 for k in d}
    # mixed data: the multimodal scores are the mean over the edits that have images, counted
    mm = EditScores(**{**_text_scores(0.0).to_dict(), **dict.fromkeys(MULTIMODAL_SCORE_FIELDS, 0.2)})
    mixed = EditScores.mean([s, mm])
    assert mixed.m_generality == pytest.approx(0.2) and mixed.reliability == pytest.approx(0.25)
    assert EditScores.counts([s, mm])["m_locality"] == 1
    partial = copy.copy(mm)
    partial.m_locality = math.nan
    with pytest.raises(ValueError, match="'m_locality' is NaN in items \\[1\\]"):
        EditScores.mean([s, partial])
    with pytest.raises(ValueError, match=r"missing keys \['m_locality'\]"):
        EditScores.from_dict({k: v for k, v in mm.to_dict().items() if k != "m_locality"})

"""Property-based tests (hypothesis) of the MMEdit loader and the edit metrics.

Arbitrary inputs may only fail with the documented error types (``DataValidationError`` for data,
``ValueError`` for bad tensors), and the metrics keep their invariants: permuting the batch permutes
the scores, identical pre/post models give locality 1, scores lie in [0, 1], exact match means every
target token right.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from odedit_hf.data import DataValidationError, load_mmedit
from odedit_hf.data.schema import MMEDIT_FIELDS
from odedit_hf.evaluation.metrics import answer_agreement, easyedit_agreement, token_accuracy, topk_ids

# 60 examples per property in the suite; `make mutation` sets HYPOTHESIS_PROFILE=mutation for fewer. No
# example database (it would write .hypothesis/ into the working tree); a failure prints its example.
_EXAMPLES = 15 if os.environ.get("HYPOTHESIS_PROFILE") == "mutation" else 60
SETTINGS = settings(
    max_examples=_EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
IGNORE = -100


# ------------------------------------------------------------------------------- MMEdit loader
@pytest.fixture(scope="module")
def image_root(tmp_path_factory):  # noqa: ANN001, ANN201
    """A root with two real images (one in a subfolder), a sibling folder and a non-image file."""
    from odedit_hf.testing import tiny_image

    base = tmp_path_factory.mktemp("prop")
    root = base / "images"
    (root / "sub").mkdir(parents=True)
    tiny_image(0).save(root / "a.png")
    tiny_image(1).save(root / "sub" / "b.png")
    (root / "notes.txt").write_text("not an image")
    (base / "images_evil").mkdir()
    tiny_image(2).save(base / "images_evil" / "x.png")
    return str(root)


_IMAGE_PATHS = st.sampled_from(
    [
        "a.png",
        "sub/b.png",
        "./a.png",
        "sub/../a.png",
        "missing.png",
        "../images_evil/x.png",
        "../images/a.png",
        "/etc/hostname",
        "sub",
        "notes.txt",
        "a.png\x00",
        "",
        " ",
    ]
)
_JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=12)
)
_JSON = st.recursive(
    _JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def _record(draw):  # noqa: ANN001, ANN202
    """A record near the schema: each field present or not, a valid-looking value or anything JSON."""
    record = {}
    for name in MMEDIT_FIELDS:
        if draw(st.integers(0, 9)) == 0:
            continue  # field missing
        if name in ("image", "image_rephrase", "m_loc"):
            value = draw(st.one_of(_IMAGE_PATHS, _JSON))
        else:
            value = draw(st.one_of(st.text(min_size=1, max_size=20), st.text(max_size=3), _JSON))
        record[name] = value
    if draw(st.integers(0, 9)) == 0:
        record[draw(st.text(min_size=1, max_size=6))] = draw(_JSON)  # perhaps an unknown field
    return record


def _write(folder: str, payload: object | bytes) -> str:
    path = os.path.join(folder, "edits.json")
    with open(path, "wb") as f:
        f.write(payload if isinstance(payload, bytes) else json.dumps(payload).encode())
    return path


@SETTINGS
@given(records=st.lists(st.one_of(_record(), _JSON), max_size=5), task=st.sampled_from(["vqa", "caption"]))
def test_loader_accepts_or_raises_data_validation_error(image_root: str, records, task: str) -> None:  # noqa: ANN001
    with tempfile.TemporaryDirectory() as folder:
        path = _write(folder, records)
        try:
            dataset = load_mmedit(path, image_root, task=task)
        except DataValidationError as exc:
            assert exc.path is not None and str(exc)  # says where
        else:
            assert len(dataset) == len(records)
            for request in dataset:
                for field in ("image", "image_rephrase", "m_loc"):
                    value = getattr(request, field)
                    assert os.path.isfile(value)
                    assert os.path.commonpath([image_root, value]) == os.path.realpath(image_root)
        # skip_invalid never raises for bad records, and accounts for every record
        skipped = load_mmedit(path, image_root, task=task, skip_invalid=True)
        assert len(skipped) + skipped.skipped == len(records)
        assert len(skipped.skip_reasons) == skipped.skipped


@SETTINGS
@given(payload=st.one_of(_JSON, st.binary(max_size=40)))
def test_loader_on_arbitrary_files_raises_only_data_validation_error(image_root: str, payload) -> None:  # noqa: ANN001
    with tempfile.TemporaryDirectory() as folder:
        path = _write(folder, payload)
        try:
            dataset = load_mmedit(path, image_root, task="vqa", skip_invalid=True)
        except DataValidationError:
            return
        assert len(dataset) == 0  # nothing arbitrary is a valid record with real images
        assert isinstance(json.loads(open(path, "rb").read()), list)


# ------------------------------------------------------------------------------------- metrics
_FLOATS = st.floats(width=32, allow_nan=True, allow_infinity=True)


@st.composite
def _logits_labels(draw, *, nan: bool = True):  # noqa: ANN001, ANN202
    """``(logits (B, T, V), labels (B, T))`` with at least one labelled target per row after the shift;
    logits drawn from a small set (ties) or any float32 (inf, and NaN when ``nan``)."""
    b, t, v = draw(st.integers(1, 4)), draw(st.integers(2, 6)), draw(st.integers(1, 12))
    elements = (
        st.sampled_from([0.0, 1.0, -1.0, 2.5])
        if draw(st.booleans())
        else (_FLOATS if nan else st.floats(width=32, allow_nan=False))
    )
    logits = torch.from_numpy(draw(arrays(np.float32, (b, t, v), elements=elements)).copy())
    labels = torch.from_numpy(
        draw(arrays(np.int64, (b, t), elements=st.one_of(st.just(IGNORE), st.integers(0, v - 1)))).copy()
    )
    for row in range(b):
        if (labels[row, 1:] == IGNORE).all():
            labels[row, draw(st.integers(1, t - 1))] = draw(st.integers(0, v - 1))
    return logits, labels


@SETTINGS
@given(data=_logits_labels(), seed=st.integers(0, 2**16))
def test_token_accuracy_invariants(data, seed: int) -> None:  # noqa: ANN001
    logits, labels = data
    accuracy, exact = token_accuracy(logits, labels)
    assert accuracy.shape == exact.shape == (logits.shape[0],)
    assert bool(((accuracy >= 0) & (accuracy <= 1)).all())
    assert torch.equal(exact, (accuracy == 1).float())
    perm = torch.randperm(logits.shape[0], generator=torch.Generator().manual_seed(seed))
    p_accuracy, p_exact = token_accuracy(logits[perm], labels[perm])
    assert torch.equal(p_accuracy, accuracy[perm]) and torch.equal(p_exact, exact[perm])
    # logits that put the target on top everywhere score 1
    perfect = torch.zeros_like(logits)
    targets = labels[:, 1:].clamp(min=0)
    perfect[:, :-1].scatter_(-1, targets.unsqueeze(-1), 1.0)
    assert torch.equal(token_accuracy(perfect, labels)[0], torch.ones(logits.shape[0]))


@SETTINGS
@given(data=_logits_labels(), other=st.integers(0, 2**16), seed=st.integers(0, 2**16))
def test_locality_is_one_for_identical_models_and_follows_batch_permutation(
    data, other: int, seed: int
) -> None:  # noqa: ANN001
    logits, labels = data
    mask = torch.ones(labels.shape, dtype=torch.long)
    mask[:, 0] = torch.randint(0, 2, (labels.shape[0],), generator=torch.Generator().manual_seed(seed))
    ks = [k for k in (1, 10) if k <= logits.shape[-1]]
    # identical pre and post: full agreement in both modes, from logits or from precomputed ids
    ones = torch.ones(logits.shape[0])
    assert torch.equal(answer_agreement(logits, logits.clone(), labels), ones)
    assert torch.equal(answer_agreement(topk_ids(logits, 1), logits, labels), ones)
    for k in ks:
        assert torch.equal(easyedit_agreement(logits, logits.clone(), mask, k=k), ones)
        assert torch.equal(easyedit_agreement(topk_ids(logits, k), logits, mask, k=k), ones)
    # another post model: scores in [0, 1], and a batch permutation permutes them
    post = torch.randn(logits.shape, generator=torch.Generator().manual_seed(other))
    perm = torch.randperm(logits.shape[0], generator=torch.Generator().manual_seed(seed))
    scores = answer_agreement(logits, post, labels)
    assert bool(((scores >= 0) & (scores <= 1)).all())
    assert torch.equal(answer_agreement(logits[perm], post[perm], labels[perm]), scores[perm])
    for k in ks:
        scores = easyedit_agreement(logits, post, mask, k=k)
        assert bool(((scores >= 0) & (scores <= 1)).all())
        assert torch.equal(easyedit_agreement(logits[perm], post[perm], mask[perm], k=k), scores[perm])


@st.composite
def _shaped_inputs(draw):  # noqa: ANN001, ANN202
    """``(a, b, labels)``: float tensors and integer labels of consistent (B, T, V) / (B, T) shapes with
    zero-size dims allowed, or of arbitrary unrelated shapes."""
    if draw(st.booleans()):
        bsz, t = draw(st.integers(0, 3)), draw(st.integers(0, 4))
        v = draw(st.integers(0, 12))  # V = 0 included: found token_accuracy's IndexError once
        shapes = [(bsz, t, v), (bsz, t, v), (bsz, t)]
    else:
        dims = st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple)
        shapes = [draw(dims), draw(dims), draw(dims)]
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(shapes[0], generator=gen), torch.randn(shapes[1], generator=gen)
    labels = torch.from_numpy(draw(arrays(np.int64, shapes[2], elements=st.integers(-101, 12))).copy())
    return a, b, labels


@SETTINGS
@given(inputs=_shaped_inputs(), k=st.integers(-1, 12))
def test_metrics_on_arbitrary_shapes_raise_only_value_error(inputs, k: int) -> None:  # noqa: ANN001
    a, b, labels = inputs
    calls = [
        lambda: token_accuracy(a, labels),
        lambda: topk_ids(a, k),
        lambda: answer_agreement(a, b, labels),
        lambda: easyedit_agreement(a, b, labels, k=k),
        lambda: easyedit_agreement(labels, b, labels.clamp(0, 1), k=k),  # integer "pre": precomputed ids
    ]
    for call in calls:
        try:
            out = call()
        except ValueError:
            continue
        outs = out if isinstance(out, tuple) else (out,)
        assert all(isinstance(o, torch.Tensor) for o in outs)


def test_token_accuracy_on_an_empty_vocabulary() -> None:
    """Found by the property test: V = 0 raised IndexError instead of the documented ValueError."""
    with pytest.raises(ValueError):
        token_accuracy(torch.zeros(1, 2, 0), torch.tensor([[0, 1]]))

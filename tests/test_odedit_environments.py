"""ODEdit's environments from the world's extra records (issue 18, item 3): hard negatives in the OOD
environment, on the tiny random LLaVA (no world build)."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import odedit_hf  # noqa: F401  (registers the PEFT types)
from odedit_hf.editing.environments import build_edit_batch
from odedit_hf.editors.ftl import FTLMethod
from odedit_hf.methods.odedit import ODEditMethod
from odedit_hf.methods.odedit.objective import ODEditObjective
from odedit_hf.methods.odedit.risks import needed_groups

TEXTS = ["what color is the cube", "which colour has the cube", "what is the capital of france", "what"]
TEXTS += ["what animal is this", "what is the capital of italy", "red", "blue", "paris", "rome", "cat", "dog"]
HARD = {
    "hard_loc": "what is the capital of italy",
    "hard_loc_ans": "rome",
    "hard_m_loc_q": "what animal is this",
}
HARD["hard_m_loc_a"] = "dog"


@pytest.fixture(scope="module")
def requests(tmp_path_factory):  # noqa: ANN001, ANN201
    """Two requests with hard-negative probes, one without."""
    from odedit_hf.data import EditRequest
    from odedit_hf.testing import tiny_image

    root = tmp_path_factory.mktemp("hard-images")
    paths = []
    for i in range(5):
        paths.append(os.path.join(root, f"img{i}.png"))
        tiny_image(40 + i).save(paths[-1])
    common = {
        "task": "vqa",
        "source": "in-memory",
        "src": "what color is the cube",
        "pred": "red",
        "rephrase": "which colour has the cube",
        "loc": "what is the capital of france",
        "loc_ans": "paris",
        "m_loc": paths[3],
        "m_loc_q": "what animal is this",
        "m_loc_a": "cat",
    }
    out = [
        EditRequest(
            case_id=i,
            alt=alt,
            image=paths[i],
            image_rephrase=paths[i + 1],
            hard_m_loc=paths[4],
            **HARD,
            **common,
        )
        for i, alt in enumerate(["blue", "paris"])
    ]
    out.append(EditRequest(case_id=2, alt="cat", image=paths[2], image_rephrase=paths[0], **common))
    return out


@pytest.fixture(scope="module")
def backbone():  # noqa: ANN201
    from odedit_hf.testing import tiny_backbone

    return tiny_backbone("llava", texts=TEXTS)


def _plain(request):  # noqa: ANN001, ANN202
    fields = ("hard_loc", "hard_loc_ans", "hard_m_loc", "hard_m_loc_q", "hard_m_loc_a")
    return dataclasses.replace(request, **dict.fromkeys(fields))


def test_hard_groups_hold_rows_only_for_requests_that_carry_the_probes(backbone, requests) -> None:  # noqa: ANN001
    batch = build_edit_batch(backbone, requests, ("edit", "loc", "hard_loc", "hard_m_loc"))
    assert batch.owners["hard_loc"] == [0, 1] == batch.owners["hard_m_loc"]
    assert batch.owners["loc"] == [0, 1, 2] == batch.owners["m_loc"]
    # without the probes the groups are left out of the batch
    plain = build_edit_batch(
        backbone, [_plain(r) for r in requests], ("edit", "loc", "hard_loc", "hard_m_loc")
    )
    assert set(plain.slices) == {"edit", "loc", "m_loc"}
    # the default environments do not ask for them
    config = ODEditMethod(FTLMethod()).peft_config(backbone)
    assert config.hard_negatives is False and "hard_loc" not in needed_groups(config)


def _terms(backbone, requests, hard: bool):  # noqa: ANN001, ANN202
    from peft import get_peft_model

    method = ODEditMethod(FTLMethod(steps=1), objective={"hard_negatives": hard, "lambda_mode": "fixed"})
    config = method.peft_config(backbone)
    peft_model = get_peft_model(backbone.model, config)
    try:
        batch = build_edit_batch(backbone, requests, needed_groups(config))
        objective = ODEditObjective(config, backbone)
        with peft_model.disable_adapter():
            objective.prepare(backbone.forward, batch)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in peft_model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)  # post-edit != pre-edit
            terms = objective(backbone.forward, batch, torch.tensor(0.1))
        return float(terms.r_loc), float(terms.penalty), sorted(k for k, _ in objective.pre.loc_rows)
    finally:
        peft_model.unload()


def test_hard_negatives_enter_the_ood_environment(backbone, requests) -> None:  # noqa: ANN001
    """With ``hard_negatives`` the look-alikes' KL joins R_loc and the OOD term of the penalty; requests
    without the probes give exactly the plain environment."""
    r_loc, penalty, recorded = _terms(backbone, requests, hard=True)
    r_loc0, penalty0, recorded0 = _terms(backbone, requests, hard=False)
    assert {"hard_loc", "hard_m_loc"} <= set(recorded) and not {"hard_loc", "hard_m_loc"} & set(recorded0)
    assert r_loc != pytest.approx(r_loc0, rel=1e-4) and penalty != pytest.approx(penalty0, rel=1e-4)
    plain = [_plain(r) for r in requests]
    assert _terms(backbone, plain, hard=True)[:2] == pytest.approx(
        _terms(backbone, plain, hard=False)[:2], rel=1e-6
    )

"""ASAM's own checks (the wrapper matrix in tests/test_editors.py runs the common ones): RCSL's penalty
against a hand-computed SVD, the asymmetric anchor, LAR's variants inside their ball and raising the NLL,
the all-off mode being the plain editor, the refusal of unsupported editors, options, and the CLI."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from peft import get_peft_model

import odedit_hf  # noqa: F401  registers the PEFT types
from odedit_hf.editing import get_method, model_inputs, nll_from_logits
from odedit_hf.testing import tiny_backbone, tiny_image

TEXTS = [
    "what color is the cube",
    "which colour has the cube",
    "what colour is the cube",
    "what is the capital of france",
    "what animal is this",
    "red",
    "blue",
    "paris",
    "cat",
]


@pytest.fixture(scope="module")
def request_(tmp_path_factory):  # noqa: ANN001, ANN201
    from odedit_hf.data import EditRequest

    root = tmp_path_factory.mktemp("asam_images")
    paths = []
    for i in range(5):
        path = os.path.join(root, f"img{i}.png")
        tiny_image(i).save(path)
        paths.append(path)
    return EditRequest(
        case_id=0,
        task="vqa",
        source="in-memory",
        src="what color is the cube",
        pred="red",
        alt="blue",
        image=paths[0],
        image_rephrase=paths[1],
        rephrase="which colour has the cube",
        loc="what is the capital of france",
        loc_ans="paris",
        m_loc=paths[3],
        m_loc_q="what animal is this",
        m_loc_a="cat",
        rephrases=("which colour has the cube", "what colour is the cube"),
        image_rephrases=(paths[1], paths[4]),
    )


EDITOR_OPTIONS = {"ftl": {"steps": 5, "lr": 1e-2}, "lora": {"steps": 5, "lr": 5e-2}}


def _setup(method_name: str = "asam+ftl", **asam):  # noqa: ANN202
    torch.manual_seed(0)
    backbone = tiny_backbone("llava", seed=0, texts=TEXTS)
    editor = method_name.split("+")[1]
    method = get_method(method_name, asam=asam, **{editor: EDITOR_OPTIONS[editor]})
    peft_model = get_peft_model(backbone.model, method.peft_config(backbone))
    return backbone, method, peft_model


# ------------------------------------------------------------------------------------------------ RCSL
def _matrix_with_singular_values(values: list[float], cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(values), generator=g, dtype=torch.float64))
    return (u @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ v.T).float()


def test_rcsl_penalty_matches_a_hand_computed_svd():
    from odedit_hf.methods.asam import rcsl_penalty

    matrix = _matrix_with_singular_values([3.0, 2.0, 1.0, 0.5], cols=7)
    sigma = torch.linalg.svdvals(matrix)
    torch.testing.assert_close(sigma, torch.tensor([3.0, 2.0, 1.0, 0.5]), rtol=1e-5, atol=1e-5)
    # rank 1: the tail is 2 + 1 + 0.5 of a total 6.5
    assert rcsl_penalty(matrix, 1, "sum").item() == pytest.approx(3.5, abs=1e-4)
    assert rcsl_penalty(matrix, 1, "ratio").item() == pytest.approx(3.5 / 6.5, abs=1e-5)
    assert rcsl_penalty(matrix, 2, "ratio").item() == pytest.approx(1.5 / 6.5, abs=1e-5)
    assert rcsl_penalty(matrix, 1, "ratio").item() == pytest.approx(
        float(sigma[1:].sum() / sigma.sum()), abs=1e-6
    )
    # rows that share one direction (any scales and signs) have no tail
    direction = torch.randn(7)
    collinear = torch.stack([2.0 * direction, -0.5 * direction, direction])
    assert rcsl_penalty(collinear, 1, "ratio").item() < 1e-5
    with pytest.raises(ValueError, match="norm must be"):
        rcsl_penalty(matrix, 1, "nuclear")


def test_unit_matrix_normalises_rows_and_detaches_the_anchor_only_when_asymmetric():
    from odedit_hf.methods.asam import rcsl_penalty, unit_matrix

    g = torch.Generator().manual_seed(1)
    for symmetric in (False, True):
        anchor = torch.randn(6, generator=g).requires_grad_(True)
        others = (3.0 * torch.randn(4, 6, generator=g)).requires_grad_(True)
        matrix = unit_matrix(anchor, others, symmetric=symmetric)
        torch.testing.assert_close(matrix.norm(dim=-1), torch.ones(5))
        torch.testing.assert_close(matrix[0], (anchor / anchor.norm()).detach())
        rcsl_penalty(matrix).backward()
        assert others.grad is not None and others.grad.abs().sum() > 0
        if symmetric:
            assert anchor.grad is not None and anchor.grad.abs().sum() > 0
        else:
            assert anchor.grad is None


def test_asymmetric_rcsl_moves_the_unit_onto_the_fixed_anchor():
    from odedit_hf.methods.asam import rcsl_penalty, unit_matrix

    g = torch.Generator().manual_seed(2)
    anchor = torch.randn(8, generator=g)
    others = (anchor + 0.8 * torch.randn(3, 8, generator=g)).requires_grad_(True)
    start = rcsl_penalty(unit_matrix(anchor, others, symmetric=False)).item()
    cos_start = torch.nn.functional.cosine_similarity(others.detach(), anchor.expand(3, 8)).min().item()
    opt = torch.optim.SGD([others], lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        rcsl_penalty(unit_matrix(anchor, others, symmetric=False)).backward()
        opt.step()
    end = rcsl_penalty(unit_matrix(anchor, others, symmetric=False)).item()
    cos_end = torch.nn.functional.cosine_similarity(others.detach(), anchor.expand(3, 8)).abs().min().item()
    assert start > 0.1 and end < 0.2 * start
    assert cos_end > max(cos_start, 0.95)  # the rows line up with the anchor, which never moved


# ------------------------------------------------------------------------------------------------- LAR
def test_lar_variants_stay_in_their_ball_and_raise_the_nll(request_):  # noqa: ANN001
    from odedit_hf.editing import edit_samples
    from odedit_hf.methods.asam import edit_layers, lar_perturbations, lar_radius
    from odedit_hf.methods.asam.subspace import perturbed_input, prompt_mask

    backbone, method, peft_model = _setup()
    enter, _ = edit_layers(backbone)
    layer = backbone.decoder_layers()[enter]
    batch = backbone.build_batch(edit_samples([request_]) * 3)
    eps = 0.2
    radius = lar_radius(backbone.forward, layer, batch, eps)
    record: list[torch.Tensor] = []
    with torch.no_grad(), perturbed_input(layer, None, record):
        clean_nll = nll_from_logits(backbone.forward(model_inputs(batch)).logits, batch["labels"]).item()
    h = record[0]
    mask = prompt_mask(batch)
    torch.testing.assert_close(radius.squeeze(-1), eps * h.norm(dim=-1) * mask)
    hidden = h.shape[-1]

    def nll_under(delta):  # noqa: ANN001, ANN202
        with torch.no_grad(), perturbed_input(layer, delta):
            return nll_from_logits(backbone.forward(model_inputs(batch)).logits, batch["labels"]).item()

    start = lar_perturbations(
        backbone.forward, layer, batch, radius, hidden, steps=0, step_size=0.5,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    delta = lar_perturbations(
        backbone.forward, layer, batch, radius, hidden, steps=4, step_size=0.5,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    for d in (start, delta):
        norms = d.norm(dim=-1)
        assert bool((norms <= radius.squeeze(-1) * (1 + 1e-5) + 1e-7).all()), "a variant left its ball"
        assert bool((norms[~mask] == 0).all()), "target tokens and padding must not move"
    on_prompt = delta.norm(dim=-1)[mask] / radius.squeeze(-1)[mask]
    assert on_prompt.min().item() > 0.99  # PGD ends on the sphere: the ball is what bounds it
    assert not torch.allclose(delta[0], delta[1])  # the variants start apart
    assert nll_under(delta) > nll_under(start)  # the ascent, not the random start, raises it
    assert nll_under(delta) > clean_nll + 1e-3
    # a perturbation of the same norms but a random direction raises the NLL less than PGD's
    rand = torch.randn(delta.shape, generator=torch.Generator().manual_seed(3))
    rand = rand / rand.norm(dim=-1, keepdim=True) * delta.norm(dim=-1, keepdim=True)
    assert nll_under(delta) > nll_under(rand)
    # the edit parameters' gradients were not touched by the PGD passes
    assert all(p.grad is None for p in method.edit_parameters(peft_model))


# ------------------------------------------------------------------------------------------- objective
@pytest.mark.parametrize("symmetric", [False, True])
def test_the_objective_detaches_the_anchor_only_in_asymmetric_mode(request_, symmetric: bool):  # noqa: ANN001
    backbone, method, peft_model = _setup(symmetric=symmetric, n_variants=2, pgd_steps=1)
    method.before_edit(peft_model, backbone, [request_])
    with backbone.frozen_vision_cache():
        objective = method.prepare_objective(peft_model, backbone, [request_])
        total, nll, terms = objective(0)
    assert set(terms) >= {"nll", "variant_nll", "rcsl", "loc"}
    (matrix,) = objective.last_units
    (anchor,) = objective.last_anchors
    assert matrix.shape[0] == 1 + 2 + 2 + 2  # anchor, 2 text rephrases, 2 image rephrases, 2 variants
    assert anchor.requires_grad  # the model's representation depends on the edit parameters
    (grad,) = torch.autograd.grad(terms["rcsl"], anchor, retain_graph=True, allow_unused=True)
    if symmetric:
        assert grad is not None and grad.abs().sum() > 0
    else:
        assert grad is None or grad.abs().sum() == 0
    # the early stop looks at the clean edit prompt's NLL, and the total carries every term
    expected = terms["nll"] + terms["variant_nll"] + terms["rcsl"] + terms["loc"]
    torch.testing.assert_close(total, expected)
    assert nll is terms["nll"]


def test_everything_off_is_the_plain_editor(request_):  # noqa: ANN001
    backbone, method, peft_model = _setup(lar=False, rcsl=False, loc=False)
    stats = method.edit(peft_model, backbone, [request_])
    torch.manual_seed(0)
    backbone2 = tiny_backbone("llava", seed=0, texts=TEXTS)
    plain = get_method("ftl", **EDITOR_OPTIONS["ftl"])
    peft2 = get_peft_model(backbone2.model, plain.peft_config(backbone2))
    stats2 = plain.edit(peft2, backbone2, [request_])
    assert stats.steps == stats2.steps == 5
    assert stats.losses == pytest.approx(stats2.losses, rel=1e-6)


def test_each_component_changes_the_edit(request_):  # noqa: ANN001
    results = {}
    for name, options in {
        "all": {},
        "no_lar": {"lar": False},
        "no_rcsl": {"rcsl": False},
        "symmetric": {"symmetric": True},
    }.items():
        backbone, method, peft_model = _setup(**options)
        stats = method.edit(peft_model, backbone, [request_])
        results[name] = stats.losses
        assert all(math.isfinite(v) for v in stats.losses)
        assert ("variant_nll" in method.last_edit_trace) == (name != "no_lar")
        assert ("rcsl" in method.last_edit_trace) == (name != "no_rcsl")
    for name in ("no_lar", "no_rcsl", "symmetric"):
        assert results[name] != pytest.approx(results["all"], rel=1e-6), name


# --------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("editor", ["grace", "wise", "ike"])
def test_unsupported_editors_are_refused_with_the_supported_list(editor: str):
    with pytest.raises(
        ValueError, match=r"asam cannot wrap .*Supported: asam\+ftl, asam\+lora, asam\+tpatcher"
    ):
        get_method(f"asam+{editor}")


def test_supported_editors_build_and_aliases_resolve():
    for name in ("asam+ftl", "asam+ft", "asam+lora", "asam+tpatcher"):
        method = get_method(name)
        assert method.name.startswith("asam+")
    assert get_method("asam+ft").name == "asam+ftl"


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"epsilon": -0.1}, "epsilon must be a finite number >= 0"),
        ({"epsilon": 0.0}, "epsilon must be > 0 with lar on"),
        ({"n_variants": 0}, "n_variants must be an int >= 1"),
        ({"rank": 0}, "rank must be an int >= 1"),
        ({"pgd_steps": -1}, "pgd_steps must be an int >= 0"),
        ({"rcsl_norm": "nuclear"}, "rcsl_norm must be one of"),
        ({"loc_positions": "image"}, "loc_positions must be one of"),
        ({"symmetric": "yes"}, "symmetric must be True or False"),
    ],
)
def test_options_are_validated(options, match):  # noqa: ANN001
    with pytest.raises(ValueError, match=match):
        get_method("asam+ftl", asam=options)


def test_unknown_option_is_named():
    from odedit_hf.methods.asam import ASAMMethod

    with pytest.raises(ValueError, match="unknown ASAM hyperparameters"):
        ASAMMethod(get_method("ftl"), gamma=1.0)


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_edit_with_asam_on_the_micro_world(micro_world, tmp_path):  # noqa: ANN001
    from odedit_hf.cli.main import main

    out = tmp_path / "asam.json"
    argv = [
        "edit", "--model", micro_world.model_dir, "--data", micro_world.root, "--method", "asam+ftl",
        "--n", "2", "--ftl.steps", "3", "--asam.n-variants", "1", "--asam.pgd-steps", "1",
        "--asam.symmetric", "true", "--out", str(out), "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    method = report["config"]["method"]
    assert method["name"] == "asam+ftl"
    options = method["options"]
    assert options["n_variants"] == 1 and options["pgd_steps"] == 1 and options["symmetric"] is True
    assert (
        options["epsilon"] == 0.03 and options["rank"] == 1 and options["lar"] and options["rcsl"]
    )  # defaults
    assert method["editor"]["options"]["steps"] == 3
    assert report["n_edits"] == 2

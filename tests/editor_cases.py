"""The one list of editor test cases (STYLE 19: peft's ``TEST_CASES``).

Every row is run through the common checks of ``tests/test_editors.py`` via the public
``method.edit``; crossed with every entry of :data:`WRAPPERS`, the same rows drive the wrapper matrix.
A new editor adds a row here, nothing else.

Row fields: ``case`` (test id), ``model_type`` (a tiny random model of that family), ``method`` (the
``get_method`` name), ``options`` (its hyperparameters), ``peft_type`` and ``prefix`` (what the saved
adapter holds), ``merge`` (whether merge/unmerge applies), ``exact_unmerge`` (unmerge restores the base
bit for bit), ``keeps_earlier_edits`` (after a second sequential edit the first still holds on this
tiny model).

Rows use the tiny LLaVA: ``method.edit`` takes :class:`~odedit_hf.data.EditRequest` records, which carry
images until text-only records land (issue 15); the text-only decoders' editing paths are covered by
``tests/test_backbones.py`` until then.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class EditorCase:
    case: str
    model_type: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    peft_type: str = ""
    prefix: str = ""
    merge: bool = True
    exact_unmerge: bool = False
    keeps_earlier_edits: bool = False


EDITOR_CASES: list[EditorCase] = [
    EditorCase("ftl-llava", "llava", "ftl", {"steps": 40, "lr": 1e-2}, "FTL", "ftl_", exact_unmerge=True),
    EditorCase("lora-llava", "llava", "lora", {"steps": 40, "lr": 5e-2}, "LORA", "lora_"),
    EditorCase(
        "lora-llava-r4", "llava", "lora", {"steps": 40, "lr": 5e-2, "rank": 4, "alpha": 8.0}, "LORA", "lora_"
    ),
    EditorCase(
        "ftl-llava-2proj-norm",
        "llava",
        "ftl",
        {"layers": [1], "projections": ["mlp.up_proj", "mlp.down_proj"], "norm_constraint": 0.2, "lr": 2e-2},
        "FTL",
        "ftl_",
        exact_unmerge=True,
    ),
    EditorCase(
        "grace-llava",
        "llava",
        "grace",
        {"steps": 10},
        "GRACE",
        "grace_",
        merge=False,
        keeps_earlier_edits=True,
    ),
    EditorCase(
        # margins and clamp scaled to the tiny random model, whose layer inputs are small (side-memory
        # distances ~0.05): WISE's 5/20/10 are unreachable there, and at ±1 the clamp stops a second edit
        "wise-llava",
        "llava",
        "wise",
        {"steps": 40, "loc_margin": 0.01, "edit_margin": 0.1, "gap_margin": 0.05, "norm_constraint": 5.0},
        "WISE",
        "wise_",
        merge=False,
    ),
    EditorCase(
        "tpatcher-llava",
        "llava",
        "tpatcher",
        {"steps": 80, "train_up": True},
        "TPATCHER",
        "tpatcher_",
        merge=False,
    ),
    EditorCase(
        "unike-llava", "llava", "unike", {"steps": 80, "train_up": True}, "UNIKE", "unike_", merge=False
    ),
    EditorCase(
        # the untrained identity-initialised hypernetwork (a random tiny model has no train split): five
        # iterated MEND steps, each a normalised gradient step; the trained network: tests/test_mend.py
        "mend-llava",
        "llava",
        "mend",
        {"steps": 5, "edit_lr": 1e-3},
        "MEND",
        "mend_",
        exact_unmerge=True,
    ),
]

#: Wrapper methods crossed with every wrappable editor row: (name, options of the wrapper).
WRAPPERS: list[tuple[str, dict[str, Any]]] = [
    ("odedit", {"lambda_mode": "sketch"}),
    ("ldke", {"k": 1}),
    ("asam", {"n_variants": 1, "pgd_steps": 1}),
]

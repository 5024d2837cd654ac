"""Environment batches: the prompts of one edit step, grouped, tokenised, run and split.

Shared by every method whose objective looks beyond the edit prompt (ODEdit's three IRM environments,
LDKE's classifier examples, ASAM's knowledge units). For ``k`` requests, a step's prompts are the
groups of :data:`GROUPS`, built by :func:`build_edit_batch` from the very samples the metrics score
(:func:`~odedit_hf.editing.samples.eval_samples`):

- ``edit``: the edit image + ``src`` -> ``alt``;
- ``rephrase``: image + ``rephrase`` -> ``alt``; ``image_rephrase``: ``image_rephrase`` + ``src`` -> ``alt``;
- ``loc``: ``loc`` -> ``loc_ans`` (text only); ``m_loc``: ``m_loc`` + ``m_loc_q`` -> ``m_loc_a``;
- ``hard_loc`` / ``hard_m_loc`` (asked for explicitly): the request's hard-negative locality probes
  (``hard_loc`` -> ``hard_loc_ans``; the look-alike's image + ``hard_m_loc_q`` -> ``hard_m_loc_a``), rows only
  for the requests that carry them.

A text-only request (ZsRE / CounterFact) has no image: it contributes no ``image_rephrase`` and no
``m_loc`` rows, and a group that no request of the batch fills is left out of the batch (``slices`` and
``owners`` then lack it). Consumers iterate over the groups present (``EditBatch.slices``; a group's
``owners`` name the requests that have rows in it). For an all-text batch the risks' means are those of
the text groups alone, computed on about half the rows the image groups would repeat.

All groups go into one forward when the family can mix image and text-only rows (else two), and
:func:`run_groups` splits the outputs back by group, gathering the answer positions once per forward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from odedit_hf.backbones import Backbone, PromptSample
    from odedit_hf.data import EditRequest

logger = logging.getLogger(__name__)

__all__ = [
    "CORE_GROUPS",
    "GROUPS",
    "IGNORE_INDEX",
    "EditBatch",
    "ForwardFn",
    "GroupOutput",
    "build_edit_batch",
    "run_groups",
]

IGNORE_INDEX = -100

#: Prompt groups of a step, in batch order. ``edit`` = reliability prompt; the two rephrase kinds;
#: ``loc`` (text only) and ``m_loc``.
GROUPS: tuple[str, ...] = ("edit", "rephrase", "image_rephrase", "loc", "m_loc", "hard_loc", "hard_m_loc")
#: the groups every MMEdit record fills (the hard-negative ones need the world's probes and are opt-in)
CORE_GROUPS: tuple[str, ...] = GROUPS[:5]


@dataclass
class EditBatch:
    """The prompts of one step for ``k`` requests, tokenised, grouped.

    Attributes:
        batches: the model inputs (one batch, or two when the family cannot mix image and text-only
            samples), from ``Backbone.build_batch``.
        slices: group name -> ``(batch index, first row, end row)``.
        owners: group name -> request index (0..k-1) of each row of the group.
        case_ids: the requests' ``case_id`` (keys of per-request caches).
    """

    batches: list[dict[str, torch.Tensor]]
    slices: dict[str, tuple[int, int, int]]
    owners: dict[str, list[int]]
    case_ids: list[int]

    @property
    def num_requests(self) -> int:
        return len(self.case_ids)

    def to(self, device: torch.device | str) -> EditBatch:
        """A copy with every tensor on ``device``."""
        return EditBatch(
            batches=[{k: v.to(device) for k, v in b.items()} for b in self.batches],
            slices=dict(self.slices),
            owners={k: list(v) for k, v in self.owners.items()},
            case_ids=list(self.case_ids),
        )


def _rephrase_texts(request: EditRequest, n: int) -> list[str]:
    extra = tuple(getattr(request, "rephrases", ()) or ())
    texts = list(dict.fromkeys([request.rephrase, *extra]))
    return texts[:n]


def _rephrase_images(request: EditRequest, n: int) -> list[Any]:
    extra = tuple(getattr(request, "image_rephrases", ()) or ())
    paths = list(dict.fromkeys([request.image_rephrase, *extra]))[:n]
    if len(paths) == 1:
        return [request.load_image("image_rephrase")]
    from odedit_hf.data.images import load_rgb_image

    return [
        load_rgb_image(p, source=request.source, index=request.case_id, field="image_rephrase") for p in paths
    ]


def build_edit_batch(
    backbone: Backbone,
    requests: Sequence[EditRequest],
    groups: Sequence[str],
    *,
    num_rephrases: int = 1,
    device: torch.device | str | None = None,
) -> EditBatch:
    """Tokenise the environments' prompts of ``requests`` (the very prompts the metrics score).

    Args:
        backbone: the model's backbone (tokenisation, whether image and text-only rows mix).
        requests: the edit requests.
        groups: which prompt groups to build, a subset of :data:`GROUPS` (``"edit"`` is always built;
            ``"loc"`` and ``"m_loc"`` come together).
        num_rephrases: rephrase prompts per kind and request (a request may carry fewer).
        device: where the tensors go.

    Raises:
        ValueError: no request, or an unknown group.
    """
    from odedit_hf.backbones import PromptSample
    from odedit_hf.editing import eval_samples
    from odedit_hf.editing.samples import probe_samples

    if len(requests) == 0:
        raise ValueError("build_edit_batch: no requests given; an edit needs at least one EditRequest")
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise ValueError(f"build_edit_batch: unknown prompt groups {unknown}; choose from {GROUPS}")
    wanted = set(groups) | {"edit"}
    if "loc" in wanted or "m_loc" in wanted:
        wanted |= {"loc", "m_loc"}
    groups = tuple(g for g in GROUPS if g in wanted)
    samples: dict[str, list[PromptSample]] = {g: [] for g in groups}
    owners: dict[str, list[int]] = {g: [] for g in groups}
    short = 0
    for i, request in enumerate(requests):
        base = eval_samples(request)
        samples["edit"].append(base["reliability"])
        owners["edit"].append(i)
        if "rephrase" in samples:
            texts = _rephrase_texts(request, num_rephrases)
            short += num_rephrases - len(texts)
            image = base["t_generality"].image
            for text in texts:
                samples["rephrase"].append(
                    PromptSample(prompt=text, target=request.alt, image=image, task=request.task)
                )
                owners["rephrase"].append(i)
        if "image_rephrase" in samples and not request.text_only:  # no image to rephrase with: no rows
            images = _rephrase_images(request, num_rephrases)
            short += num_rephrases - len(images)
            for image in images:
                samples["image_rephrase"].append(
                    PromptSample(prompt=request.src, target=request.alt, image=image, task=request.task)
                )
                owners["image_rephrase"].append(i)
        if "loc" in samples:
            samples["loc"].append(base["t_locality"])
            owners["loc"].append(i)
            if not request.text_only:
                samples["m_loc"].append(base["m_locality"])
                owners["m_loc"].append(i)
        if "hard_loc" in samples or "hard_m_loc" in samples:
            hard = probe_samples(request, only=("hard_t_locality", "hard_m_locality"))
            for g, name in (("hard_loc", "hard_t_locality"), ("hard_m_loc", "hard_m_locality")):
                if g in samples and name in hard:
                    samples[g].extend(hard[name])
                    owners[g].extend([i] * len(hard[name]))
    if short:
        logger.info(
            "num_rephrases=%d but the requests carry fewer rephrases; %d missing, using those present",
            num_rephrases,
            short,
        )
    groups = tuple(g for g in groups if samples[g])  # an all-text batch has no image groups
    owners = {g: owners[g] for g in groups}
    # one forward for everything when the family can mix image and text-only samples
    if backbone.spec.mixed_batches:
        parts = [list(groups)]
    else:
        with_image = [g for g in groups if samples[g][0].image is not None]
        parts = [p for p in (with_image, [g for g in groups if g not in with_image]) if p]
    batches, slices = [], {}
    for b, part in enumerate(parts):
        flat: list[PromptSample] = []
        for g in part:
            slices[g] = (b, len(flat), len(flat) + len(samples[g]))
            flat.extend(samples[g])
        batches.append(backbone.build_batch(flat, device=device))
    return EditBatch(
        batches=batches, slices=slices, owners=owners, case_ids=[int(r.case_id) for r in requests]
    )


@dataclass
class GroupOutput:
    """One group's rows of a forward pass (views into the batch outputs).

    ``answer_logits`` / ``answer_targets`` / ``answer_hidden`` hold only the positions that predict
    target tokens, gathered once per forward pass for the whole batch (row-major; ``answer_counts[i]``
    of them belong to the group's row ``i``): the risks read these, so the backward pass scatters one
    compact gradient into the batch logits instead of one full-size gradient per group and risk.
    """

    logits: torch.Tensor  # (r, T, V)
    labels: torch.Tensor  # (r, T)
    attention_mask: torch.Tensor  # (r, T)
    image_mask: torch.Tensor | None  # (r, T)
    hidden: torch.Tensor | None  # (r, T, H)
    answer_logits: torch.Tensor  # (N, V)
    answer_targets: torch.Tensor  # (N,)
    answer_counts: list[int]  # r entries summing to N
    answer_hidden: torch.Tensor | None  # (N, H), with ``hidden``

    def answer_hidden_per_row(self, mode: str) -> list[torch.Tensor]:
        """:func:`gen_samples` from the gathered rows: ``[(n_i, H)]`` per row of the group."""
        if self.answer_hidden is None:
            raise ValueError("GroupOutput: no hidden states were requested for this group")
        if mode not in ("answer", "last_prompt"):
            raise ValueError(f"gen_samples: mode must be 'answer' or 'last_prompt', got {mode!r}")
        parts = list(torch.split(self.answer_hidden, self.answer_counts))
        return [p[:1] for p in parts] if mode == "last_prompt" else parts

    def answer_logits_per_row(self) -> list[torch.Tensor]:
        """The answer logits rows of each row of the group: ``[(n_i, V)]``."""
        return list(torch.split(self.answer_logits, self.answer_counts))


ForwardFn = Callable[..., Any]


def run_groups(
    forward: ForwardFn,
    backbone: Backbone,
    edit_batch: EditBatch,
    *,
    hidden_groups: Sequence[str] = (),
) -> dict[str, GroupOutput]:
    """Run ``forward(batch, **kwargs)`` on each batch of ``edit_batch`` and split the outputs by group.

    ``hidden_groups`` names the groups whose last-layer hidden states are needed (the model is then
    called with ``output_hidden_states=True``).
    """
    out: dict[str, GroupOutput] = {}
    for b, batch in enumerate(edit_batch.batches):
        groups = [g for g, (bi, _, _) in edit_batch.slices.items() if bi == b]
        want_hidden = any(g in hidden_groups for g in groups)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        outputs = forward(inputs, output_hidden_states=True) if want_hidden else forward(inputs)
        logits = outputs.logits
        hidden = backbone.last_hidden_states(outputs) if want_hidden else None
        image_mask = backbone.image_token_mask(batch)
        # one gather of every answer position of the batch (row-major, so each group's rows are contiguous)
        shifted = batch["labels"][:, 1:]
        mask = shifted != IGNORE_INDEX
        counts = mask.sum(dim=1).tolist()
        if any(c == 0 for c in counts):
            raise ValueError(
                "run_groups: a prompt has no labelled target token; build it with Backbone.build_batch"
            )
        answer_logits = logits[:, :-1][mask]
        answer_targets = shifted[mask]
        answer_hidden = hidden[:, :-1][mask] if hidden is not None else None
        offsets = [0]
        for c in counts:
            offsets.append(offsets[-1] + c)
        for g in groups:
            _, start, stop = edit_batch.slices[g]
            lo, hi = offsets[start], offsets[stop]
            with_hidden = hidden is not None and g in hidden_groups
            out[g] = GroupOutput(
                logits=logits[start:stop],
                labels=batch["labels"][start:stop],
                attention_mask=batch["attention_mask"][start:stop],
                image_mask=image_mask[start:stop],
                hidden=hidden[start:stop] if with_hidden else None,
                answer_logits=answer_logits[lo:hi],
                answer_targets=answer_targets[lo:hi],
                answer_hidden=answer_hidden[lo:hi] if with_hidden else None,
                answer_counts=counts[start:stop],
            )
    return out

"""The teacher-forced samples of one edit request: what is edited, and what each metric looks at.

One map from an :class:`~odedit_hf.data.EditRequest` to :class:`~odedit_hf.backbones.PromptSample`
objects, shared by the editors (the edit sample), the metrics (all five) and ODEdit (its
environments), so that every part builds the very same prompts. The optional probes of a request
(portability, hard-negative locality, knowledge unit) have their own map, :func:`probe_samples`, so that
:func:`eval_samples` and everything built on it stay exactly as they were.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from odedit_hf.backbones import PromptSample
    from odedit_hf.data import EditRequest

__all__ = [
    "EVAL_SAMPLE_NAMES",
    "PROBE_SAMPLE_NAMES",
    "edit_sample",
    "edit_samples",
    "eval_samples",
    "probe_samples",
]

#: The samples a request is scored on, in a fixed order: reliability, text generality, multimodal
#: generality (all with target ``alt``), text locality (``loc`` -> ``loc_ans``, no image) and
#: multimodal locality (``m_loc`` image + ``m_loc_q`` -> ``m_loc_a``). A text-only request has the first,
#: second and fourth only.
EVAL_SAMPLE_NAMES: tuple[str, ...] = (
    "reliability",
    "t_generality",
    "m_generality",
    "t_locality",
    "m_locality",
)
#: The optional probe sample groups (:func:`probe_samples`), each present only where the request has it:
#: portability probes (target = their new answer), hard-negative text and multimodal locality (one sample
#: each, target = the look-alike's answer) and the knowledge unit (every member, target ``alt``).
PROBE_SAMPLE_NAMES: tuple[str, ...] = ("portability", "hard_t_locality", "hard_m_locality", "unit")


def edit_sample(request: EditRequest) -> PromptSample:
    """The sample an edit trains on: the edit image + ``src`` -> ``alt`` (no image for a text-only request)."""
    from odedit_hf.backbones import PromptSample

    image = None if request.text_only else request.load_image("image")
    return PromptSample(prompt=request.src, target=request.alt, image=image, task=request.task)


def edit_samples(requests: Sequence[EditRequest]) -> list[PromptSample]:
    """:func:`edit_sample` of each request, in order."""
    if len(requests) == 0:
        raise ValueError("edit_samples: no requests given; an edit needs at least one EditRequest")
    return [edit_sample(r) for r in requests]


def eval_samples(request: EditRequest) -> dict[str, PromptSample]:
    """The evaluation samples of a request, keyed by :data:`EVAL_SAMPLE_NAMES`.

    Text locality is a text-only question; its task is ``"vqa"`` whatever the request's task, since
    ``loc`` is a question in MMEdit files of both tasks. A text-only request (ZsRE / CounterFact) has
    no image: its reliability and text-generality samples carry none, its text-locality sample keeps
    the request's task (ZsRE and CounterFact locality prompts are fed as they are, like the edit
    prompt), and ``m_generality`` / ``m_locality`` are left out (their scores are absent).
    """
    from odedit_hf.backbones import PromptSample

    if request.text_only:
        return {
            "reliability": PromptSample(prompt=request.src, target=request.alt, task=request.task),
            "t_generality": PromptSample(prompt=request.rephrase, target=request.alt, task=request.task),
            "t_locality": PromptSample(prompt=request.loc, target=request.loc_ans, task=request.task),
        }
    image = request.load_image("image")
    return {
        "reliability": PromptSample(prompt=request.src, target=request.alt, image=image, task=request.task),
        "t_generality": PromptSample(
            prompt=request.rephrase, target=request.alt, image=image, task=request.task
        ),
        "m_generality": PromptSample(
            prompt=request.src,
            target=request.alt,
            image=request.load_image("image_rephrase"),
            task=request.task,
        ),
        "t_locality": PromptSample(prompt=request.loc, target=request.loc_ans, image=None, task="vqa"),
        "m_locality": PromptSample(
            prompt=request.m_loc_q, target=request.m_loc_a, image=request.load_image("m_loc"), task="vqa"
        ),
    }


def probe_samples(request: EditRequest, only: Collection[str] | None = None) -> dict[str, list[PromptSample]]:
    """The samples of the request's optional probes, keyed by :data:`PROBE_SAMPLE_NAMES`; a key is present
    only where the request carries that probe (and, with ``only``, is among those names: images of the
    other groups are then not read).

    * ``portability``: one sample per probe, on its image (or text only); its task is ``"vqa"`` for a
      question (ends with ``?``), else ``"caption"``.
    * ``hard_t_locality``: ``hard_loc`` -> ``hard_loc_ans``, no image, task ``"vqa"`` (as ``t_locality``).
    * ``hard_m_locality``: ``hard_m_loc`` image + ``hard_m_loc_q`` -> ``hard_m_loc_a``; task by the same rule
      as portability (the world asks the look-alike the edited relation: a caption prompt for a caption edit).
    * ``unit``: the edit image + each of ``rephrases``, then each of ``image_rephrases`` + ``src``, all
      with target ``alt`` (duplicates dropped).
    """
    from odedit_hf.backbones import PromptSample
    from odedit_hf.data.images import load_rgb_image

    def image_at(path: str, field: str):
        return load_rgb_image(path, source=request.source, index=request.case_id, field=field)

    if only is not None:
        unknown = sorted(set(only) - set(PROBE_SAMPLE_NAMES))
        if unknown:
            raise ValueError(f"probe_samples: unknown groups {unknown}; choose from {PROBE_SAMPLE_NAMES}")
    wanted = set(PROBE_SAMPLE_NAMES if only is None else only)
    out: dict[str, list[PromptSample]] = {}
    if request.portability and "portability" in wanted:
        images: dict[str, object] = {}
        samples = []
        for probe in request.portability:
            image = None
            if probe.image is not None:
                if probe.image not in images:
                    images[probe.image] = image_at(probe.image, "portability")
                image = images[probe.image]
            samples.append(
                PromptSample(prompt=probe.prompt, target=probe.target, image=image, task=probe.task)
            )
        out["portability"] = samples
    if request.has_hard_t_locality and "hard_t_locality" in wanted:
        out["hard_t_locality"] = [
            PromptSample(prompt=request.hard_loc, target=request.hard_loc_ans, image=None, task="vqa")
        ]
    if request.has_hard_m_locality and "hard_m_locality" in wanted:
        out["hard_m_locality"] = [
            PromptSample(
                prompt=request.hard_m_loc_q,
                target=request.hard_m_loc_a,
                image=request.load_image("hard_m_loc"),
                task="vqa" if request.hard_m_loc_q.rstrip().endswith("?") else "caption",
            )
        ]
    if request.has_unit and "unit" in wanted:
        members = []
        if request.rephrases:
            image = None if request.text_only else request.load_image("image")
            members += [
                PromptSample(prompt=text, target=request.alt, image=image, task=request.task)
                for text in dict.fromkeys(request.rephrases)
            ]
        members += [
            PromptSample(
                prompt=request.src,
                target=request.alt,
                image=image_at(path, "image_rephrases"),
                task=request.task,
            )
            for path in dict.fromkeys(request.image_rephrases)
        ]
        out["unit"] = members
    return out

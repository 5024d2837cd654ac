"""The teacher-forced samples of one edit request: what is edited, and what each metric looks at.

One map from an :class:`~odedit_hf.data.EditRequest` to :class:`~odedit_hf.backbones.PromptSample`
objects, shared by the editors (the edit sample), the metrics (all five) and ODEdit (its
environments), so that every part builds the very same prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from odedit_hf.backbones import PromptSample
    from odedit_hf.data import EditRequest

__all__ = ["EVAL_SAMPLE_NAMES", "edit_sample", "edit_samples", "eval_samples"]

#: The samples a request is scored on, in a fixed order: reliability, text generality, multimodal
#: generality (all with target ``alt``), text locality (``loc`` -> ``loc_ans``, no image) and
#: multimodal locality (``m_loc`` image + ``m_loc_q`` -> ``m_loc_a``).
EVAL_SAMPLE_NAMES: tuple[str, ...] = (
    "reliability",
    "t_generality",
    "m_generality",
    "t_locality",
    "m_locality",
)


def edit_sample(request: EditRequest) -> PromptSample:
    """The sample an edit trains on: the edit image + ``src`` -> ``alt``."""
    from odedit_hf.backbones import PromptSample

    return PromptSample(
        prompt=request.src, target=request.alt, image=request.load_image("image"), task=request.task
    )


def edit_samples(requests: Sequence[EditRequest]) -> list[PromptSample]:
    """:func:`edit_sample` of each request, in order."""
    if len(requests) == 0:
        raise ValueError("edit_samples: no requests given; an edit needs at least one EditRequest")
    return [edit_sample(r) for r in requests]


def eval_samples(request: EditRequest) -> dict[str, PromptSample]:
    """The five evaluation samples of a request, keyed by :data:`EVAL_SAMPLE_NAMES`.

    Text locality is a text-only question; its task is ``"vqa"`` whatever the request's task, since
    ``loc`` is a question in MMEdit files of both tasks.
    """
    from odedit_hf.backbones import PromptSample

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

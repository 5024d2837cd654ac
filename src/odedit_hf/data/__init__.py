"""The data contract: edit requests in (MMEdit files; ZsRE / CounterFact files for text-only edits),
edit results out.

``odedit_hf.data.world`` (the embedded synthetic world) lives beside this package and is imported
only on demand; importing ``odedit_hf.data`` loads neither it nor ``datasets``.
"""

from __future__ import annotations

from .errors import DataValidationError
from .loader import MMEditDataset, load_mmedit
from .schema import (
    IMAGE_FIELDS,
    MMEDIT_FIELDS,
    MULTIMODAL_FIELDS,
    MULTIMODAL_SCORE_FIELDS,
    OPTIONAL_SCORE_FIELDS,
    PROBE_FIELDS,
    TASKS,
    TEXT_FIELDS,
    EditRequest,
    EditResult,
    EditScores,
    PortabilityProbe,
)
from .text import TEXT_LAYOUTS, detect_layout, load_edits, load_text_edits

__all__ = [
    "IMAGE_FIELDS",
    "MMEDIT_FIELDS",
    "MULTIMODAL_FIELDS",
    "MULTIMODAL_SCORE_FIELDS",
    "OPTIONAL_SCORE_FIELDS",
    "PROBE_FIELDS",
    "TASKS",
    "TEXT_FIELDS",
    "TEXT_LAYOUTS",
    "DataValidationError",
    "EditRequest",
    "EditResult",
    "EditScores",
    "MMEditDataset",
    "PortabilityProbe",
    "detect_layout",
    "load_edits",
    "load_mmedit",
    "load_text_edits",
]

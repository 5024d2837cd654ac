"""Evaluation: metric functions on logits, the editing protocols, and the results file.

Importing this package loads torch (the metrics are torch functions) but neither peft nor any model.
"""

from __future__ import annotations

from .metrics import (
    EASYEDIT_IMAGE_TOPK,
    EASYEDIT_TEXT_TOPK,
    METRIC_VERSION,
    answer_agreement,
    answer_top1,
    easyedit_agreement,
    group_scores,
    token_accuracy,
    topk_ids,
)
from .protocols import (
    PROTOCOLS,
    LocalityReference,
    ProtocolRun,
    check_requests_fit,
    evaluate_request,
    locality_reference,
    run_batch,
    run_protocol,
    run_sequential,
    run_single,
)
from .results import (
    LOCALITY_MODES,
    RESULTS_FORMAT,
    aggregate,
    build_report,
    format_table,
    probe_counts,
    write_json_atomic,
)

__all__ = [
    "EASYEDIT_IMAGE_TOPK",
    "EASYEDIT_TEXT_TOPK",
    "LOCALITY_MODES",
    "METRIC_VERSION",
    "PROTOCOLS",
    "RESULTS_FORMAT",
    "LocalityReference",
    "ProtocolRun",
    "aggregate",
    "answer_agreement",
    "answer_top1",
    "build_report",
    "check_requests_fit",
    "easyedit_agreement",
    "evaluate_request",
    "format_table",
    "group_scores",
    "locality_reference",
    "probe_counts",
    "run_batch",
    "run_protocol",
    "run_sequential",
    "run_single",
    "token_accuracy",
    "topk_ids",
    "write_json_atomic",
]

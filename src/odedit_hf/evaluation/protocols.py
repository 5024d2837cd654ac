"""Editing protocols — ``single``, ``sequential``, ``batch`` — and the scoring of one request.

A protocol owns the adapter's life: it wraps the backbone's model once with the method's PEFT
config, re-initialises the adapter before each edit, scores, rolls back, and unwraps at the end,
giving the caller's model back unchanged. The pre-edit model is the same model under
``disable_adapter()`` (no copy). The base weights are hashed before the run, after every rollback
and after unwrapping; a mismatch raises :class:`~odedit_hf.editing.RollbackError`.

* ``single``: edit one request, score it, roll back. Each edit sees the base model.
* ``sequential``: one adapter across all edits; each edit is scored right after it (``post``) and
  again on the final model (``final``), which shows how later edits erase earlier ones.
* ``batch``: ``batch_size`` requests in one optimisation, scored, rolled back; per-edit wall time
  is the batch's time divided by its size.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from odedit_hf.editing.editor import model_device
from odedit_hf.editing.rollback import BaseWeights
from odedit_hf.editing.samples import eval_samples, probe_samples

from .metrics import (
    EASYEDIT_IMAGE_TOPK,
    EASYEDIT_TEXT_TOPK,
    answer_agreement,
    easyedit_agreement,
    group_scores,
    token_accuracy,
    topk_ids,
)

if TYPE_CHECKING:
    from odedit_hf.backbones import Backbone
    from odedit_hf.data import EditRequest, EditResult, EditScores
    from odedit_hf.editing import EditMethod, EditStats

logger = logging.getLogger(__name__)

__all__ = [
    "PROTOCOLS",
    "LocalityReference",
    "ProtocolRun",
    "check_requests_fit",
    "edit_seed",
    "evaluate_request",
    "locality_reference",
    "run_batch",
    "run_protocol",
    "run_sequential",
    "run_single",
]

PROTOCOLS: tuple[str, ...] = ("single", "sequential", "batch")

#: Called after every edit with (index of the edit, its result; ``final`` not yet filled for sequential).
OnEdit = Callable[[int, "EditResult"], None]
#: Called once with the PEFT model while it holds the run's last edit (sequential: all edits), before
#: that edit is rolled back or the adapter unloaded; e.g. to save the adapter.
OnAdapter = Callable[[Any], None]


@dataclass
class LocalityReference:
    """What locality needs of the pre-edit model for one request: its top-k ids on the locality samples.

    Args:
        t_ids: ``(1, T, 1)`` top-1 ids on the text-locality sample.
        m_ids: ``(1, T', 10)`` top-10 ids on the multimodal-locality sample; ``None`` for a text-only
            request (it has none).
        hard_t_ids: the same on the hard-negative text-locality sample, ``None`` when the request has none.
        hard_m_ids: the same on the hard-negative multimodal-locality sample, ``None`` when it has none.
    """

    t_ids: torch.Tensor
    m_ids: torch.Tensor | None
    hard_t_ids: torch.Tensor | None = None
    hard_m_ids: torch.Tensor | None = None


@dataclass
class ProtocolRun:
    """The outcome of a protocol run.

    Args:
        method: the method's name.
        protocol: ``"single"``, ``"sequential"`` or ``"batch"``.
        results: one :class:`~odedit_hf.data.EditResult` per request, in request order.
        seed: the seed the run was made with.
        batch_size: requests per optimisation (1 except for ``batch``).
        base_weights_hash: digest of the base weights before the run (and, checked, after it).
        rollback_checks: how many times the base-weight hash was checked equal during the run.
        stopped_early: per request, whether its edit loop stopped on ``stop_loss``.
        wall_time_s: the whole run, scoring included.
        processes: for a run sharded across processes (:mod:`odedit_hf.evaluation.distributed`), each
            process's ``{"rank", "n_edits", "base_weights_hash", "rollback_checks", "device", "wall_time_s"}``;
            empty for a one-process run.
    """

    method: str
    protocol: str
    results: list[EditResult]
    seed: int
    batch_size: int
    base_weights_hash: str
    rollback_checks: int
    stopped_early: list[bool] = field(default_factory=list)
    wall_time_s: float = 0.0
    processes: list[dict[str, Any]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------- scoring
def _logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from odedit_hf.editing.loss import model_inputs

    return model(**model_inputs(batch)).logits.float()


@torch.no_grad()
def locality_reference(peft_model: Any, backbone: Backbone, request: EditRequest) -> LocalityReference:
    """Top-k ids of the pre-edit model (adapters disabled) on the request's locality samples (the two of
    every request, and the hard-negative ones where the request has them)."""
    samples = eval_samples(request)
    probes = probe_samples(request, only=("hard_t_locality", "hard_m_locality"))
    device = model_device(peft_model)
    hard: dict[str, torch.Tensor | None] = {"hard_t_ids": None, "hard_m_ids": None}
    m_ids = None
    with peft_model.disable_adapter():
        t_logits = _logits(peft_model, backbone.build_batch([samples["t_locality"]], device=device))
        if "m_locality" in samples:
            m_batch = backbone.build_batch([samples["m_locality"]], device=device)
            m_ids = topk_ids(_logits(peft_model, m_batch), EASYEDIT_IMAGE_TOPK).cpu()
        for key, k in (("t", EASYEDIT_TEXT_TOPK), ("m", EASYEDIT_IMAGE_TOPK)):
            if f"hard_{key}_locality" in probes:
                batch = backbone.build_batch(probes[f"hard_{key}_locality"], device=device)
                hard[f"hard_{key}_ids"] = topk_ids(_logits(peft_model, batch), k).cpu()
    return LocalityReference(
        t_ids=topk_ids(t_logits, EASYEDIT_TEXT_TOPK).cpu(),
        m_ids=m_ids,
        **hard,
    )


@torch.no_grad()
def evaluate_request(
    model: Any, backbone: Backbone, request: EditRequest, reference: LocalityReference
) -> EditScores:
    """Score the current (edited) model on one request: all five metrics, locality in both modes, and
    the optional probes the request carries (portability, hard-negative locality in both modes, the
    knowledge unit); a probe the request lacks stays absent (NaN) in the scores.

    Three forward passes for the five: reliability and both generalities in one batch, and each locality
    sample alone — in exactly the batch shape :func:`locality_reference` used, so that pre and post logits
    are comparable bit for bit (batching changes float rounding, which could flip near-ties). The probes
    run after them, in their own batches (portability split into samples with and without an image, each
    hard-negative sample alone, the unit in one batch), so the five are computed exactly as without
    probes. Hard-negative locality needs the matching ids in ``reference`` (:func:`locality_reference`
    makes them); a reference without them leaves those scores absent.

    A text-only request (no image) is scored on its text samples only: two forward passes, and its
    multimodal scores (M-Generality, M-Locality) are absent (NaN, left out of ``to_dict``), not zero.
    """
    from odedit_hf.data import EditScores

    samples = eval_samples(request)
    device = model_device(model)
    names = [n for n in ("reliability", "t_generality", "m_generality") if n in samples]
    edit_batch = backbone.build_batch([samples[n] for n in names], device=device)
    accuracy, exact = token_accuracy(_logits(model, edit_batch), edit_batch["labels"])
    nan = float("nan")
    m_gen = (float(accuracy[2]), float(exact[2])) if "m_generality" in samples else (nan, nan)
    locality: dict[str, float] = {"m_locality": nan, "m_locality_easyedit": nan}
    for key, ids, k in (
        ("t", reference.t_ids, EASYEDIT_TEXT_TOPK),
        ("m", reference.m_ids, EASYEDIT_IMAGE_TOPK),
    ):
        if f"{key}_locality" not in samples:
            continue
        if ids is None:
            raise ValueError(
                f"case {request.case_id}: the pre-edit reference has no {key}_locality ids; build it with "
                "locality_reference on this very request"
            )
        locality.update(
            _agreements(
                model, backbone, samples[f"{key}_locality"], ids, k, f"{key}_locality", request, device
            )
        )
    return EditScores(
        reliability=float(accuracy[0]),
        reliability_em=float(exact[0]),
        t_generality=float(accuracy[1]),
        t_generality_em=float(exact[1]),
        m_generality=m_gen[0],
        m_generality_em=m_gen[1],
        **locality,
        **_probe_scores(model, backbone, request, reference, device),
    )


def _agreements(
    model: Any,
    backbone: Backbone,
    sample: Any,
    ids: torch.Tensor,
    k: int,
    name: str,
    request: EditRequest,
    device: torch.device,
) -> dict[str, float]:
    """``{name: answer-mode agreement, name + "_easyedit": easyedit-mode agreement}`` of one locality sample."""
    batch = backbone.build_batch([sample], device=device)
    post = _logits(model, batch)
    if tuple(ids.shape[:2]) != tuple(post.shape[:2]):
        raise ValueError(
            f"case {request.case_id}: the {name} batch changed length between the pre-edit reference "
            f"{tuple(ids.shape[:2])} and now {tuple(post.shape[:2])}; build the reference with the same backbone"
        )
    ids = ids.to(post.device)
    return {
        name: float(answer_agreement(ids, post, batch["labels"])[0]),
        f"{name}_easyedit": float(easyedit_agreement(ids, post, batch["attention_mask"], k=k)[0]),
    }


def _group_accuracy(
    model: Any, backbone: Backbone, group: list[Any], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample token accuracy and exact match of ``group``, in order; samples with and without an image
    go in separate batches (not every family mixes them in one)."""
    accuracy = torch.empty(len(group))
    exact = torch.empty(len(group))
    for with_image in (True, False):
        idx = [i for i, s in enumerate(group) if (s.image is not None) == with_image]
        if not idx:
            continue
        batch = backbone.build_batch([group[i] for i in idx], device=device)
        acc, em = token_accuracy(_logits(model, batch), batch["labels"])
        accuracy[idx], exact[idx] = acc.cpu(), em.cpu()
    return accuracy, exact


def _probe_scores(
    model: Any, backbone: Backbone, request: EditRequest, reference: LocalityReference, device: torch.device
) -> dict[str, float]:
    """The optional scores of the probes ``request`` carries (none for a plain MMEdit request)."""
    probes = probe_samples(request)
    out: dict[str, float] = {}
    if "portability" in probes:
        acc, em, _ = group_scores(*_group_accuracy(model, backbone, probes["portability"], device))
        out["portability"], out["portability_em"] = acc, em
    for key, ids, k in (
        ("t", reference.hard_t_ids, EASYEDIT_TEXT_TOPK),
        ("m", reference.hard_m_ids, EASYEDIT_IMAGE_TOPK),
    ):
        name = f"hard_{key}_locality"
        if name in probes and ids is not None:
            out.update(_agreements(model, backbone, probes[name][0], ids, k, name, request, device))
    if "unit" in probes:
        acc, _, consistency = group_scores(*_group_accuracy(model, backbone, probes["unit"], device))
        out["unit_generality"], out["unit_consistency"] = acc, consistency
    return out


# --------------------------------------------------------------------------------- measurement
def _peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


@contextlib.contextmanager
def _measure(device: torch.device) -> Iterator[dict[str, float]]:
    """Wall time and peak memory of the block: CUDA peak allocated, or the process peak RSS on CPU."""
    out: dict[str, float] = {}
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    yield out
    if cuda:
        torch.cuda.synchronize(device)
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        out["peak_memory_mb"] = _peak_rss_mb()
    out["wall_time_s"] = time.perf_counter() - start


# --------------------------------------------------------------------------------- adapter life
@dataclass
class _Session:
    peft_model: Any
    base: BaseWeights
    snapshot: Any
    digest: str
    checks: int = 0

    def check(self, context: str) -> None:
        self.base.check(self.digest, context=context)
        self.checks += 1


@contextlib.contextmanager
def _wrapped(
    method: EditMethod, backbone: Backbone, seed: int, adapter_name: str, gradient_checkpointing: bool = False
) -> Iterator[_Session]:
    """Seed, wrap ``backbone.model`` with the method's adapter, and unwrap (checking the hash) at exit.

    With ``gradient_checkpointing`` the decoder layers recompute their activations in every edit's backward
    pass (:func:`odedit_hf.editing.checkpointing.eval_mode_checkpointing`; the model stays in eval mode)."""
    from peft import get_peft_model

    from odedit_hf.editing.checkpointing import check_supported, eval_mode_checkpointing

    if gradient_checkpointing:
        check_supported(method)

    model = backbone.model
    if hasattr(model, "peft_config"):
        raise ValueError(
            "the backbone's model already carries PEFT adapters; protocols wrap the plain model themselves "
            "(pass a Backbone around the unwrapped transformers model)"
        )
    base = BaseWeights(model)
    digest = base.digest()
    devices = [model_device(model)] if model_device(model).type == "cuda" else []
    was_training = model.training
    model.eval()  # editing and scoring run without dropout: an edit must not depend on the RNG
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, method.peft_config(backbone), adapter_name=adapter_name)
        session = _Session(peft_model, base, method.snapshot(peft_model, adapter_name, base=base), digest)
        try:
            with eval_mode_checkpointing(peft_model, gradient_checkpointing):
                yield session
        finally:
            peft_model.unload()
            base.restore_requires_grad()
            model.train(was_training)
    session.check("after unloading the adapter at the end of the run")


def _result(
    method: EditMethod,
    protocol: str,
    request: EditRequest,
    post: EditScores,
    stats: EditStats,
    m: dict[str, float],
    share: int,
) -> EditResult:
    from odedit_hf.data import EditResult

    return EditResult(
        case_id=request.case_id,
        method=method.name,
        protocol=protocol,
        post=post,
        final=None,
        wall_time_s=m["wall_time_s"] / share,
        peak_memory_mb=m["peak_memory_mb"],
        steps=stats.steps,
        final_loss=stats.final_loss,
    )


def check_requests_fit(requests: Sequence[EditRequest], multimodal: bool, model_type: str) -> None:
    """Raise a ``ValueError`` when a text-only model (``multimodal=False``) is given requests with images:
    it cannot see them, so their image metrics would be meaningless. Cheap: call it before the model loads.
    """
    if multimodal:
        return
    with_images = [r.case_id for r in requests if not r.text_only]
    if with_images:
        source = requests[0].source if requests else "the requests"
        raise ValueError(
            f"the {model_type!r} model is text-only but {len(with_images)} of {len(requests)} edit records of "
            f"{source} carry images (case ids {with_images[:5]}{' ...' if len(with_images) > 5 else ''}); "
            "edit them with a multimodal model, or give text-only records (ZsRE / CounterFact layouts, or "
            "MMEdit records without image, image_rephrase, m_loc, m_loc_q, m_loc_a)"
        )


def _check_requests(requests: Sequence[EditRequest], backbone: Backbone) -> list[EditRequest]:
    requests = list(requests)
    if not requests:
        raise ValueError("no edit requests given; load some with odedit_hf.data.load_edits")
    check_requests_fit(requests, backbone.spec.multimodal, backbone.spec.model_type)
    return requests


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return seed


def edit_seed(seed: int, case_id: int) -> int:
    """The RNG seed an edit of the single and batch protocols starts from: a function of the run's seed and
    the (first) edited record's ``case_id`` only, so an edit's outcome does not depend on which edits ran
    before it -- a subset of the requests, or a shard of them in another process, reproduces its rows."""
    return (int(seed) * 1_000_003 + int(case_id)) % (2**63 - 1)


# ------------------------------------------------------------------------------------ protocols
def run_single(
    method: EditMethod,
    backbone: Backbone,
    requests: Sequence[EditRequest],
    *,
    seed: int = 0,
    adapter_name: str = "default",
    on_edit: OnEdit | None = None,
    on_adapter: OnAdapter | None = None,
    gradient_checkpointing: bool = False,
) -> ProtocolRun:
    """Edit each request on its own: re-initialise the adapter, edit, score, roll back, check the hash."""
    return run_batch(
        method,
        backbone,
        requests,
        batch_size=1,
        seed=seed,
        adapter_name=adapter_name,
        on_edit=on_edit,
        on_adapter=on_adapter,
        gradient_checkpointing=gradient_checkpointing,
        _name="single",
    )


def run_batch(
    method: EditMethod,
    backbone: Backbone,
    requests: Sequence[EditRequest],
    *,
    batch_size: int,
    seed: int = 0,
    adapter_name: str = "default",
    on_edit: OnEdit | None = None,
    on_adapter: OnAdapter | None = None,
    gradient_checkpointing: bool = False,
    _name: str = "batch",
) -> ProtocolRun:
    """Edit ``batch_size`` requests in one optimisation, score each, roll back, check the hash; repeat."""
    requests = _check_requests(requests, backbone)
    seed = _check_seed(seed)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    start = time.perf_counter()
    results: list[EditResult] = []
    stopped: list[bool] = []
    with _wrapped(method, backbone, seed, adapter_name, gradient_checkpointing) as session:
        model = session.peft_model
        device = model_device(model)
        for first in range(0, len(requests), batch_size):
            chunk = requests[first : first + batch_size]
            references = [locality_reference(model, backbone, r) for r in chunk]
            session.snapshot.restore()  # a fresh adapter for this edit
            torch.manual_seed(edit_seed(seed, chunk[0].case_id))  # the edit's own randomness, not its rank's
            with _measure(device) as m:
                stats = method.edit(model, backbone, chunk)
            for request, reference in zip(chunk, references):
                post = evaluate_request(model, backbone, request, reference)
                result = _result(method, _name, request, post, stats, m, len(chunk))
                results.append(result)
                stopped.append(stats.stopped_early)
                if on_edit is not None:
                    on_edit(len(results) - 1, result)
            if on_adapter is not None and first + batch_size >= len(requests):
                on_adapter(model)
            session.snapshot.restore()  # roll back
            session.check(f"after rolling back the edit of case(s) {[r.case_id for r in chunk]}")
    return ProtocolRun(
        method=method.name,
        protocol=_name,
        results=results,
        seed=seed,
        batch_size=batch_size,
        base_weights_hash=session.digest,
        rollback_checks=session.checks,  # every check made, the one after unloading included
        stopped_early=stopped,
        wall_time_s=time.perf_counter() - start,
    )


def run_sequential(
    method: EditMethod,
    backbone: Backbone,
    requests: Sequence[EditRequest],
    *,
    seed: int = 0,
    adapter_name: str = "default",
    on_edit: OnEdit | None = None,
    on_adapter: OnAdapter | None = None,
    gradient_checkpointing: bool = False,
) -> ProtocolRun:
    """Apply the edits one after another to one adapter; score each right after it and on the final model."""
    requests = _check_requests(requests, backbone)
    seed = _check_seed(seed)
    start = time.perf_counter()
    results: list[EditResult] = []
    references: list[LocalityReference] = []
    stopped: list[bool] = []
    with _wrapped(method, backbone, seed, adapter_name, gradient_checkpointing) as session:
        model = session.peft_model
        device = model_device(model)
        for request in requests:
            references.append(locality_reference(model, backbone, request))
            with _measure(device) as m:
                stats = method.edit(model, backbone, [request])
            post = evaluate_request(model, backbone, request, references[-1])
            results.append(_result(method, "sequential", request, post, stats, m, 1))
            stopped.append(stats.stopped_early)
            if on_edit is not None:
                on_edit(len(results) - 1, results[-1])
        for result, request, reference in zip(results, requests, references):
            result.final = evaluate_request(model, backbone, request, reference)
        if on_adapter is not None:
            on_adapter(model)
        session.check(f"after {len(requests)} sequential edits (the base weights must not move)")
    return ProtocolRun(
        method=method.name,
        protocol="sequential",
        results=results,
        seed=seed,
        batch_size=1,
        base_weights_hash=session.digest,
        rollback_checks=session.checks,
        stopped_early=stopped,
        wall_time_s=time.perf_counter() - start,
    )


def run_protocol(
    protocol: str,
    method: EditMethod,
    backbone: Backbone,
    requests: Sequence[EditRequest],
    *,
    seed: int = 0,
    batch_size: int | None = None,
    adapter_name: str = "default",
    on_edit: OnEdit | None = None,
    on_adapter: OnAdapter | None = None,
    gradient_checkpointing: bool = False,
) -> ProtocolRun:
    """Run ``protocol`` (one of :data:`PROTOCOLS`); ``batch_size`` is required by, and only allowed for, ``batch``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    common = {
        "seed": seed,
        "adapter_name": adapter_name,
        "on_edit": on_edit,
        "on_adapter": on_adapter,
        "gradient_checkpointing": gradient_checkpointing,
    }
    if protocol == "batch":
        if batch_size is None:
            raise ValueError("the batch protocol needs batch_size (edits per optimisation)")
        return run_batch(method, backbone, requests, batch_size=batch_size, **common)
    if batch_size not in (None, 1):
        raise ValueError(
            f"batch_size={batch_size} is only meaningful for the batch protocol, not {protocol!r}"
        )
    if protocol == "single":
        return run_single(method, backbone, requests, **common)
    return run_sequential(method, backbone, requests, **common)

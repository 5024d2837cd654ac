"""The single and batch protocols sharded across processes: one model replica per process, each editing
its share of the requests, the results gathered on the main process into the run a single process makes.

Launch with ``torchrun --nproc_per_node N -m odedit_hf.cli.main edit ...`` or, on GPUs,
``accelerate launch --multi_gpu --num_processes N -m odedit_hf.cli.main edit ...`` (``accelerate``'s state
picks the backend: NCCL on GPUs, gloo on CPUs). On a CPU-only machine ``accelerate launch`` starts one
process unless MPI is set up (its multi-CPU launcher is ``mpirun``); ``torchrun`` is what it runs underneath
for GPUs and works on CPUs with gloo.

Why the shards reproduce a one-process run: each edit of these protocols starts from a fresh adapter and
its own RNG seed (:func:`~odedit_hf.evaluation.protocols.edit_seed`, from the run's seed and the record's
``case_id``), and is rolled back before the next; so the per-edit rows (scores, steps, losses) of a shard
are those of the same requests in a one-process run. Times and peak memory are measured where the edit
ran. The rollback section keeps every process's base-weight hash and check count (the hashes must agree:
every replica is the same model). The sequential protocol accumulates edits in one adapter and cannot be
split; it is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from .protocols import ProtocolRun, run_protocol

logger = logging.getLogger(__name__)

__all__ = ["distributed_state", "run_protocol_distributed", "shard_bounds"]


def distributed_state() -> Any | None:
    """``accelerate.PartialState`` when the process was started by a distributed launcher with more than one
    process (``WORLD_SIZE`` > 1), else None. CPU-only machines get the gloo backend."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def shard_bounds(n_chunks: int, world: int, rank: int) -> tuple[int, int]:
    """The contiguous range of chunk indices process ``rank`` of ``world`` edits (sizes differ by at most 1)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard_bounds: rank {rank} is not in a world of {world} processes")
    base, extra = divmod(n_chunks, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def run_protocol_distributed(
    protocol: str,
    method: Any,
    backbone: Any,
    requests: Sequence[Any],
    *,
    state: Any,
    seed: int = 0,
    batch_size: int | None = None,
    on_edit: Any = None,
    gradient_checkpointing: bool = False,
) -> ProtocolRun | None:
    """Run this process's shard of ``protocol`` and gather the shards on the main process.

    Returns:
        On the main process, the whole run (results in request order, one row per request, as a single
        process would make them; ``rollback_checks`` summed over processes, each process's hash and count in
        ``run.processes``); on the other processes, None.

    Raises:
        ValueError: the sequential protocol, or replicas whose base weights differ.
    """
    from accelerate.utils import gather_object

    if protocol == "sequential":
        raise ValueError(
            "the sequential protocol accumulates every edit in one adapter and cannot be split across "
            "processes; run it in one process (without torchrun/accelerate launch)"
        )
    chunk = batch_size if protocol == "batch" else 1
    if chunk is None:
        raise ValueError("the batch protocol needs batch_size (edits per optimisation)")
    n_chunks = -(-len(requests) // chunk)
    if n_chunks < state.num_processes:
        raise ValueError(
            f"{len(requests)} requests make {n_chunks} edit(s), fewer than the {state.num_processes} processes; "
            "give more requests (--n) or start fewer processes"
        )
    lo, hi = shard_bounds(n_chunks, state.num_processes, state.process_index)
    mine = list(requests[lo * chunk : hi * chunk])
    logger.info(
        "process %d/%d edits requests %d..%d",
        state.process_index,
        state.num_processes,
        lo * chunk,
        hi * chunk - 1,
    )
    run = run_protocol(
        protocol,
        method,
        backbone,
        mine,
        seed=seed,
        batch_size=batch_size,
        on_edit=on_edit,
        gradient_checkpointing=gradient_checkpointing,
    )
    from odedit_hf.editing import model_device

    mine_info = {
        "rank": state.process_index,
        "n_edits": len(run.results),
        "base_weights_hash": run.base_weights_hash,
        "rollback_checks": run.rollback_checks,
        "device": str(model_device(backbone.model)),
        "wall_time_s": run.wall_time_s,
    }
    gathered = gather_object([(mine_info, run.results, run.stopped_early)])
    if not state.is_main_process:
        return None
    gathered = sorted(gathered, key=lambda item: item[0]["rank"])
    infos = [g[0] for g in gathered]
    hashes = {i["base_weights_hash"] for i in infos}
    if len(hashes) != 1:
        raise ValueError(
            f"the processes' base models differ (base-weight hashes {sorted(hashes)}); every process must load "
            "the same model"
        )
    results = [r for g in gathered for r in g[1]]
    stopped = [s for g in gathered for s in g[2]]
    return ProtocolRun(
        method=run.method,
        protocol=run.protocol,
        results=results,
        seed=run.seed,
        batch_size=run.batch_size,
        base_weights_hash=run.base_weights_hash,
        rollback_checks=sum(i["rollback_checks"] for i in infos),
        stopped_early=stopped,
        wall_time_s=max(i["wall_time_s"] for i in infos),
        processes=infos,
    )

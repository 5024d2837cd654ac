"""``odedit-hf eval --adapter DIR --model M --data D``: score an existing adapter, without editing.

Every request of the data file is scored exactly as the protocols score an edit
(``odedit_hf.evaluation.evaluate_request``: reliability, generalities, locality in both modes), with
the locality reference taken from the same model with the adapter disabled. The base weights' hash
is checked after the adapter is unloaded. The results file has ``protocol: "eval"``; its times are
scoring times (no edit is made).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Any

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_parser(subparsers: Any, name: str = "eval", help: str | None = None) -> argparse.ArgumentParser:
    from odedit_hf.cli.edit import _positive_int

    parser = subparsers.add_parser(name, help=help, description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="adapter folder (or Hub repo id) to score")
    parser.add_argument(
        "--model", required=True, help="the base model the adapter was made for (folder or Hub id)"
    )
    parser.add_argument(
        "--data", required=True, help="MMEdit JSON file, or a world folder made by 'odedit-hf world'"
    )
    parser.add_argument(
        "--image-root", help="folder the records' image paths are relative to (default: the file's)"
    )
    parser.add_argument(
        "--rephrase-image-root", help="folder image_rephrase paths are relative to (default: --image-root)"
    )
    parser.add_argument(
        "--task", default="auto", choices=("auto", "vqa", "caption"), help="task of the records"
    )
    parser.add_argument("--skip-invalid", action="store_true", help="skip invalid records instead of failing")
    parser.add_argument("--n", type=_positive_int, help="score the first N records (default: all)")
    parser.add_argument("--out", help="also write the results file here (JSON)")
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)"
    )
    parser.add_argument(
        "--dtype", default="auto", choices=_DTYPES, help="model dtype (default: the checkpoint's)"
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow model code from the checkpoint"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _peak_memory_mb(device: Any) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def adapter_method_name(folder: str, config: dict[str, Any]) -> str:
    """The method that made the adapter: from its saved results, else from its PEFT types (``odedit+lora``)."""
    results = os.path.join(folder, "odedit_results.json")
    if os.path.isfile(results):
        try:
            with open(results, encoding="utf-8") as fh:
                return str(json.load(fh)["method"])
        except (OSError, ValueError, KeyError):
            pass
    types = [str(config["peft_type"])]
    if isinstance(config.get("editor"), dict) and config["editor"].get("peft_type"):
        types.append(str(config["editor"]["peft_type"]))
    return "+".join(t.lower() for t in types)


def score_adapter(backbone: Any, adapter: str, requests: list[Any], *, on_request: Any = None) -> Any:
    """Load ``adapter`` onto ``backbone.model``, score every request, unload and check the base hash.

    Returns:
        A :class:`~odedit_hf.evaluation.ProtocolRun` with ``protocol="eval"`` (``steps`` 0, times = scoring).
    """
    import torch

    from odedit_hf.data import EditResult
    from odedit_hf.editing import model_device
    from odedit_hf.editing.loading import check_adapter_folder, load_adapter, resolve_adapter
    from odedit_hf.editing.rollback import BaseWeights
    from odedit_hf.evaluation import ProtocolRun, evaluate_request, locality_reference

    folder = resolve_adapter(adapter)
    name = adapter_method_name(folder, check_adapter_folder(folder))
    base = BaseWeights(backbone.model)
    digest = base.digest()
    start = time.perf_counter()
    peft_model = load_adapter(backbone.model, folder)
    peft_model.eval()
    device = model_device(peft_model)
    results = []
    try:
        for request in requests:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            reference = locality_reference(peft_model, backbone, request)
            scores = evaluate_request(peft_model, backbone, request, reference)
            results.append(
                EditResult(
                    case_id=request.case_id,
                    method=name,
                    protocol="eval",
                    post=scores,
                    final=None,
                    wall_time_s=time.perf_counter() - t0,
                    peak_memory_mb=_peak_memory_mb(device),
                    steps=0,
                    final_loss=None,
                )
            )
            if on_request is not None:
                on_request(results[-1])
    finally:
        peft_model.unload()
    base.check(digest, context="after unloading the scored adapter")
    return ProtocolRun(
        method=name,
        protocol="eval",
        results=results,
        seed=0,
        batch_size=1,
        base_weights_hash=digest,
        rollback_checks=1,
        stopped_early=[False] * len(results),
        wall_time_s=time.perf_counter() - start,
    )


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from odedit_hf.cli.edit import (
        CLIError,
        check_output_file,
        load_backbone,
        load_requests,
        quiet_known_warnings,
        resolve_device,
    )
    from odedit_hf.editing import model_device
    from odedit_hf.evaluation import build_report, format_table, write_json_atomic

    try:
        with quiet_known_warnings():
            if args.out:
                check_output_file(args.out)
            device = resolve_device(args.device)
            requests, notes = load_requests(args)
            backbone = load_backbone(
                args.model,
                trust_remote_code=args.trust_remote_code,
                dtype=args.dtype,
                device=device,
                progress=not args.no_progress,
            )
            bar = tqdm(total=len(requests), desc="eval", unit="request", disable=args.no_progress)
            try:
                run_ = score_adapter(backbone, args.adapter, requests, on_request=lambda _: bar.update(1))
            finally:
                bar.close()
            config = {
                "model": args.model,
                "model_class": type(backbone.model).__name__,
                "data": os.path.abspath(args.data),
                "adapter": args.adapter,
                "n_requested": args.n,
                **notes,
            }
            report = build_report(
                run_, config=config, device=str(model_device(backbone.model)), requests=requests
            )
    except (CLIError, ValueError, FileNotFoundError) as exc:
        print(f"odedit-hf eval: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(report))
    print("\n(eval: the adapter was scored, no edit was made; the times above are scoring times)")
    if args.out:
        print(f"results: {write_json_atomic(args.out, report)}")
    return 0

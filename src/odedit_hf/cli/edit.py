"""``odedit-hf edit``: edit facts with a method under a protocol, print the metric table, write results.

Example::

    odedit-hf edit --model ./tiny-llava --data ./world --method ft --protocol single --n 100 --out results.json

``--data`` is an MMEdit JSON file (images relative to ``--image-root``, default the file's folder)
or a folder made by ``odedit-hf world`` (its evaluation file and image roots are found in it).
Method hyperparameters have per-method defaults; flags override them (``--steps``, ``--lr``,
``--stop-loss``, ``--layers``, ``--projections``, ``--rank``, ``--alpha``, ``--norm-constraint``,
and ``--method-arg KEY=VALUE`` for anything else a method takes).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

logger = logging.getLogger(__name__)

_DTYPES = ("auto", "float32", "bfloat16", "float16")
# flags whose value goes to the method factory as a keyword, only when the user gives them
_HYPERPARAMETER_FLAGS = (
    "steps",
    "lr",
    "stop_loss",
    "layers",
    "projections",
    "rank",
    "alpha",
    "norm_constraint",
)


class CLIError(ValueError):
    """A user error the command reports in one line (exit status 2)."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer indices such as '-1' or '1,2', got {text!r}"
        ) from None


def _str_list(text: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return items


def _optional_float(text: str) -> float | None:
    if text.lower() in ("none", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def add_edit_arguments(
    parser: argparse.ArgumentParser, *, with_data: bool = True, n_default: int | None = None
) -> None:
    """The method and protocol flags, shared by ``edit`` and ``demo``."""
    if with_data:
        parser.add_argument("--model", required=True, help="model folder or Hub id (a registered model type)")
        parser.add_argument(
            "--data", required=True, help="MMEdit JSON file, or a world folder made by 'odedit-hf world'"
        )
        parser.add_argument(
            "--image-root",
            help="folder the records' image and m_loc paths are relative to (default: the data file's folder)",
        )
        parser.add_argument(
            "--rephrase-image-root",
            help="folder image_rephrase paths are relative to (default: --image-root)",
        )
        parser.add_argument(
            "--task",
            default="auto",
            choices=("auto", "vqa", "caption"),
            help="task of the records (default: inferred; for a world folder, auto = its VQA file)",
        )
        parser.add_argument(
            "--skip-invalid", action="store_true", help="skip invalid records (counted) instead of failing"
        )
        parser.add_argument(
            "--trust-remote-code",
            action="store_true",
            help="allow model code from the checkpoint (off by default)",
        )
        parser.add_argument("--out", required=True, help="results file (JSON, written atomically)")
    parser.add_argument("--method", default="ft", help="editing method: ft, lora, ... (default: ft)")
    parser.add_argument(
        "--protocol", default="single", choices=("single", "sequential", "batch"), help="default: single"
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, help="edits per optimisation for --protocol batch (default 10)"
    )
    parser.add_argument(
        "--n",
        type=_positive_int,
        default=n_default,
        help=f"edit the first N records (default: {n_default or 'all'})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the run (default 0)")
    hp = parser.add_argument_group("method hyperparameters (default: the method's own)")
    hp.add_argument(
        "--steps", type=_positive_int, default=argparse.SUPPRESS, help="most optimiser steps per edit"
    )
    hp.add_argument("--lr", type=float, default=argparse.SUPPRESS, help="learning rate")
    hp.add_argument(
        "--stop-loss",
        type=_optional_float,
        default=argparse.SUPPRESS,
        help="stop an edit once the loss is below this ('none': never early)",
    )
    hp.add_argument(
        "--layers",
        type=_int_list,
        default=argparse.SUPPRESS,
        help="decoder layers to edit, e.g. '-1' or '1,2' (default: the backbone's)",
    )
    hp.add_argument(
        "--projections",
        type=_str_list,
        default=argparse.SUPPRESS,
        help="FFN projections to edit, comma-separated, e.g. 'mlp.down_proj'",
    )
    hp.add_argument("--rank", type=_positive_int, default=argparse.SUPPRESS, help="LoRA rank")
    hp.add_argument("--alpha", type=float, default=argparse.SUPPRESS, help="LoRA alpha")
    hp.add_argument(
        "--norm-constraint",
        type=_optional_float,
        default=argparse.SUPPRESS,
        help="FT-L: clamp delta entries to [-c, c] ('none': free)",
    )
    hp.add_argument(
        "--method-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other method hyperparameter (VALUE parsed as JSON when it can be)",
    )
    run = parser.add_argument_group("runtime")
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    run.add_argument(
        "--dtype", default="auto", choices=_DTYPES, help="model dtype (default: the checkpoint's)"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_parser(subparsers: Any, name: str = "edit", help: str | None = None) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help,
        description=__doc__.split("\n\n")[0],
    )
    add_edit_arguments(parser)
    try:  # ODEdit's own flags (a light module: argparse only)
        from odedit_hf.odedit.cli_args import add_odedit_arguments
    except ImportError:
        add_odedit_arguments = None
    if add_odedit_arguments is not None:
        add_odedit_arguments(parser)
    if "--save-adapter" not in parser._option_string_actions:
        parser.add_argument(
            "--save-adapter",
            metavar="DIR",
            help="save the adapter holding the last edit (sequential: all edits) to DIR",
        )
    return parser


# --------------------------------------------------------------------------------------- pieces
def method_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The hyperparameters the user set (flags left out keep the method's defaults)."""
    kwargs: dict[str, Any] = {
        flag: getattr(args, flag) for flag in _HYPERPARAMETER_FLAGS if hasattr(args, flag)
    }
    for item in args.method_arg:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--method-arg expects KEY=VALUE, got {item!r}")
        try:
            kwargs[key.replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            kwargs[key.replace("-", "_")] = raw
    return kwargs


def build_method(args: argparse.Namespace) -> Any:
    """The method named by ``--method`` with the user's hyperparameters; unknown names list the known ones."""
    from odedit_hf.editing import available_methods, get_method

    if args.method not in available_methods():
        raise CLIError(f"unknown --method {args.method!r}; choose one of: {', '.join(available_methods())}")
    try:
        if args.method == "odedit" and hasattr(args, "editor"):
            from odedit_hf.odedit.cli_args import method_from_args

            return method_from_args(args)
        return get_method(args.method, **method_kwargs(args))
    except ValueError as exc:
        raise CLIError(str(exc)) from exc


def resolve_device(text: str) -> Any:
    import torch

    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise CLIError(f"--device {text!r} is not a torch device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {text}: CUDA is not available on this machine; use --device cpu")
    return device


def load_backbone(
    model: str, *, trust_remote_code: bool = False, dtype: str = "auto", device: Any = None
) -> Any:
    """Load a model and its processor (safetensors only) and wrap them in a :class:`~odedit_hf.backbones.Backbone`.

    The model type must be in the backbone registry; a multimodal family loads with
    ``AutoModelForImageTextToText`` and ``AutoProcessor``, a text-only one with ``AutoModelForCausalLM``
    and ``AutoTokenizer``.
    """
    import torch
    import transformers

    from odedit_hf.backbones import Backbone, UnsupportedModelError, get_backbone_spec

    looks_local = os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1
    if looks_local and not os.path.isdir(os.path.expanduser(model)):
        raise CLIError(
            f"--model {model!r}: no such model folder; give a saved model folder or a Hub id (org/name)"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise CLIError(
            f"--model {model!r}: cannot load its config ({exc.__class__.__name__}: {str(exc).splitlines()[0]})"
        ) from None
    try:
        spec = get_backbone_spec(config)
    except UnsupportedModelError as exc:
        raise CLIError(f"--model {model!r}: {exc}") from None
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    common = {"trust_remote_code": trust_remote_code}
    if spec.multimodal:
        model_cls = transformers.AutoModelForImageTextToText
        processor = transformers.AutoProcessor.from_pretrained(model, **common)
    else:
        model_cls = transformers.AutoModelForCausalLM
        processor = transformers.AutoTokenizer.from_pretrained(model, **common)
    loaded = model_cls.from_pretrained(model, use_safetensors=True, dtype=torch_dtype, **common)
    if device is not None:
        loaded = loaded.to(device)
    loaded.eval()
    return Backbone(loaded, processor)


def resolve_data(
    data: str, image_root: str | None, rephrase_image_root: str | None, *, task: str = "auto"
) -> tuple[str, str, str | None]:
    """``(mmedit_file, image_root, rephrase_image_root)`` for an MMEdit file or a world folder.

    A world folder (made by ``odedit-hf world`` / ``build_world``; its root or its ``data`` folder)
    gives its evaluation file of ``task`` (``auto`` = VQA) and its image roots.
    """
    if os.path.isdir(data):
        world = _world_at(data)
        if world is None:
            raise CLIError(
                f"--data {data!r} is a folder but not a world folder (no world_info.json in it or its parent); "
                "pass an MMEdit JSON file, or a folder made by 'odedit-hf world'"
            )
        eval_file = world.caption_eval if task == "caption" else world.vqa_eval
        return eval_file, image_root or world.image_root, rephrase_image_root or world.rephrase_image_root
    if not os.path.isfile(data):
        raise CLIError(f"--data {data!r}: no such file or folder")
    root = image_root or os.path.dirname(os.path.abspath(data))
    return data, root, rephrase_image_root


def _world_at(folder: str) -> Any:
    """The :class:`~odedit_hf.data.world.World` whose root (or ``data`` folder) is ``folder``, else ``None``."""
    from odedit_hf.data.world import build_world
    from odedit_hf.data.world.cache import read_info

    folder = os.path.abspath(folder)
    for root in (folder, os.path.dirname(folder)):
        info = read_info(root)
        if info is not None:
            return build_world(
                str(info["preset"]), int(info["seed"]), out=root, progress=False
            )  # a cache hit
    return None


def load_requests(args: argparse.Namespace) -> list[Any]:
    from odedit_hf.data import load_mmedit

    path, root, rephrase_root = resolve_data(
        args.data, args.image_root, args.rephrase_image_root, task=args.task
    )
    try:
        dataset = load_mmedit(
            path, root, rephrase_root, task=args.task, skip_invalid=args.skip_invalid, limit=args.n
        )
    except FileNotFoundError as exc:
        raise CLIError(str(exc)) from None
    if len(dataset) == 0:
        raise CLIError(f"--data {args.data!r}: no valid records to edit")
    if dataset.skipped:
        print(
            f"skipped {dataset.skipped} invalid record(s); first: {dataset.skip_reasons[0]}", file=sys.stderr
        )
    return list(dataset)


def run_edits(
    args: argparse.Namespace, method: Any, backbone: Any, requests: list[Any], *, config: dict[str, Any]
) -> dict[str, Any]:
    """Run the protocol with a progress bar; return the report (see ``odedit_hf.evaluation.build_report``)."""
    from tqdm.auto import tqdm

    from odedit_hf.editing import model_device
    from odedit_hf.evaluation import build_report, run_protocol

    batch_size = args.batch_size
    if args.protocol == "batch" and batch_size is None:
        batch_size = 10
    if args.protocol != "batch" and batch_size not in (None, 1):
        raise CLIError("--batch-size is only meaningful with --protocol batch")
    bar = tqdm(
        total=len(requests), desc=f"{method.name} {args.protocol}", unit="edit", disable=args.no_progress
    )

    def on_edit(index: int, result: Any) -> None:
        bar.update(1)
        bar.set_postfix(rel=f"{result.post.reliability:.2f}", steps=result.steps, refresh=False)

    on_adapter = None
    save_dir = getattr(args, "save_adapter", None)
    if save_dir:

        def on_adapter(peft_model: Any) -> None:
            from odedit_hf.odedit.cli_args import save_adapter

            print(f"adapter saved to {save_adapter(peft_model, save_dir)}", file=sys.stderr)

    try:
        run = run_protocol(
            args.protocol,
            method,
            backbone,
            requests,
            seed=args.seed,
            batch_size=batch_size,
            on_edit=on_edit,
            on_adapter=on_adapter,
        )
    finally:
        bar.close()
    return build_report(run, config=config, device=str(model_device(backbone.model)))


def _method_config(method: Any) -> dict[str, Any]:
    import dataclasses

    if dataclasses.is_dataclass(method):
        return {f.name: getattr(method, f.name) for f in dataclasses.fields(method) if f.init}
    return {}


# ------------------------------------------------------------------------------------------ run
def run(args: argparse.Namespace) -> int:
    from odedit_hf.evaluation import format_table, write_json_atomic

    try:
        method = build_method(args)  # before loading anything: a bad --method fails fast
        device = resolve_device(args.device)
        requests = load_requests(args)
        start = time.perf_counter()
        backbone = load_backbone(
            args.model, trust_remote_code=args.trust_remote_code, dtype=args.dtype, device=device
        )
        load_s = time.perf_counter() - start
        config = {
            "model": args.model,
            "data": os.path.abspath(args.data),
            "method_hyperparameters": _method_config(method),
            "n_requested": args.n,
            "model_load_s": load_s,
        }
        report = run_edits(args, method, backbone, requests, config=config)
    except (CLIError, ValueError, FileNotFoundError) as exc:
        print(f"odedit-hf edit: error: {exc}", file=sys.stderr)
        return 2
    path = write_json_atomic(args.out, report)
    print(format_table(report))
    print(f"\nresults: {path}")
    return 0

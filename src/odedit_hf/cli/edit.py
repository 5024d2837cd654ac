"""``odedit-hf edit``: edit facts with a method under a protocol, print the metric table, write results.

Example::

    odedit-hf edit --model ./tiny-llava --data ./world --method odedit+lora --lora.rank 4 --protocol single --n 100 --out results.json

``--data`` is an MMEdit JSON file (images relative to ``--image-root``, default the file's folder or
its ``images/`` subfolder), a text-only ZsRE or CounterFact file (EasyEdit's layouts; no images), or a
folder made by ``odedit-hf world`` (its evaluation file and image roots are found in it). Fields the
loader does not read are ignored with one warning (``--strict-fields`` makes them an error).
``--method`` names a base editor (``ftl``, ``lora``, ...) or a wrapper around one
(``odedit+lora``); ``odedit-hf methods`` lists them. Every method option is generated from the
method's config dataclass and namespaced by the method (``--odedit.alpha 0.1 --lora.rank 4``), or
read from ``--method-config FILE.json``; an option of a method that ``--method`` does not use is an
error that names it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)

_DTYPES = ("auto", "float32", "bfloat16", "float16")
#: This command takes the generated ``--<method>.<option>`` arguments (see ``odedit_hf.cli.options``).
ACCEPTS_METHOD_OPTIONS = True


class CLIError(ValueError):
    """A user error the command reports in one line (exit status 2)."""


@contextlib.contextmanager
def quiet_known_warnings() -> Iterator[None]:
    """Silence, for the duration of a command, the warnings a user can do nothing about, each matched
    precisely (see :func:`odedit_hf.editing.loading.peft_wrapping_warnings_silenced`)."""
    from odedit_hf.editing.loading import peft_wrapping_warnings_silenced

    with peft_wrapping_warnings_silenced():
        yield


def check_output_file(path: str, *, flag: str = "--out") -> str:
    """Check, before any work, that a results file can be written at ``path``; return its absolute path.

    Catches a folder given as the file, a parent that is a file, and a folder that cannot be written
    (probed by creating and removing a temporary file there), so a long run never ends in a traceback
    that loses its results.

    Raises:
        CLIError: what is wrong with ``path`` and what to do.
    """
    target = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(target):
        raise CLIError(
            f"{flag} {path!r} is a folder; give a file path such as {os.path.join(path, 'results.json')}"
        )
    ancestor = os.path.dirname(target)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise CLIError(f"{flag} {path!r}: {ancestor} is a file, not a folder; give a path inside a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".odedit-hf-probe-", dir=ancestor)
    except OSError as exc:
        raise CLIError(
            f"{flag} {path!r}: cannot write in {ancestor} ({exc.strerror or exc}); give a writable location"
        ) from None
    os.close(fd)
    os.unlink(probe)
    return target


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_edit_arguments(
    parser: argparse.ArgumentParser, *, with_data: bool = True, n_default: int | None = None
) -> None:
    """The method and protocol flags, shared by ``edit`` and ``demo``."""
    if with_data:
        parser.add_argument("--model", required=True, help="model folder or Hub id (a registered model type)")
        parser.add_argument(
            "--data",
            required=True,
            help="MMEdit, ZsRE or CounterFact JSON file, or a world folder made by 'odedit-hf world'",
        )
        parser.add_argument(
            "--image-root",
            help="folder the records' image and m_loc paths are relative to (default: the data file's "
            "folder, or its images/ subfolder when the images are there)",
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
            "--strict-fields",
            action="store_true",
            help="fail on record fields the loader does not read (default: ignore them with one warning)",
        )
        parser.add_argument(
            "--trust-remote-code",
            action="store_true",
            help="allow model code from the checkpoint (off by default)",
        )
        parser.add_argument("--out", required=True, help="results file (JSON, written atomically)")
    parser.add_argument(
        "--method",
        default=None,
        help="editing method: a base editor or wrapper+editor; see 'odedit-hf methods' "
        "(default: odedit_hf.editing.DEFAULT_METHOD, plain FT-L)",
    )
    parser.add_argument(
        "--editor",
        help="the base editor a wrapper method wraps: '--method odedit --editor lora' is '--method odedit+lora'",
    )
    parser.add_argument(
        "--method-config",
        metavar="FILE.json",
        help='method options as JSON, e.g. {"odedit": {"alpha": 0.1}, "lora": {"rank": 8}} (flags override)',
    )
    parser.add_argument(
        "--protocol", default="single", choices=("single", "sequential", "batch"), help="default: single"
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, help="edits per optimisation for --protocol batch (default 10)"
    )
    parser.add_argument(
        "--n",
        "--num-edits",
        dest="n",
        type=_positive_int,
        default=n_default,
        help=f"edit the first N records (default: {n_default or 'all'}; under torchrun write --num-edits, "
        "which torchrun's own parser does not take for its --nnodes/--nproc-per-node)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the run (default 0)")
    run = parser.add_argument_group("runtime")
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    run.add_argument(
        "--dtype", default="auto", choices=_DTYPES, help="model dtype (default: the checkpoint's)"
    )
    run.add_argument(
        "--prompt-format",
        default="auto",
        choices=("auto", "raw", "chat"),
        help="text-only models: 'raw' sends the prompt as plain text, 'chat' through the tokenizer's chat "
        "template (default auto: the template when the model has one; the SmolLM2 fact set was filtered on raw)",
    )
    run.add_argument(
        "--device-map",
        metavar="MAP",
        help="place the model across devices as transformers does: auto, balanced, balanced_low_0, sequential, "
        "or a JSON map {module: device} (needs accelerate; replaces --device)",
    )
    run.add_argument(
        "--max-memory",
        metavar="SPEC",
        help="with --device-map: memory per device, e.g. '0=20GiB,1=20GiB,cpu=64GiB'",
    )
    run.add_argument(
        "--no-memory-check",
        action="store_true",
        help="run even when the memory estimate printed before the run exceeds the device's free memory",
    )
    run.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute the decoder layers' activations in each edit's backward pass (less memory, one "
        "more forward per step; dropout stays off; FT-L, LoRA and ODEdit over them)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_device_map(text: str | None) -> Any:
    """``--device-map``: a strategy name or a JSON ``{module: device}`` map; None when not given."""
    if text is None:
        return None
    if text in ("auto", "balanced", "balanced_low_0", "sequential"):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict) or not value:
        raise CLIError(
            f"--device-map {text!r}: give auto, balanced, balanced_low_0, sequential or a JSON object such as "
            '\'{"": "cpu"}\' or \'{"model.language_model": 0, "lm_head": 0, "model.vision_tower": "cpu"}\''
        )
    return value


def parse_max_memory(text: str | None, device_map: Any) -> dict[Any, str] | None:
    """``--max-memory '0=20GiB,cpu=64GiB'`` -> ``{0: "20GiB", "cpu": "64GiB"}`` (accelerate's form)."""
    if text is None:
        return None
    if device_map is None:
        raise CLIError("--max-memory only applies with --device-map (e.g. --device-map auto)")
    out: dict[Any, str] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or not key or not value:
            raise CLIError(
                f"--max-memory {text!r}: write DEVICE=SIZE pairs separated by commas, e.g. 0=20GiB,cpu=64GiB"
            )
        out[int(key) if key.isdigit() else key] = value
    return out


def add_parser(subparsers: Any, name: str = "edit", help: str | None = None) -> argparse.ArgumentParser:
    from odedit_hf.cli.options import add_methods_help

    parser = subparsers.add_parser(name, help=help, description=__doc__.split("\n\n")[0], add_help=False)
    add_methods_help(parser)
    add_edit_arguments(parser)
    share = parser.add_argument_group("saving and sharing the edited adapter")
    share.add_argument(
        "--save-adapter",
        metavar="DIR",
        help="save the adapter holding every edit of the run to DIR, with a model card, the results and "
        "the edited facts (needs one adapter that holds all edits: --protocol sequential, or batch with "
        "--batch-size >= the number of edits, or single with one edit); DIR must be new or empty",
    )
    share.add_argument(
        "--overwrite",
        action="store_true",
        help="let --save-adapter replace an existing adapter folder (never a folder holding other files)",
    )
    share.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        help="push the adapter with its model card to this Hub repo (as 'odedit-hf push')",
    )
    share.add_argument(
        "--base-model",
        metavar="HUB_ID",
        help="the Hub id of the base model, for the model card (default: --model when it is a Hub id)",
    )
    share.add_argument("--private", action="store_true", help="create the Hub repo private")
    return parser


# --------------------------------------------------------------------------------------- pieces
def method_name(args: argparse.Namespace) -> str:
    """The (composite) method name of ``--method`` and ``--editor``."""
    from odedit_hf.editing import DEFAULT_METHOD

    name = args.method or DEFAULT_METHOD
    editor = getattr(args, "editor", None)
    if editor:
        from odedit_hf.editing import method_class

        try:
            outer = method_class(name.split("+")[-1]) if "+" not in name else None
        except ValueError as exc:
            raise CLIError(f"--method {name!r}: {exc}") from None
        if outer is None or outer.kind != "wrapper":
            raise CLIError(
                f"--editor {editor!r} applies only to a wrapper method given alone (e.g. --method odedit "
                f"--editor lora); --method {name!r} "
                + ("already names its editor" if "+" in name else "is a base editor")
            )
        name = f"{name}+{editor}"
    return name


def build_method(args: argparse.Namespace) -> Any:
    """The method of ``--method`` / ``--editor`` with the generated options the user gave.

    Raises:
        CLIError: unknown method, an option that does not apply to it, a bad value.
    """
    from odedit_hf.cli.options import OptionError, parse_method_options, read_method_config
    from odedit_hf.editing import build_method as build

    name = method_name(args)
    try:
        config = read_method_config(args.method_config) if getattr(args, "method_config", None) else None
        options = parse_method_options(name, getattr(args, "method_options", []), config=config)
        return build(name, options)
    except (OptionError, ValueError) as exc:
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
    model: str,
    *,
    trust_remote_code: bool = False,
    dtype: str = "auto",
    device: Any = None,
    progress: bool = True,
    device_map: Any = None,
    max_memory: dict[Any, str] | None = None,
    prompt_format: str = "auto",
) -> Any:
    """Load a model and its processor (safetensors only) and wrap them in a :class:`~odedit_hf.backbones.Backbone`.

    The model type must be in the backbone registry; a multimodal family loads with
    ``AutoModelForImageTextToText`` and ``AutoProcessor``, a text-only one with ``AutoModelForCausalLM``
    and ``AutoTokenizer``. With ``device_map`` (and ``max_memory``) transformers places the model across
    devices through accelerate, and ``device`` is not used.
    """
    import torch
    import transformers

    from odedit_hf.backbones import Backbone, UnsupportedModelError, get_backbone_spec
    from odedit_hf.editing.loading import ModelFilesError, check_model_folder, check_model_weights

    looks_local = os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1
    if looks_local and not os.path.isdir(os.path.expanduser(model)):
        raise CLIError(
            f"--model {model!r}: no such model folder; give a saved model folder or a Hub id (org/name)"
        )
    local = os.path.isdir(os.path.expanduser(model))
    if local:
        try:
            check_model_folder(os.path.expanduser(model), weights=False)
        except ModelFilesError as exc:
            raise CLIError(f"--model {model!r}: {exc}") from None
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
    if local:  # after the model type: an unsupported model is named before its files are looked at
        try:
            check_model_weights(os.path.expanduser(model))
        except ModelFilesError as exc:
            raise CLIError(f"--model {model!r}: {exc}") from None
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    common = {"trust_remote_code": trust_remote_code}
    if spec.multimodal:
        model_cls = transformers.AutoModelForImageTextToText
        processor = transformers.AutoProcessor.from_pretrained(model, **common)
    else:
        model_cls = transformers.AutoModelForCausalLM
        processor = transformers.AutoTokenizer.from_pretrained(model, **common)
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    if not progress:  # transformers 5 draws a "Loading weights" bar of its own
        hf_logging.disable_progress_bar()
    placement = {}
    if device_map is not None:
        placement["device_map"] = device_map
        if max_memory:
            placement["max_memory"] = max_memory
    try:
        loaded = model_cls.from_pretrained(
            model, use_safetensors=True, dtype=torch_dtype, **placement, **common
        )
    except (OSError, ValueError, SafetensorError) as exc:  # a Hub model; local folders were checked above
        raise CLIError(
            f"--model {model!r}: cannot load its weights ({exc.__class__.__name__}: {str(exc).splitlines()[0]}); "
            "odedit-hf loads safetensors weights only: download or save the model again"
        ) from None
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    if device is not None and device_map is None:
        loaded = loaded.to(device)
    loaded.eval()
    if prompt_format != "auto":
        if spec.multimodal:
            raise CLIError(
                f"--prompt-format {prompt_format} applies to text-only models; {model!r} is multimodal and its "
                "processor decides how images and prompts are wrapped (leave --prompt-format auto)"
            )
        has_template = bool(getattr(processor, "chat_template", None))
        if prompt_format == "chat" and not has_template:
            raise CLIError(f"--prompt-format chat: the tokenizer of {model!r} has no chat template; use raw")
        if prompt_format == "raw" and has_template:
            import copy

            processor = copy.copy(processor)  # the model folder's tokenizer is left as it is
            processor.chat_template = None
    return Backbone(loaded, processor)


def placement(model: Any) -> dict[str, str]:
    """Where the model's modules are: transformers' ``hf_device_map`` when it spans several devices, else
    ``{"": device}`` (transformers 5 sets no map for a model on one device)."""
    mapping = getattr(model, "hf_device_map", None)
    if mapping:
        return {str(k): str(v) for k, v in mapping.items()}
    devices = sorted({str(p.device) for p in model.parameters()})
    return {"": devices[0]} if len(devices) == 1 else {"": ",".join(devices)}


def memory_check(args: argparse.Namespace, method: Any, backbone: Any, requests: list[Any]) -> dict[str, Any]:
    """Print the memory estimate of the run (stderr); refuse a run that cannot fit unless --no-memory-check."""
    from odedit_hf.editing.memory import estimate_edit_memory

    batch = (args.batch_size or 10) if args.protocol == "batch" else 1
    estimate = estimate_edit_memory(
        method,
        backbone,
        requests,
        batch_size=batch,
        gradient_checkpointing=getattr(args, "gradient_checkpointing", False),
    )
    state = getattr(args, "_distributed", None)
    if state is None or state.is_main_process:
        print(estimate.format(), file=sys.stderr)
    if not estimate.fits() and not getattr(args, "no_memory_check", False):
        raise CLIError(
            f"the run is estimated to need {estimate.needed / 2**30:.2f} GiB on {estimate.device} beyond the loaded "
            f"model, which leaves {(estimate.available or 0) / 2**30:.2f} GiB free: try --dtype bfloat16, --device-map auto (with "
            "--max-memory), a smaller --batch-size or a smaller method (e.g. --method lora); "
            "--no-memory-check runs anyway"
        )
    return estimate.as_dict()


def resolve_data(
    data: str, image_root: str | None, rephrase_image_root: str | None, *, task: str = "auto"
) -> tuple[str, str | None, str | None]:
    """``(data_file, image_root, rephrase_image_root)`` for a data file or a world folder (a file's roots
    stay ``None`` unless given: :func:`odedit_hf.data.load_edits` then finds them next to the file).

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
    return data, image_root, rephrase_image_root  # no root: the loader's default (the file's folder)


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


class _DropLoaderSkipWarning(logging.Filter):
    """Drops the loader's own "skipped N invalid record(s)" warning: the CLI reports the skips itself,
    once, pointing at the results file rather than at ``dataset.skip_reasons``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "skipped %d invalid record(s)" not in str(record.msg)


def load_requests(args: argparse.Namespace) -> tuple[list[Any], dict[str, Any]]:
    """The requests to edit and what the results file should record about them
    (``{"data_file", "skipped", "skip_reasons"}``); reports skipped records and a short file once."""
    from odedit_hf.data import load_edits

    path, root, rephrase_root = resolve_data(
        args.data, args.image_root, args.rephrase_image_root, task=args.task
    )
    loader_logger = logging.getLogger("odedit_hf.data.loader")
    quiet = _DropLoaderSkipWarning()
    loader_logger.addFilter(quiet)
    try:
        dataset = load_edits(
            path,
            root,
            rephrase_root,
            task=args.task,
            skip_invalid=args.skip_invalid,
            limit=args.n,
            strict_fields=getattr(args, "strict_fields", False),
        )
    except FileNotFoundError as exc:
        raise CLIError(str(exc)) from None
    finally:
        loader_logger.removeFilter(quiet)
    if len(dataset) == 0:
        raise CLIError(f"--data {args.data!r}: no valid records to edit")
    notes: dict[str, Any] = {"data_file": os.path.abspath(path), "skipped": dataset.skipped}
    if dataset.skipped:
        notes["skip_reasons"] = list(dataset.skip_reasons)
        shown = dataset.skip_reasons[:3]
        more = f" (and {dataset.skipped - len(shown)} more)" if dataset.skipped > len(shown) else ""
        print(
            f"warning: skipped {dataset.skipped} invalid record(s) of {path}{more}; every reason is in the "
            "results file under config.skip_reasons:\n  " + "\n  ".join(shown),
            file=sys.stderr,
        )
    if args.n is not None and len(dataset) < args.n:
        print(
            f"warning: --n {args.n} asked for {args.n} edits, but {path} holds only {len(dataset)} valid "
            f"record(s){f' ({dataset.skipped} skipped)' if dataset.skipped else ''}: editing {len(dataset)}",
            file=sys.stderr,
        )
    return list(dataset), notes


def check_model_fits_requests(model: str, requests: list[Any], *, trust_remote_code: bool = False) -> None:
    """Before the weights load: records with images on a text-only model are an error (from the model's
    config alone; a config that cannot be read is left to :func:`load_backbone` to report)."""
    import transformers

    from odedit_hf.backbones import UnsupportedModelError, get_backbone_spec
    from odedit_hf.evaluation import check_requests_fit

    if all(r.text_only for r in requests):
        return
    try:
        config = transformers.AutoConfig.from_pretrained(
            os.path.expanduser(model), trust_remote_code=trust_remote_code
        )
        spec = get_backbone_spec(config)
    except (OSError, ValueError, UnsupportedModelError):
        return
    try:
        check_requests_fit(requests, spec.multimodal, spec.model_type)
    except ValueError as exc:
        raise CLIError(f"--model {model!r} with --data: {exc}") from None


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
    save_dir = getattr(args, "_adapter_dir", None)
    if save_dir:

        def on_adapter(peft_model: Any) -> None:
            from odedit_hf.editing.saving import save_adapter

            save_adapter(peft_model, save_dir, overwrite=getattr(args, "overwrite", False))

    state = getattr(args, "_distributed", None)
    try:
        if state is not None:
            from odedit_hf.evaluation.distributed import run_protocol_distributed

            run = run_protocol_distributed(
                args.protocol,
                method,
                backbone,
                requests,
                state=state,
                seed=args.seed,
                batch_size=batch_size,
                on_edit=on_edit,
                gradient_checkpointing=getattr(args, "gradient_checkpointing", False),
            )
            if run is None:  # not the main process: its rows went to the main one
                return {}
        else:
            run = run_protocol(
                args.protocol,
                method,
                backbone,
                requests,
                seed=args.seed,
                batch_size=batch_size,
                on_edit=on_edit,
                on_adapter=on_adapter,
                gradient_checkpointing=getattr(args, "gradient_checkpointing", False),
            )
    finally:
        bar.close()
    report = build_report(run, config=config, device=str(model_device(backbone.model)), requests=requests)
    if state is not None:
        report["rollback"]["processes"] = run.processes
        report["config"]["num_processes"] = state.num_processes
    return report


def check_adapter_flags(args: argparse.Namespace, n_edits: int) -> None:
    """Check ``--save-adapter`` / ``--overwrite`` / ``--push-to-hub`` before the model loads.

    Sets ``args._adapter_dir`` (the folder the run saves its adapter to, a temporary one for a push
    without ``--save-adapter``) or leaves it ``None``.
    """
    from odedit_hf.editing.saving import check_adapter_target

    save_dir = getattr(args, "save_adapter", None)
    push = getattr(args, "push_to_hub", None)
    args._adapter_dir = None
    if getattr(args, "overwrite", False) and not save_dir:
        raise CLIError("--overwrite applies to --save-adapter DIR; give the folder to replace")
    if getattr(args, "base_model", None) and not (save_dir or push):
        raise CLIError(
            "--base-model names the base model in the model card; use it with --save-adapter or --push-to-hub"
        )
    if not (save_dir or push):
        return
    flag = "--save-adapter" if save_dir else "--push-to-hub"
    from odedit_hf.sharing.card import adapter_protocol_problem

    problem = adapter_protocol_problem(args.protocol, n_edits, args.batch_size)
    if problem is not None:
        raise CLIError(f"{flag}: {problem}")
    if push:
        from odedit_hf.sharing import check_repo_id

        try:
            check_repo_id(push)
        except ValueError as exc:
            raise CLIError(f"--push-to-hub: {exc}") from None
    if save_dir:
        try:
            args._adapter_dir = check_adapter_target(save_dir, overwrite=args.overwrite)
        except ValueError as exc:
            raise CLIError(f"--save-adapter: {exc}") from None
    else:
        args._adapter_dir = os.path.join(tempfile.mkdtemp(prefix="odedit-hf-push-"), "adapter")


def finish_adapter(args: argparse.Namespace, report: dict[str, Any], requests: list[Any]) -> None:
    """Add the model card, the results and the edited facts to the saved adapter; push it if asked."""
    import json

    from odedit_hf.editing.saving import write_adapter_files
    from odedit_hf.evaluation import write_json_atomic
    from odedit_hf.sharing import edited_facts, model_card, push_adapter

    folder = args._adapter_dir
    facts = edited_facts(requests)
    card = model_card(
        report, base_model=args.base_model, facts=facts, repo_id=args.push_to_hub, adapter_dir=folder
    )
    write_adapter_files(folder, {"README.md": card, "edited_facts.json": json.dumps(facts, indent=2) + "\n"})
    write_json_atomic(os.path.join(folder, "odedit_results.json"), report)  # as --out: strict JSON
    if args.save_adapter:
        print(f"adapter (with model card, results and edited facts): {folder}", file=sys.stderr)
    if args.push_to_hub:
        url = push_adapter(folder, args.push_to_hub, base_model=args.base_model, private=args.private)
        print(f"pushed to the Hub: {url}", file=sys.stderr)


# ------------------------------------------------------------------------------------------ run
def run(args: argparse.Namespace) -> int:
    from odedit_hf.evaluation import format_table, write_json_atomic

    args._adapter_dir = None
    from odedit_hf.evaluation.distributed import distributed_state

    state = args._distributed = distributed_state()
    main_process = state is None or state.is_main_process
    try:
        with quiet_known_warnings():
            method = build_method(args)  # before loading anything: a bad --method fails fast
            if getattr(args, "gradient_checkpointing", False):
                from odedit_hf.editing.checkpointing import check_supported

                check_supported(method)
            check_output_file(args.out)
            device = resolve_device(args.device)
            if state is not None:
                if args.save_adapter or args.push_to_hub or args.device_map:
                    raise CLIError(
                        "under torchrun/accelerate launch each process edits its share of the requests on its "
                        "own replica: --save-adapter, --push-to-hub and --device-map need one process"
                    )
                device = state.device
                args.no_progress = args.no_progress or not state.is_main_process
            requests, notes = load_requests(args)
            check_model_fits_requests(args.model, requests, trust_remote_code=args.trust_remote_code)
            check_adapter_flags(args, len(requests))
            start = time.perf_counter()
            device_map = parse_device_map(args.device_map)
            max_memory = parse_max_memory(args.max_memory, device_map)
            backbone = load_backbone(
                args.model,
                trust_remote_code=args.trust_remote_code,
                dtype=args.dtype,
                device=device,
                progress=not args.no_progress,
                device_map=device_map,
                max_memory=max_memory,
                prompt_format=args.prompt_format,
            )
            load_s = time.perf_counter() - start
            memory = memory_check(args, method, backbone, requests)
            config = {
                "model": args.model,
                "model_class": type(backbone.model).__name__,
                "base_model": args.base_model,
                "data": os.path.abspath(args.data),
                "method": method.resolved_config(),
                "n_requested": args.n,
                "model_load_s": load_s,
                "device_map": placement(backbone.model) if args.device_map else None,
                "memory_estimate": memory,
                "prompt_format": "chat" if backbone.uses_chat_template else "raw",
                "gradient_checkpointing": bool(getattr(args, "gradient_checkpointing", False)),
                **notes,
            }
            report = run_edits(args, method, backbone, requests, config=config)
            if not main_process:
                return 0
            path = write_json_atomic(args.out, report)
            print(format_table(report))
            print(f"\nresults: {path}")
            if args._adapter_dir:
                finish_adapter(args, report, requests)
    except (CLIError, ValueError, FileNotFoundError) as exc:
        print(f"odedit-hf edit: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if args._adapter_dir and not args.save_adapter:  # the temporary folder of a push
            import shutil

            shutil.rmtree(os.path.dirname(args._adapter_dir), ignore_errors=True)
    return 0

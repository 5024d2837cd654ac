"""``odedit-hf train-editor``: train an editor that learns before it edits, write its artefact folder.

Example::

    odedit-hf train-editor --method mend --model ./world/model --data world:tiny:0 --out ./mend-tiny
    odedit-hf edit --model ./world/model --data ./world --method mend --mend.editor-weights ./mend-tiny --out r.json

``--data`` is ``world:PRESET[:SEED]`` (the embedded world's VQA and caption train files), a world folder,
or a train file (MMEdit, ZsRE or CounterFact JSON). A share of it (``--val-fraction``) is held out for
validation and early stopping. The artefact (safetensors weights, the editor's config, the training
arguments and history, and the identity of the base model) is written atomically: an existing artefact is
replaced only with ``--overwrite``, and a folder holding anything else never. Method options
(``--mend.layers 0,1``, ``--mend.rank 256``) are generated from the method's dataclass as for ``edit``;
training options are the fields of ``MENDTrainingArguments`` (``transformers.TrainingArguments`` plus
MEND's own), as ``--train.<field> VALUE`` (e.g. ``--train.num-train-epochs 4 --train.edit-weight 0.5``).
``--method odedit+mend`` meta-trains MEND's hypernetwork under ODEdit's objective (``--odedit.alpha 0.2``,
``--train.lambda-learning-rate 0.05``; edit with ``--method mend --mend.editor-weights DIR``).
``--method serac`` trains SERAC's scope classifier and counterfactual model (``--train.<field>``: a
``SERACTrainingConfig`` or ``TrainingArguments`` field; edit with ``--method serac --serac.editor-weights DIR``);
``--method ike`` needs no training (its index is built at edit time).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any

#: This command takes the generated ``--<method>.<option>`` and ``--train.<field>`` arguments.
ACCEPTS_METHOD_OPTIONS = True


def add_parser(
    subparsers: Any, name: str = "train-editor", help: str | None = None
) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help,
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 3)[-1].replace("``", "'"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--method", required=True, help="the editor to train: mend, odedit+mend, serac")
    parser.add_argument("--model", required=True, help="the base model folder or Hub id the editor is for")
    parser.add_argument("--data", required=True, help="world:PRESET[:SEED], a world folder, or a train file")
    parser.add_argument("--out", required=True, help="the artefact folder (must be new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing artefact at --out")
    parser.add_argument(
        "--val-fraction", type=float, default=0.1, help="share held out for validation (default 0.1)"
    )
    parser.add_argument("--n", "--max-records", dest="n", type=int, help="use the first N training records")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the network and the Trainer")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: the Trainer's choice)")
    parser.add_argument(
        "--prompt-format",
        default="auto",
        choices=("auto", "raw", "chat"),
        help="text-only models: 'raw' plain prompts, 'chat' the tokenizer's chat template (default auto: the "
        "template when there is one); train in the format you will edit in (odedit-hf edit --prompt-format)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _training_fields(method: str = "mend") -> dict[str, Any]:
    if method == "serac":
        from odedit_hf.editors.serac import SERACTrainingArguments, SERACTrainingConfig

        return {
            f.name: f
            for cls in (SERACTrainingArguments, SERACTrainingConfig)
            for f in dataclasses.fields(cls)
            if f.init
        }
    from odedit_hf.editors.mend.trainer import MENDTrainingArguments

    return {f.name: f for f in dataclasses.fields(MENDTrainingArguments) if f.init}


def split_options(method: str, argv: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(method options, training overrides)`` from the arguments argparse left over.

    Raises:
        ValueError: an argument that is neither ``--<method>.<option>`` nor ``--train.<field>``, or a bad value.
    """
    from odedit_hf.cli.options import OptionError, _convert, _field_type, parse_method_options

    method_args: list[str] = []
    training: dict[str, Any] = {}
    fields = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--train."):
            key, eq, value = arg[len("--train.") :].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise OptionError(f"{arg}: expected a value")
                value, i = argv[i + 1], i + 1
            fields = fields or _training_fields(method)
            name = key.replace("-", "_")
            if name not in fields:
                what = (
                    "SERACTrainingConfig or SERACTrainingArguments (transformers.TrainingArguments)"
                    if method == "serac"
                    else "MENDTrainingArguments (transformers.TrainingArguments plus edit_weight, loc_weight, "
                    "edit_lr_learning_rate, norm_samples, early_stopping_patience)"
                )
                raise OptionError(f"--train.{key}: not a field of {what}")
            annotation = _field_type(fields[name].type)
            try:
                training[name] = _convert(annotation, value)
            except ValueError as exc:
                raise OptionError(f"--train.{key}: {exc}") from None
        else:
            method_args.append(arg)
            if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                method_args.append(argv[i + 1])
                i += 1
        i += 1
    options: dict[str, Any] = {}
    if method_args:
        parsed = parse_method_options(method, method_args)
        # a composite method (odedit+mend) keeps its options namespaced by part
        options = parsed if "+" in method else parsed.get(method, {})
    return options, training


def run(args: argparse.Namespace) -> int:
    from odedit_hf.training import not_trainable_reason, train_editor

    try:
        reason = not_trainable_reason(args.method)
        if reason is not None:
            raise ValueError(f"--method {args.method}: {reason}")
        options, training = split_options(args.method, list(getattr(args, "method_options", [])))
        from odedit_hf.cli.edit import quiet_known_warnings, resolve_device

        device = None if args.device is None else str(resolve_device(args.device))
        start = time.perf_counter()
        with quiet_known_warnings():
            result = train_editor(
                args.method,
                args.model,
                args.data,
                args.out,
                overwrite=args.overwrite,
                options=options,
                training=training,
                val_fraction=args.val_fraction,
                seed=args.seed,
                limit=args.n,
                device=device,
                progress=not args.no_progress,
                prompt_format=args.prompt_format,
            )
    except ValueError as exc:  # CLIError, OptionError and the library's errors are ValueErrors
        print(f"odedit-hf train-editor: error: {exc}", file=sys.stderr)
        return 2
    from odedit_hf.training import is_main_process

    if not is_main_process():
        return 0  # the main process wrote the artefact and reports it (once)
    curve = result.eval_curve()
    print(
        f"trained {args.method} on {result.num_train} requests ({result.num_val} held out) in "
        f"{result.train_seconds:.1f} s ({result.global_step} steps; {time.perf_counter() - start:.1f} s in all)"
    )
    if curve:
        best = result.best_metric
        print(f"validation: {len(curve)} evaluations, best eval_loss {best:.4g} at step {result.best_step}")
    print(f"artefact: {result.path}")
    return 0

"""Command-line flags of ``odedit-hf edit --method odedit`` (wired in by ``odedit_hf.cli.edit``).

``add_odedit_arguments(parser)`` adds an "ODEdit" argument group; ``method_from_args(args)`` builds the
:class:`~odedit_hf.odedit.method.ODEditMethod` (the editor's own flags — ``--steps``, ``--lr``,
``--layers``, ``--rank``, ``--alpha`` ... — configure the wrapped editor); ``save_adapter(peft_model,
directory)`` writes the adapter holding the edits as a standard PEFT adapter directory, atomically.
Flags left out keep :class:`~odedit_hf.odedit.config.ODEditConfig`'s defaults.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from typing import Any

__all__ = ["add_odedit_arguments", "method_from_args", "objective_from_args", "save_adapter"]

# flag destination -> ODEditConfig field
_OBJECTIVE_FLAGS: dict[str, str] = {
    "odedit_alpha": "alpha",
    "odedit_beta": "beta",
    "num_rephrases": "num_rephrases",
    "rephrase_kinds": "rephrase_kinds",
    "irm_environments": "irm_environments",
    "gen_positions": "gen_positions",
    "loc_positions": "loc_positions",
    "lambda_mode": "lambda_mode",
    "lambda_init": "lambda_init",
    "lambda_lr": "lambda_lr",
    "lambda_hidden_size": "lambda_hidden_size",
    "sketch_dim": "sketch_dim",
    "mmd_bandwidth_multipliers": "mmd_bandwidth_multipliers",
    "kernel_backend": "kernel_backend",
}


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _names(text: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    if not names or any(n not in allowed for n in names):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {', '.join(allowed)}, got {text!r}"
        )
    return names


def _kinds(text: str) -> tuple[str, ...]:
    from .config import REPHRASE_KINDS  # imported when the flag is given: `--help` stays light

    return _names(text, REPHRASE_KINDS)


def _environments(text: str) -> tuple[str, ...]:
    from .config import IRM_ENVIRONMENTS

    return _names(text, IRM_ENVIRONMENTS)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_odedit_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ODEdit flags (an argument group) to ``parser``; all default to ODEditConfig's values."""
    group = parser.add_argument_group("ODEdit (--method odedit)")
    sup = argparse.SUPPRESS
    group.add_argument("--editor", default="ft", help="base editor ODEdit wraps: ft, lora, ... (default: ft)")
    group.add_argument("--odedit-alpha", type=float, default=sup, help="weight of R_loc (default 0.1)")
    group.add_argument("--odedit-beta", type=float, default=sup, help="weight of R_gen (default 0.1)")
    group.add_argument("--no-loc-risk", action="store_true", help="ablation: drop R_loc")
    group.add_argument("--no-gen-risk", action="store_true", help="ablation: drop R_gen")
    group.add_argument("--no-irm", action="store_true", help="ablation: drop the IRM-TV penalty")
    group.add_argument(
        "--gen-both-sides",
        action="store_true",
        help="let R_gen's gradient flow through the edit prompt too (default: the edit prompt is the anchor)",
    )
    group.add_argument(
        "--num-rephrases", type=_positive_int, default=sup, help="rephrase prompts per kind (default 1)"
    )
    group.add_argument(
        "--rephrase-kinds", type=_kinds, default=sup, help="'rephrase,image_rephrase' (default both)"
    )
    group.add_argument(
        "--irm-environments",
        type=_environments,
        default=sup,
        help="environments in the IRM-TV penalty, e.g. 'ood' (default in_distribution,neighbours,ood)",
    )
    group.add_argument(
        "--gen-positions", choices=("answer", "last_prompt"), default=sup, help="MMD sample positions"
    )
    group.add_argument(
        "--loc-positions", choices=("answer", "all"), default=sup, help="rows of the locality KL"
    )
    group.add_argument(
        "--lambda-mode",
        choices=("params", "sketch", "fixed"),
        default=sup,
        help="input of the lambda network",
    )
    group.add_argument("--lambda-init", type=float, default=sup, help="initial lambda (default 0.001)")
    group.add_argument(
        "--lambda-lr", type=float, default=sup, help="dual learning rate (default 0.1, SGD ascent)"
    )
    group.add_argument("--lambda-hidden-size", type=_positive_int, default=sup, help="lambda network width")
    group.add_argument("--sketch-dim", type=_positive_int, default=sup, help="sketch size k (sketch mode)")
    group.add_argument(
        "--mmd-bandwidth-multipliers",
        type=_float_list,
        default=sup,
        help="bandwidths as multiples of the median distance, e.g. '0.5,1,2'",
    )
    group.add_argument(
        "--kernel-backend", choices=("auto", "triton", "torch"), default=sup, help="kernel backend"
    )
    group.add_argument(
        "--save-adapter",
        metavar="DIR",
        default=None,
        help="after a sequential or batch run, save the adapter holding the edits to DIR (a PEFT adapter folder)",
    )


def objective_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ODEditConfig hyperparameters set on the command line."""
    objective = {
        field: getattr(args, dest) for dest, field in _OBJECTIVE_FLAGS.items() if hasattr(args, dest)
    }
    if getattr(args, "no_loc_risk", False):
        objective["loc_risk"] = False
    if getattr(args, "no_gen_risk", False):
        objective["gen_risk"] = False
    if getattr(args, "no_irm", False):
        objective["irm_penalty"] = False
    if getattr(args, "gen_both_sides", False):
        objective["gen_anchor_edit"] = False
    return objective


def method_from_args(args: argparse.Namespace) -> Any:
    """The ODEdit method for ``args``: ``--editor`` with the editor flags, wrapped with the ODEdit flags.

    ``--method-arg KEY=VALUE`` pairs whose KEY is an ODEdit hyperparameter (other than ``alpha``/``beta``,
    which are LoRA's; use ``odedit_alpha``/``odedit_beta``) go to the objective, the others to the editor.

    Raises:
        ValueError: unknown editor, bad hyperparameters (the message says which).
    """
    from odedit_hf.editing import get_method

    from .method import ODEditMethod, objective_field_names

    try:
        from odedit_hf.cli.edit import method_kwargs
    except ImportError:  # pragma: no cover - the edit CLI is always there in a full install
        method_kwargs = None
    kwargs = method_kwargs(args) if method_kwargs is not None else {}
    names = set(objective_field_names()) - {"alpha", "beta"}
    objective: dict[str, Any] = {}
    editor_kwargs: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in ("odedit_alpha", "odedit_beta"):
            objective[key.removeprefix("odedit_")] = value
        elif key in names:
            objective[key] = value
        else:
            editor_kwargs[key] = value
    objective.update(objective_from_args(args))
    editor_name = getattr(args, "editor", "ft")
    if editor_name == "odedit":
        raise ValueError(
            "--editor odedit: ODEdit cannot wrap itself; choose a base editor such as ft or lora"
        )
    editor = get_method(editor_name, **editor_kwargs)
    return ODEditMethod(editor=editor, objective=objective)


def save_adapter(peft_model: Any, directory: str | os.PathLike[str]) -> str:
    """Write the active adapter of ``peft_model`` to ``directory`` (``adapter_config.json`` +
    ``adapter_model.safetensors``), atomically: into a temporary sibling folder, then renamed.

    Returns:
        The absolute path written. An existing folder there is replaced.
    """
    target = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(target) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".adapter-", dir=parent)
    try:
        peft_model.save_pretrained(tmp, selected_adapters=[peft_model.active_adapter])
        # save_pretrained puts a non-default adapter in a subfolder named after it
        name = peft_model.active_adapter
        written = tmp if name == "default" else os.path.join(tmp, name)
        if os.path.isdir(target):
            old = tempfile.mkdtemp(prefix=".adapter-old-", dir=parent)
            os.replace(target, os.path.join(old, "x"))
            os.replace(written, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(written, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

"""Editor training as a first-class step: :func:`train_editor` (and ``odedit-hf train-editor``).

Editors that learn before they edit are trained on a train split (the embedded world's ``*_train.json``
files, or any MMEdit / ZsRE / CounterFact file) through a ``transformers.Trainer`` subclass, and the result
is written as a safetensors artefact folder that ``odedit-hf edit --method NAME --NAME.editor_weights DIR``
loads. Built: MEND (:mod:`odedit_hf.editors.mend.trainer`; ``odedit+mend`` under ODEdit's objective) and SERAC
(:mod:`odedit_hf.editors.serac.trainer`). IKE needs no training
step (its demonstration index is built from the train split at edit time and cached).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from odedit_hf.backbones import Backbone
    from odedit_hf.data import EditRequest

logger = logging.getLogger(__name__)

__all__ = [
    "TRAINABLE_METHODS",
    "TrainedEditor",
    "load_train_requests",
    "not_trainable_reason",
    "train_editor",
]

#: The methods :func:`train_editor` trains.
TRAINABLE_METHODS: tuple[str, ...] = ("mend", "odedit+mend", "serac")


def not_trainable_reason(method: str) -> str | None:
    """Why ``method`` cannot be trained by :func:`train_editor` (``None`` when it can)."""
    if method in TRAINABLE_METHODS:
        return None
    if method == "ike":
        return (
            "IKE has no training step: its demonstration index is built from the train split at edit time (the first "
            "edit) and cached on disk (odedit-hf edit --method ike --ike.demos world:tiny:0 or --ike.demos "
            "TRAIN_FILE; see docs/editors/ike.md)"
        )
    from odedit_hf.editing import available_methods, method_class

    try:
        cls = method_class(method)
    except ValueError:
        return f"unknown method {method!r}; train-editor supports: {', '.join(TRAINABLE_METHODS)}"
    if cls.kind == "wrapper":
        return f"{method!r} is a wrapper method; train-editor trains base editors ({', '.join(TRAINABLE_METHODS)})"
    del available_methods
    return f"{cls.name!r} learns nothing before editing; train-editor trains: {', '.join(TRAINABLE_METHODS)}"


@dataclass
class TrainedEditor:
    """What :func:`train_editor` produced.

    Attributes:
        path: the artefact folder.
        train_seconds: wall time of the Trainer's training loop (statistics pass and evaluations included).
        total_seconds: wall time of the whole call (loading, training, writing).
        num_train, num_val: requests in the training and validation parts.
        best_metric, best_step: the best validation value of ``metric_for_best_model`` and its step.
        global_step: the optimiser steps taken (fewer than planned when early stopping stopped training).
        history: the Trainer's log history (training logs and evaluations).
    """

    path: str
    train_seconds: float
    total_seconds: float
    num_train: int
    num_val: int
    best_metric: float | None
    best_step: int | None
    global_step: int
    history: list[dict[str, Any]] = field(default_factory=list)

    def eval_curve(self) -> list[dict[str, float]]:
        """The evaluations of the history: ``step`` and every ``eval_*`` value."""
        return [
            {"step": float(h["step"]), **{k: float(v) for k, v in h.items() if k.startswith("eval_")}}
            for h in self.history
            if "eval_loss" in h
        ]


def _world_root(path: str) -> str | None:
    from odedit_hf.data.world.cache import read_info

    path = os.path.abspath(path)
    for root in (path, os.path.dirname(path)):
        if os.path.isdir(root) and read_info(root) is not None:
            return root
    return None


def load_train_requests(data: str | Sequence[Any], *, limit: int | None = None) -> list[EditRequest]:
    """The training requests of ``data``.

    Args:
        data: ``world:PRESET[:SEED]`` (the embedded world's VQA and caption train files, built or read from
            the cache), a world folder (``odedit-hf world`` / ``build_world``), an edit file (MMEdit, ZsRE or
            CounterFact JSON; MMEdit images relative to the file's folder or its ``images/``), or the
            requests themselves.
        limit: keep the first ``limit`` requests.

    Raises:
        ValueError: an unreadable source or no request in it.
    """
    from odedit_hf.data import EditRequest, load_edits

    if not isinstance(data, (str, os.PathLike)):
        requests = list(data)
        if not all(isinstance(r, EditRequest) for r in requests):
            raise ValueError(
                "train_editor: data must be a path, world:PRESET[:SEED] or a list of EditRequest"
            )
    else:
        data = os.fspath(data)
        files: list[tuple[str, str | None]] = []
        if data.startswith("world:"):
            parts = data.split(":")
            if len(parts) > 3 or not parts[1] or (len(parts) == 3 and not parts[2].isdigit()):
                raise ValueError(
                    f"train_editor data {data!r}: expected world:PRESET[:SEED], e.g. world:tiny:0"
                )
            from odedit_hf.data.world import build_world

            world = build_world(parts[1], int(parts[2]) if len(parts) == 3 else 0, progress=False)
            files = [(world.vqa_train, world.image_root), (world.caption_train, world.image_root)]
        elif os.path.isdir(data):
            root = _world_root(data)
            if root is None:
                raise ValueError(
                    f"train_editor data {data!r} is a folder but not a world folder (no world_info.json); give a "
                    "train file (MMEdit/ZsRE/CounterFact JSON), a world folder or world:PRESET[:SEED]"
                )
            image_root = os.path.join(root, "data", "images")
            files = [
                (os.path.join(root, "data", name), image_root)
                for name in ("evqa_train.json", "eic_train.json")
            ]
            files = [f for f in files if os.path.isfile(f[0])]
        elif os.path.isfile(data):
            files = [(data, None)]
        else:
            raise ValueError(
                f"train_editor data {data!r}: no such file or folder (or give world:PRESET[:SEED])"
            )
        requests = []
        for path, image_root in files:
            kwargs = (
                {} if image_root is None else {"image_root": image_root, "rephrase_image_root": image_root}
            )
            requests.extend(load_edits(path, **kwargs))
    if limit is not None:
        requests = requests[:limit]
    if len(requests) < 2:
        raise ValueError(
            f"train_editor: {len(requests)} training request(s) in {data if isinstance(data, str) else 'data'}; "
            "need at least 2 (one to train on, one to validate on)"
        )
    return requests


def _split(requests: list[Any], val_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    if not 0 < val_fraction < 1:
        raise ValueError(f"train_editor: val_fraction must be in (0, 1), got {val_fraction!r}")
    order = list(range(len(requests)))
    random.Random(seed).shuffle(order)
    n_val = min(len(requests) - 1, max(1, round(val_fraction * len(requests))))
    val = [requests[i] for i in sorted(order[:n_val])]
    train = [requests[i] for i in sorted(order[n_val:])]
    return train, val


def check_out_dir(out: str, *, overwrite: bool = False) -> str:
    """Check, before any work, that an artefact can be written at ``out``; return its absolute path.

    ``out`` must not exist, or be an empty folder, or (with ``overwrite``) hold an artefact of odedit-hf's
    editor training (its ``mend_config.json``): a folder holding anything else is never replaced.

    Raises:
        ValueError: what is wrong with ``out`` and what to do.
    """
    from odedit_hf.editors.mend.hypernet import ARTEFACT_CONFIG
    from odedit_hf.editors.serac.artefact import CONFIG_NAME as SERAC_CONFIG

    target = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(target):
        if not os.path.isdir(target):
            raise ValueError(f"--out {out!r} is a file; give a folder path for the artefact")
        content = os.listdir(target)
        if content:
            if ARTEFACT_CONFIG not in content and SERAC_CONFIG not in content:
                raise ValueError(
                    f"--out {out!r} is a folder holding other files (not a trained-editor artefact); it is never "
                    "replaced: give a new folder"
                )
            if not overwrite:
                raise ValueError(
                    f"--out {out!r} already holds a trained editor; pass --overwrite to replace it"
                )
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise ValueError(f"--out {out!r}: cannot write in {parent}; give a writable location")
    return target


def is_main_process() -> bool:
    """Whether this is the process that writes: rank 0 of the process group, or before one is set up, of
    the launcher's environment (``torchrun`` / ``accelerate launch``: ``RANK``; ``mpirun``: its own); the
    only process when none is distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name]) == 0
    return True


def _wait_for_everyone() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _write_artefact(target: str, write: Any) -> None:
    """On the main process only: ``write(stage)`` into a fresh sibling folder of ``target``, then move it to
    ``target`` (:func:`_install`); the stage is removed when ``write`` fails. Every process then waits
    until the artefact is in place."""
    if is_main_process():
        stage = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=os.path.dirname(target))
        from odedit_hf.editing.saving import default_mode

        os.chmod(stage, default_mode(directory=True))  # mkdtemp's 0700 would stay on the artefact folder
        try:
            write(stage)
            _install(stage, target)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    _wait_for_everyone()


def _install(stage: str, target: str) -> None:
    """Move the finished ``stage`` folder to ``target`` (replacing an existing one in two renames)."""
    if os.path.exists(target):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(target))
        os.rmdir(old)
        os.replace(target, old)
        os.replace(stage, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, target)


def train_editor(
    method: str,
    model: str | Backbone,
    data: str | Sequence[Any],
    out: str,
    *,
    overwrite: bool = False,
    options: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    limit: int | None = None,
    device: str | None = None,
    progress: bool = True,
    prompt_format: str = "auto",
) -> TrainedEditor:
    """Train an editor before editing and write its artefact folder (the Python side of ``train-editor``).

    Args:
        method: the editor to train: ``"mend"``, or ``"odedit+mend"`` (MEND's hypernetwork meta-trained under
            ODEdit's objective, :class:`~odedit_hf.editors.mend.odedit_trainer.ODEditMENDTrainer`; edit with
            ``get_method("mend", editor_weights=out)``); ``"serac"`` and ``"ike"`` say why not.
        model: the base model (a folder or Hub id loaded as ``odedit-hf edit --model`` does) or a
            :class:`~odedit_hf.backbones.Backbone` (its model is left unchanged).
        data: the train split (see :func:`load_train_requests`).
        out: the artefact folder (written atomically: a temporary sibling folder, renamed at the end).
        overwrite: replace an existing artefact at ``out`` (never a folder holding other files).
        options: the method's own options (MEND: ``layers``, ``projections``, ``rank``, ``n_hidden``,
            ``edit_lr``; see :class:`~odedit_hf.editors.mend.MENDMethod`); for ``odedit+mend`` also
            :class:`~odedit_hf.methods.odedit.config.ODEditConfig` options, flat (``alpha=0.2``) or namespaced
            (``{"odedit": {...}, "mend": {...}}``).
        training: overrides of :class:`~odedit_hf.editors.mend.trainer.MENDTrainingArguments` fields
            (``num_train_epochs``, ``learning_rate``, ``eval_steps``, ``edit_weight``, ...).
        val_fraction: the share of the train split held out for validation (early stopping).
        seed: seeds the split, the network's initialisation and the Trainer.
        limit: use only the first ``limit`` training requests.
        device: ``"cpu"``, ``"cuda"``, ... (default: the Trainer's choice).
        progress: the Trainer's progress bar.
        prompt_format: for a text-only ``model`` given as a folder: ``raw`` (plain prompts), ``chat`` (the
            tokenizer's chat template) or ``auto`` (the template when there is one), as ``odedit-hf edit
            --prompt-format``; train with the format the editor will edit in (the SmolLM2 fact set: raw).

    Under several processes (``torchrun --nproc_per_node N`` or ``accelerate launch --num_processes N``;
    ``docs/editors/mend.md``, "Training on several processes") every process loads the model and the split
    and trains a replica (the Trainer all-reduces the gradients; ``per_device_train_batch_size`` requests per
    process and step); only the main process writes ``out``, and every process returns once it is written.

    Raises:
        ValueError: a method that cannot be trained (the message says why), a bad ``out``, bad data or options.
    """
    reason = not_trainable_reason(method)
    if reason is not None:
        raise ValueError(f"train-editor --method {method}: {reason}")
    start = time.perf_counter()
    target = check_out_dir(out, overwrite=overwrite)
    requests = load_train_requests(data, limit=limit)
    train, val = _split(requests, val_fraction, seed)
    if isinstance(model, str):
        from odedit_hf.cli.edit import load_backbone

        backbone = load_backbone(model, device=device, progress=progress, prompt_format=prompt_format)
    else:
        if prompt_format != "auto":
            raise ValueError(
                "train_editor: prompt_format applies when the model is a folder or Hub id; a Backbone keeps "
                "the processor it was built with"
            )
        backbone = model
    # the Trainer's own folder (no checkpoints are written: the artefact is written below); per process
    scratch = tempfile.mkdtemp(prefix="odedit-train-editor-")
    try:
        if method == "serac":
            result = _train_serac(
                backbone, train + val, target, scratch, options=options or {}, training=training or {},
                val_fraction=val_fraction, seed=seed, device=device, progress=progress,
            )  # fmt: skip
        else:
            result = _train_mend(
                backbone, train, val, target, scratch, options=options or {}, training=training or {},
                seed=seed, device=device, progress=progress, odedit=method == "odedit+mend",
            )  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result.total_seconds = time.perf_counter() - start
    logger.info("train-editor: %s written in %.1f s", target, result.total_seconds)
    return result


def _split_odedit_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(MEND options, ODEdit options)`` of ``odedit+mend``: namespaced (``{"odedit": {...}, "mend": {...}}``,
    as the CLI parses them) or flat (split as ``get_method("odedit+mend", ...)`` would)."""
    from odedit_hf.methods.odedit.method import ODEditMethod

    options = dict(options)
    if set(options) <= {"odedit", "mend"} and all(isinstance(v, Mapping) for v in options.values()):
        return dict(options.get("mend", {})), dict(options.get("odedit", {}))
    split = ODEditMethod.split_options(options, ["mend"])
    return dict(split.get("mend", {})), dict(split.get("odedit", {}))


def _train_mend(
    backbone: Backbone,
    train: list[Any],
    val: list[Any],
    target: str,
    scratch: str,
    *,
    options: Mapping[str, Any],
    training: Mapping[str, Any],
    seed: int,
    device: str | None,
    progress: bool,
    odedit: bool = False,
) -> TrainedEditor:
    import dataclasses

    import torch

    from odedit_hf.editors.mend import MENDMethod
    from odedit_hf.editors.mend.hypernet import MENDNet, MENDNetConfig, base_identity, save_net
    from odedit_hf.editors.mend.trainer import MENDTrainer, MENDTrainingArguments

    odedit_options: dict[str, Any] = {}
    if odedit:
        options, odedit_options = _split_odedit_options(options)
    allowed = {"layers", "projections", "rank", "n_hidden", "edit_lr"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"train-editor --method {'odedit+mend' if odedit else 'mend'}: MEND options {unknown} do not apply "
            f"to training; give {', '.join(sorted(allowed))}"
        )
    method = MENDMethod(**dict(options))
    fields = {f.name for f in dataclasses.fields(MENDTrainingArguments) if f.init}
    bad = sorted(set(training) - fields)
    if bad:
        raise ValueError(f"train-editor: {bad} are not MENDTrainingArguments fields")
    kwargs: dict[str, Any] = {
        "output_dir": os.path.join(scratch, "trainer"),
        "seed": seed,
        "disable_tqdm": not progress,
        **dict(training),
    }
    if device is not None and str(device).startswith("cpu"):
        kwargs.setdefault("use_cpu", True)
    args = MENDTrainingArguments(**kwargs)
    modules = method.modules(backbone)
    model = backbone.base_model
    shapes = []
    for name in modules:
        base = model.get_submodule(name)
        shapes.append([base.in_features, base.out_features])
    config = MENDNetConfig(
        modules=modules, shapes=shapes, rank=method.rank, n_hidden=method.n_hidden, edit_lr=method.edit_lr
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = MENDNet(config)
    identity = base_identity(model, modules)  # before training: the weights it is trained for
    objective: dict[str, Any] = {"objective": "mend"}
    if odedit:
        from odedit_hf.editors.mend import MENDConfig
        from odedit_hf.editors.mend.odedit_trainer import ODEditMENDTrainer
        from odedit_hf.methods.odedit.config import ODEDIT_CONFIG_VERSION, ODEditConfig

        odedit_config = ODEditConfig(editor=MENDConfig(target_modules=list(modules)), **odedit_options)
        resolved = {k: v for k, v in odedit_config.to_dict().items() if k in ODEditConfig.option_names()}
        resolved = json.loads(json.dumps(resolved, default=list))
        objective = {
            "objective": "odedit",
            "odedit_config": resolved,
            "odedit_config_version": ODEDIT_CONFIG_VERSION,
        }
        trainer = ODEditMENDTrainer(net, args, backbone, train, val, odedit_config=odedit_config)
    else:
        trainer = MENDTrainer(net, args, backbone, train, val)
    try:
        t0 = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - t0
        trainer.restore_best()
    finally:
        trainer.close()
    history = [dict(h) for h in trainer.state.log_history]
    extra = {
        "num_train": len(train),
        "num_val": len(val),
        "val_case_ids": [int(r.case_id) for r in val],
        "best_metric": trainer.best_metric,
        "best_step": trainer.best_step,
        "global_step": int(trainer.state.global_step),
        "train_seconds": train_seconds,
        "num_processes": int(args.world_size),
        **objective,
        **({"dual_steps": trainer.dual_steps} if odedit else {}),
    }
    training_args = json.loads(args.to_json_string())
    _write_artefact(
        target,
        lambda stage: save_net(
            net.cpu(), stage, identity=identity, training_args=training_args, history=history, extra=extra
        ),
    )
    return TrainedEditor(
        path=target,
        train_seconds=train_seconds,
        total_seconds=0.0,
        num_train=len(train),
        num_val=len(val),
        best_metric=trainer.best_metric,
        best_step=trainer.best_step,
        global_step=int(trainer.state.global_step),
        history=history,
    )


def serac_training_fields() -> tuple[set[str], set[str]]:
    """``(SERACTrainingConfig fields, SERACTrainingArguments fields)``: what ``--train.<field>`` may set."""
    import dataclasses

    from odedit_hf.editors.serac import SERACTrainingArguments, SERACTrainingConfig

    config = {f.name for f in dataclasses.fields(SERACTrainingConfig) if f.init}
    args = {f.name for f in dataclasses.fields(SERACTrainingArguments) if f.init}
    return config, args


def _train_serac(
    backbone: Backbone,
    requests: list[Any],
    target: str,
    scratch: str,
    *,
    options: Mapping[str, Any],
    training: Mapping[str, Any],
    val_fraction: float,
    seed: int,
    device: str | None,
    progress: bool,
) -> TrainedEditor:
    """SERAC through :func:`odedit_hf.editors.serac.train_serac` (which holds out ``val_fraction`` itself)."""
    from odedit_hf.editors.serac import SERACTrainingArguments, SERACTrainingConfig
    from odedit_hf.editors.serac.trainer import run_serac_training

    if options:
        raise ValueError(
            f"train-editor --method serac: {sorted(options)} are SERAC's edit-time options (threshold, "
            "editor_weights) and do not apply to training; give training settings as --train.<field> "
            "(a SERACTrainingConfig or TrainingArguments field)"
        )
    config_fields, arg_fields = serac_training_fields()
    bad = sorted(set(training) - config_fields - arg_fields)
    if bad:
        raise ValueError(
            f"train-editor --method serac: {bad} are neither SERACTrainingConfig nor TrainingArguments fields"
        )
    config_kwargs = {k: v for k, v in training.items() if k in config_fields}
    config_kwargs.setdefault("val_fraction", val_fraction)
    config = SERACTrainingConfig(**config_kwargs)
    kwargs: dict[str, Any] = {
        "output_dir": os.path.join(scratch, "trainer"),
        "seed": seed,
        "disable_tqdm": not progress,
        **{k: v for k, v in training.items() if k in arg_fields and k not in config_fields},
    }
    if device is not None and str(device).startswith("cpu"):
        kwargs.setdefault("use_cpu", True)
    args = SERACTrainingArguments(**kwargs)
    # the main process writes the artefact into its stage (train_serac writes atomically on the main process
    # only); the other processes' path is never written
    main = is_main_process()
    stage = os.path.join(scratch, "not-written")
    if main:
        stage = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=os.path.dirname(target))
    try:
        path, info, history = run_serac_training(
            backbone, requests, os.path.join(stage, "artefact"), config, args
        )
        history = json.loads(json.dumps(history, default=str))
        if main:
            from odedit_hf.editing.saving import default_mode

            os.chmod(path, default_mode(directory=True))
            _install(path, target)
    finally:
        if main:
            shutil.rmtree(stage, ignore_errors=True)
    _wait_for_everyone()
    return TrainedEditor(
        path=target,
        train_seconds=float(info.get("train_seconds", 0.0)),
        total_seconds=0.0,
        num_train=int(info.get("train_records", 0)),
        num_val=int(info.get("val_records", 0)),
        best_metric=info.get("best_eval_loss"),
        best_step=info.get("best_step"),
        global_step=int(info.get("steps", 0)),
        history=history,
    )

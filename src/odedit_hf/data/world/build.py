"""``build_world``: generate, render, export, pretrain, measure, cache — one call.

The result is a folder ``root`` holding ``model/`` (``save_pretrained`` of the tiny LLaVA and its
processor: ``from_pretrained`` loads it like any Hub model), ``data/`` (MMEdit files and PNGs, see
:mod:`~odedit_hf.data.world.export`) and ``world_info.json`` (version, seed, preset, measured
accuracies, build time).

The model depends on the world's *content* only (:data:`~odedit_hf.data.world.spec.CONTENT_VERSION`,
preset, seed), not on what else the export writes. So when the cache already holds a world of another
version with the same content (e.g. version 3 beside version 4, which only added probe fields), a
build copies that world's model instead of training it again, re-measures the accuracies on the copy
and keeps it only if they equal the ones recorded with it (else it trains from scratch).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .cache import INFO_FILE, read_info, world_dir
from .export import HELDOUT_RENDERING_BASE, ExportedFiles, export_world, write_bytes_atomic
from .spec import (
    CAPTION_RELATION,
    CONTENT_VERSION,
    EDIT_RELATIONS,
    PERCEPTION_RELATIONS,
    TEXT_RELATIONS,
    WORLD_VERSION,
    WorldPreset,
    WorldSpec,
    generate_world,
    get_preset,
)

if TYPE_CHECKING:
    from odedit_hf.backbones import Backbone, PromptSample

logger = logging.getLogger(__name__)

__all__ = [
    "ACCURACY_KEYS",
    "DEFAULT_THREADS",
    "World",
    "build_world",
    "find_model_donor",
    "measure_accuracies",
]

#: Torch CPU threads a build uses by default (capped at the CPU count): the tiny preset's 5-minute
#: budget is measured on a 2-core machine using both cores.
DEFAULT_THREADS = 2

#: The accuracy sets measured after pretraining (teacher-forced token accuracy; ``*_em`` = exact match).
ACCURACY_KEYS: tuple[str, ...] = (
    "trained",
    "heldout_paraphrase",
    "unseen_rendering",
    "text_only",
    "text_heldout",
    "perception",
    "counterfactual_vqa",
    "counterfactual_caption",
)


@dataclass(frozen=True)
class World:
    """A built embedded world.

    Args:
        root: the world's folder.
        model_dir: ``save_pretrained`` folder of the model and processor.
        data_dir: the MMEdit files, images and ``world.json``.
        image_root, rephrase_image_root: the image roots of the MMEdit files (the same folder).
        vqa_train, vqa_eval, caption_train, caption_eval: the MMEdit files (E-VQA-like, E-IC-like).
        accuracies: pre-edit accuracies of the saved model (see :data:`ACCURACY_KEYS`).
        build_seconds: wall time of the build that made it (not of a cache hit).
        preset, seed, world_version: the cache key.
        from_cache: whether this call loaded it rather than building it.
        info: the full ``world_info.json``.
    """

    root: str
    model_dir: str
    data_dir: str
    image_root: str
    rephrase_image_root: str
    vqa_train: str
    vqa_eval: str
    caption_train: str
    caption_eval: str
    accuracies: dict[str, float]
    build_seconds: float
    preset: str
    seed: int
    world_version: str
    from_cache: bool = False
    info: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def load_model(self, **kwargs: Any):
        """``(model, processor)`` loaded with ``from_pretrained`` (kwargs go to the model's)."""
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(self.model_dir, **kwargs)
        processor = AutoProcessor.from_pretrained(self.model_dir)
        return model, processor

    def load_backbone(self, **kwargs: Any) -> Backbone:
        """A :class:`~odedit_hf.backbones.Backbone` of the saved model (eval mode)."""
        from odedit_hf.backbones import Backbone

        model, processor = self.load_model(**kwargs)
        model.eval()
        return Backbone(model, processor)

    def spec(self) -> WorldSpec:
        """The generated :class:`WorldSpec` (regenerated from the key; cheap)."""
        return generate_world(self.preset, self.seed)


def _from_info(root: str, info: dict, *, from_cache: bool) -> World:
    data_dir = os.path.join(root, "data")
    image_root = os.path.join(data_dir, "images")
    return World(
        root=root,
        model_dir=os.path.join(root, "model"),
        data_dir=data_dir,
        image_root=image_root,
        rephrase_image_root=image_root,
        vqa_train=os.path.join(data_dir, "evqa_train.json"),
        vqa_eval=os.path.join(data_dir, "evqa_eval.json"),
        caption_train=os.path.join(data_dir, "eic_train.json"),
        caption_eval=os.path.join(data_dir, "eic_eval.json"),
        accuracies={k: float(v) for k, v in info["accuracies"].items()},
        build_seconds=float(info["build_seconds"]),
        preset=str(info["preset"]),
        seed=int(info["seed"]),
        world_version=str(info["world_version"]),
        from_cache=from_cache,
        info=info,
    )


def _pool_pixel_values(world: WorldSpec, processor: Any, progress: bool):
    """Pixel values of every entity's training renderings, ``(N * K, 3, H, W)``, entity-major.

    The image processor's rescale + normalise is applied in numpy in one shot (the renderings are
    already at the processor's size, so its resize and crop are identities); the first image is
    checked against the processor's own output so the two can never drift apart.
    """
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from .render import render_array, render_entity

    k = world.preset.train_renderings
    ip = processor.image_processor
    arrays = np.stack(
        [
            render_array(e, world.seed, j)
            for e in tqdm(world.entities, desc="render", disable=not progress, leave=False)
            for j in range(k)
        ]
    )
    mean = np.asarray(ip.image_mean, dtype=np.float32)[None, :, None, None]
    std = np.asarray(ip.image_std, dtype=np.float32)[None, :, None, None]
    x = arrays.transpose(0, 3, 1, 2).astype(np.float32) * np.float32(ip.rescale_factor)
    pixel_values = torch.from_numpy((x - mean) / std)
    reference = ip(images=[render_entity(world.entities[0], world.seed, 0)], return_tensors="pt")[
        "pixel_values"
    ]
    if reference.shape[1:] != pixel_values.shape[1:] or not torch.allclose(
        reference[0], pixel_values[0], atol=1e-5
    ):
        raise ValueError(
            "world build: fast pixel values disagree with the image processor's; report this bug"
        )
    return pixel_values


def _eval_samples(world: WorldSpec, files: ExportedFiles) -> dict[str, list[PromptSample]]:
    from odedit_hf.backbones import PromptSample

    from .render import render_entity

    rng = random.Random(f"odedit-hf-world-eval/{world.seed}")
    sets: dict[str, list[PromptSample]] = {k: [] for k in ACCURACY_KEYS}
    for e in world.entities:
        seen = render_entity(e, world.seed, 0)
        unseen = render_entity(e, world.seed, HELDOUT_RENDERING_BASE)
        for r in EDIT_RELATIONS:
            task = "caption" if r == CAPTION_RELATION else "vqa"
            answer = e.facts[r]
            sets["trained"].append(
                PromptSample(rng.choice(world.train_templates(r)).render(), answer, seen, task)
            )
            sets["heldout_paraphrase"].append(
                PromptSample(rng.choice(world.heldout_templates(r)).render(), answer, seen, task)
            )
            sets["unseen_rendering"].append(
                PromptSample(rng.choice(world.train_templates(r)).render(), answer, unseen, task)
            )
        for r in PERCEPTION_RELATIONS:
            sets["perception"].append(
                PromptSample(rng.choice(world.train_templates(r)).render(), e.facts[r], unseen)
            )
        for r in TEXT_RELATIONS:
            sets["text_only"].append(
                PromptSample(rng.choice(world.train_templates(r)).render(e.name), e.facts[r])
            )
            sets["text_heldout"].append(
                PromptSample(rng.choice(world.heldout_templates(r)).render(e.name), e.facts[r])
            )
    from odedit_hf.data import load_mmedit

    for path, task in ((files.vqa_eval, "vqa"), (files.caption_eval, "caption")):
        for req in load_mmedit(path, files.image_root, files.image_root, task=task):
            sets[f"counterfactual_{task}"].append(
                PromptSample(req.src, req.alt, req.load_image("image"), task)
            )
    return sets


def measure_accuracies(backbone: Backbone, world: WorldSpec, files: ExportedFiles) -> dict[str, float]:
    """Teacher-forced token accuracy (and ``*_em`` exact match) of ``backbone`` on every set of
    :data:`ACCURACY_KEYS`: trained facts, held-out paraphrases, unseen renderings, text-only facts (train
    and held-out templates), perception (unseen renderings) and the eval edit records' counterfactual targets (``alt``; a caption's
    alt shares the word "eating" with every caption, so its chance level is above 1/3)."""
    from .pretrain import teacher_forced_accuracy

    out: dict[str, float] = {}
    for name, samples in _eval_samples(world, files).items():
        acc, em = teacher_forced_accuracy(backbone, samples)
        out[name], out[f"{name}_em"] = acc, em
    return out


def _content_version(info: dict) -> str:
    # worlds before version 4 seeded their generators with the world version: it was their content version
    return str(info.get("content_version", info.get("world_version")))


def find_model_donor(root: str, preset: str, seed: int) -> str | None:
    """A complete world beside ``root`` (same parent folder) of the same preset, seed and content version
    but another world version, whose model a build of ``root`` can copy; ``None`` if there is none."""
    parent = os.path.dirname(os.path.abspath(root))
    if not os.path.isdir(parent):
        return None
    prefix = f"{preset}-seed{seed}-v"
    for name in sorted(os.listdir(parent)):
        candidate = os.path.join(parent, name)
        if not name.startswith(prefix) or candidate == os.path.abspath(root):
            continue
        try:
            info = read_info(candidate) if os.path.isdir(candidate) else None
        except (ValueError, OSError):
            continue
        if (
            info is not None
            and info.get("preset") == preset
            and info.get("seed") == seed
            and info.get("world_version") != WORLD_VERSION
            and _content_version(info) == CONTENT_VERSION
            and os.path.isfile(os.path.join(candidate, "model", "config.json"))
            and isinstance(info.get("accuracies"), dict)
        ):
            return candidate
    return None


def _reuse_model(root: str, donor: str, world: WorldSpec, threads: int) -> dict[str, Any] | None:
    """Export the data, copy ``donor``'s model and re-measure it; the info, or ``None`` if it disagrees."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from odedit_hf.backbones import Backbone

    start = time.perf_counter()
    donor_info = read_info(donor) or {}
    timings: dict[str, float] = {}
    files = export_world(world, os.path.join(root, "data"))
    timings["export"] = time.perf_counter() - start
    t = time.perf_counter()
    model_dir = os.path.join(root, "model")
    shutil.copytree(os.path.join(donor, "model"), model_dir)
    timings["copy_model"] = time.perf_counter() - t
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t = time.perf_counter()
        saved = LlavaForConditionalGeneration.from_pretrained(model_dir)
        accuracies = measure_accuracies(
            Backbone(saved, AutoProcessor.from_pretrained(model_dir)), world, files
        )
        timings["evaluate"] = time.perf_counter() - t
    finally:
        torch.set_num_threads(previous_threads)
    recorded = {k: float(v) for k, v in donor_info["accuracies"].items()}
    if accuracies != recorded:
        diff = {k: (recorded.get(k), v) for k, v in accuracies.items() if recorded.get(k) != v}
        logger.warning(
            "world %s/seed %d: the model copied from %s measures differently from what it recorded %s; "
            "training from scratch instead",
            world.preset.name,
            world.seed,
            donor,
            diff,
        )
        return None
    logger.info(
        "world %s/seed %d: model copied from %s (same content version)", world.preset.name, world.seed, donor
    )
    return {
        "world_version": WORLD_VERSION,
        "content_version": CONTENT_VERSION,
        "preset": world.preset.name,
        "seed": world.seed,
        "accuracies": accuracies,
        "train_loss": donor_info.get("train_loss"),
        "train_steps": donor_info.get("train_steps"),
        "timings": timings,
        "threads": threads,
        "build_seconds": time.perf_counter() - start,
        "model_from": {
            "root": donor,
            "world_version": donor_info.get("world_version"),
            "build_seconds": donor_info.get("build_seconds"),
            "timings": donor_info.get("timings"),
            "machine": donor_info.get("machine"),
            "model_sha256": donor_info.get("model_sha256"),
        },
    }


def _build_into(root: str, world: WorldSpec, *, progress: bool, threads: int) -> dict[str, Any]:
    import numpy as np
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from odedit_hf.backbones import Backbone

    from .pretrain import build_model, make_training_rows, pretrain_vision, train_model
    from .tokenizer import build_processor

    start = time.perf_counter()
    p = world.preset
    timings: dict[str, float] = {}
    files = export_world(world, os.path.join(root, "data"))
    timings["export"] = time.perf_counter() - start

    t = time.perf_counter()
    processor = build_processor(world)
    pixel_values = _pool_pixel_values(world, processor, progress)
    timings["render_pool"] = time.perf_counter() - t

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        random.seed(world.seed)
        np.random.seed(world.seed)
        torch.manual_seed(world.seed)
        model = build_model(p, processor)
        t = time.perf_counter()
        rows = make_training_rows(
            world,
            Backbone(model, processor),
            pool_size=p.train_renderings,
            num_samples=p.train_samples,
            warmup_samples=p.warmup_samples,
            seed=world.seed,
        )
        timings["tokenize"] = time.perf_counter() - t
        if p.vision_pretrain_steps > 0:
            vision = pretrain_vision(model, world, pixel_values, p, seed=world.seed, progress=progress)
            timings["vision_pretrain"] = vision["vision_seconds"]
        pad = processor.tokenizer.pad_token_id
        if p.freeze_vision_after_warmup and 0 < p.warmup_samples < len(rows):
            # two stages, as LLaVA: perception warm-up with everything trainable, then facts with the
            # vision tower fixed
            warm = train_model(
                model, rows[: p.warmup_samples], pixel_values, pad, p, seed=world.seed, progress=progress
            )
            stats = train_model(
                model,
                rows[p.warmup_samples :],
                pixel_values,
                pad,
                p,
                seed=world.seed,
                progress=progress,
                freeze_vision=True,
            )
            stats = {
                "train_loss": stats["train_loss"],
                "train_steps": warm["train_steps"] + stats["train_steps"],
                "train_seconds": warm["train_seconds"] + stats["train_seconds"],
            }
        else:
            stats = train_model(model, rows, pixel_values, pad, p, seed=world.seed, progress=progress)
        timings["train"] = stats["train_seconds"]
        model_dir = os.path.join(root, "model")
        model.save_pretrained(model_dir)
        processor.save_pretrained(model_dir)

        t = time.perf_counter()
        saved = LlavaForConditionalGeneration.from_pretrained(model_dir)
        accuracies = measure_accuracies(
            Backbone(saved, AutoProcessor.from_pretrained(model_dir)), world, files
        )
        timings["evaluate"] = time.perf_counter() - t
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "world_version": WORLD_VERSION,
        "content_version": CONTENT_VERSION,
        "preset": p.name,
        "seed": world.seed,
        "accuracies": accuracies,
        "train_loss": stats["train_loss"],
        "train_steps": int(stats["train_steps"]),
        "timings": timings,
        "threads": threads,
        "build_seconds": time.perf_counter() - start,
    }


#: Environment variables that select the CPU code paths of torch's kernels (and so the floating-point
#: results of training): recorded in ``world_info.json`` when set.
_KERNEL_ENV = (
    "ATEN_CPU_CAPABILITY",
    "MKL_CBWR",
    "MKL_ENABLE_INSTRUCTIONS",
    "ONEDNN_MAX_CPU_ISA",
    "OMP_NUM_THREADS",
)


def _file_sha256(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cpu_model() -> str:
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_machine() -> dict[str, Any]:
    """What a build's floating-point results depend on besides the seed: the CPU, the vector instruction set
    torch's kernels use on it, torch's version and the environment variables that pin kernel code paths.

    The training is deterministic for a given machine type and thread count, but the same seed trains a
    different model on a CPU whose kernels take another code path (AVX2 vs AVX-512 GEMM and reductions sum
    in another order); ``world_info.json`` records this beside the model's sha256 so that two worlds can
    be told apart (see README, "Reproducibility").
    """
    import torch

    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    return {
        "cpu": _cpu_model(),
        "cpu_capability": capability() if capability is not None else None,
        "torch": torch.__version__,
        "env": {k: os.environ[k] for k in _KERNEL_ENV if k in os.environ},
    }


def build_world(
    preset: str | WorldPreset = "tiny",
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
    force: bool = False,
    progress: bool = True,
    *,
    threads: int | None = None,
    reuse_model: bool = True,
) -> World:
    """Build the embedded world (or load it from its cache folder) and return its :class:`World`.

    Args:
        preset: ``"micro"`` (tests; under a minute) or ``"tiny"`` (the default world, 256 entities; about
            4 minutes on a 2-core CPU), or a :class:`WorldPreset` (give it its own ``name``: the name, not
            the sizes, enters the cache key).
        seed: the world's seed; the same seed gives byte-identical data files.
        out: the world's folder; default ``world_dir(preset, seed)`` under ``$ODEDIT_HF_CACHE`` or
            ``~/.cache/odedit_hf/worlds``.
        force: rebuild even when ``out`` already holds a complete world (it is replaced).
        progress: show tqdm bars.
        threads: torch CPU threads during the build (restored afterwards); default
            :data:`DEFAULT_THREADS` capped at the CPU count. On the 2-core reference machine, when idle, a
            training step of the tiny preset takes 1.7x less time on 2 threads than on 1; on a machine
            busy with other jobs, 1 thread is the safer choice.
        reuse_model: when ``out``'s folder holds, beside it, a world of the same preset, seed and content
            version but another world version (:func:`find_model_donor`), copy its model instead of
            training one (it is the model this build would train); the accuracies are re-measured and
            must equal the recorded ones, else the model is trained. ``world_info.json`` then says
            ``model_from``. Never with ``force`` (a forced build trains).

    Raises:
        ValueError: unknown preset, bad seed, or ``out`` holding something that is not a world.
    """
    p = get_preset(preset)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"build_world: seed must be a non-negative int, got {seed!r}")
    if threads is None:
        threads = min(DEFAULT_THREADS, os.cpu_count() or 1)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"build_world: threads must be a positive int, got {threads!r}")
    if not isinstance(reuse_model, bool):
        raise ValueError(f"build_world: reuse_model must be a bool, got {reuse_model!r}")
    root = os.path.abspath(os.fspath(out)) if out is not None else world_dir(p.name, seed)
    if not force:
        info = read_info(root) if os.path.isdir(root) else None
        if info is not None:
            key = (info.get("world_version"), info.get("preset"), info.get("seed"))
            if key == (WORLD_VERSION, p.name, seed):
                logger.info("world %s/seed %d loaded from %s", p.name, seed, root)
                return _from_info(root, info, from_cache=True)
            raise ValueError(
                f"{root} holds world {key}, not {(WORLD_VERSION, p.name, seed)}; pick another folder, or rebuild "
                "it with force=True (odedit-hf world build --force)"
            )
    if os.path.exists(root) and not os.path.isdir(root):
        raise ValueError(f"build_world: out={root} exists and is not a folder")
    if os.path.isdir(root) and os.listdir(root) and not force and read_info(root) is None:
        raise ValueError(
            f"build_world: out={root} is a non-empty folder without a world; pick another folder or empty it "
            "(force=True, odedit-hf world build --force, deletes what is in it and builds there)"
        )

    world = generate_world(p, seed)
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}-building-", dir=parent)
    try:
        logger.info("building world %s/seed %d in %s", p.name, seed, root)
        donor = find_model_donor(root, p.name, seed) if reuse_model and not force else None
        info = _reuse_model(tmp, donor, world, threads) if donor is not None else None
        if info is None:
            if donor is not None:  # the copy disagreed: start again from an empty folder
                shutil.rmtree(tmp)
                os.makedirs(tmp)
            info = _build_into(tmp, world, progress=progress, threads=threads)
        info["model_sha256"] = _file_sha256(os.path.join(tmp, "model", "model.safetensors"))
        info["machine"] = build_machine()
        write_bytes_atomic(os.path.join(tmp, INFO_FILE), (json.dumps(info, indent=1) + "\n").encode())
        # mkdtemp/mkstemp make private (0700/0600) temporaries: give the world the umask's modes, so a
        # shared cache is readable by whoever the umask allows, as files written with open() would be
        from odedit_hf.editing.saving import _apply_default_modes

        _apply_default_modes(tmp)
        if os.path.isdir(root):
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _from_info(root, info, from_cache=False)

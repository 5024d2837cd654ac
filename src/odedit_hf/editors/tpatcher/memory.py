"""T-Patcher's memory: FFN inputs of ordinary prompts that new patch neurons must stay silent on.

The memory loss keeps every new neuron's activation low on these states (Huang et al. use 40,000 FFN
inputs of the task's training data). Here they are the inputs of the patched FFN at every attended
position of the training split's prompts (an MMEdit file: each record gives its edit prompt with the
model's own answer, its text-locality prompt and its multimodal-locality prompt), run through the base
model. They depend only on the base weights below the patch, so they are computed once per model and
cached on disk keyed by the model's weight hash, the source file's contents and the sampling settings.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from odedit_hf.backbones import Backbone, PromptSample

logger = logging.getLogger(__name__)

__all__ = [
    "MEMORY_RECIPE",
    "build_memory",
    "capture_inputs",
    "default_cache_dir",
    "find_world_train_file",
    "load_or_build_memory",
    "memory_samples",
    "model_weight_hash",
]

#: Bumped whenever the way memory states are chosen changes (part of the cache key).
MEMORY_RECIPE = "tpatcher-memory-v1"


def default_cache_dir() -> str:
    """``~/.cache/odedit_hf/tpatcher`` (the memory cache of T-Patcher)."""
    return os.path.abspath(os.path.expanduser(os.path.join("~", ".cache", "odedit_hf", "tpatcher")))


@contextlib.contextmanager
def capture_inputs(module: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the first positional input of every forward call of ``module`` (detached) within the block."""
    seen: list[torch.Tensor] = []

    def hook(_: torch.nn.Module, args: tuple[Any, ...]) -> None:
        seen.append(args[0].detach())

    handle = module.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def model_weight_hash(model: torch.nn.Module, *, skip: str = "tpatcher_") -> str:
    """Hash of the model's own weights, the same before and after a T-Patcher (or any peft) wrap.

    Adapter tensors (names containing ``skip``) are left out and peft's ``base_layer.`` name component
    is dropped, so a wrapped model hashes like the plain one.
    """
    from odedit_hf.editing import hash_tensors

    named = []
    seen: set[int] = set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if skip in name or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        named.append((name.replace("base_layer.", "").removeprefix("base_model.model."), tensor))
    named.sort(key=lambda item: item[0])
    return hash_tensors(named)


def find_world_train_file(model: torch.nn.Module) -> tuple[str, str] | None:
    """``(vqa_train file, image root)`` of the embedded world whose saved model ``model`` was loaded from.

    The world keeps its model in ``<world>/model`` (``config._name_or_path``); ``None`` when the model
    does not come from a complete world folder.
    """
    from odedit_hf.data.world import build_world
    from odedit_hf.data.world.cache import read_info

    config = getattr(model, "config", None)
    path = getattr(config, "_name_or_path", "") or ""
    if not path or not os.path.isdir(path):
        return None
    root = os.path.dirname(os.path.abspath(path))
    try:
        info = read_info(root)
    except ValueError:
        return None
    if info is None or os.path.abspath(os.path.join(root, "model")) != os.path.abspath(path):
        return None
    try:  # a complete world folder: build_world only reads it
        world = build_world(info["preset"], int(info["seed"]), out=root, progress=False)
    except (ValueError, KeyError) as exc:
        logger.warning("T-Patcher: %s looks like a world but could not be opened (%s)", root, exc)
        return None
    return world.vqa_train, world.image_root


def memory_samples(path: str, image_root: str) -> list[Callable[[], PromptSample]]:
    """The prompts of an MMEdit file's records, each as a zero-argument factory (images are read only
    when a prompt is used): edit prompt -> the model's answer ``pred``, text-locality prompt -> its
    answer, multimodal-locality image and question -> its answer."""
    from odedit_hf.backbones import PromptSample
    from odedit_hf.data import load_mmedit

    def edit(record: Any) -> PromptSample:
        return PromptSample(
            prompt=record.src, target=record.pred, image=record.load_image("image"), task=record.task
        )

    def text(record: Any) -> PromptSample:
        return PromptSample(prompt=record.loc, target=record.loc_ans, image=None, task="vqa")

    def multimodal(record: Any) -> PromptSample:
        return PromptSample(
            prompt=record.m_loc_q, target=record.m_loc_a, image=record.load_image("m_loc"), task="vqa"
        )

    return [
        functools.partial(make, r) for r in load_mmedit(path, image_root) for make in (edit, text, multimodal)
    ]


@torch.no_grad()
def build_memory(
    backbone: Backbone,
    module: torch.nn.Module,
    samples: Sequence[PromptSample | Callable[[], PromptSample]],
    *,
    size: int,
    batch_size: int = 16,
    seed: int = 0,
) -> torch.Tensor:
    """Up to ``size`` inputs of ``module`` at attended positions of ``samples`` (visited in a seeded random
    order), as a float32 ``(size, in_features)`` tensor on the CPU.

    Args:
        backbone: the model's backbone; its model runs as it is (call with the adapter disabled or absent:
            the inputs of the patched FFN do not depend on a T-Patcher adapter anyway).
        module: the module whose input is collected (the patched FFN's key projection).
        samples: the prompts (or zero-argument factories of them, called when the prompt is used).
        size: the most states kept; a seeded random subset of the positions visited.
        batch_size: prompts per forward pass.
        seed: the order in which prompts are visited and the subset kept.
    """
    from odedit_hf.backbones import PromptSample
    from odedit_hf.editing import model_device, model_inputs

    if not samples or size <= 0:
        return torch.zeros(0, getattr(module, "in_features", 0))
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(samples), generator=generator).tolist()
    device = model_device(backbone.model)
    states: list[torch.Tensor] = []
    total = 0
    for start in range(0, len(order), batch_size):
        chunk = [samples[i] for i in order[start : start + batch_size]]
        chunk = [s if isinstance(s, PromptSample) else s() for s in chunk]
        batch = backbone.build_batch(chunk, device=device)
        mask = batch["attention_mask"].bool()
        with capture_inputs(module) as seen:
            backbone.forward(model_inputs(batch))
        if len(seen) != 1:
            raise ValueError(
                f"T-Patcher memory: the patched FFN ran {len(seen)} times in one forward, expected 1"
            )
        x = seen[0].reshape(mask.shape[0], mask.shape[1], -1)  # OPT-style layers flatten (B*T, d)
        picked = x[mask].float().cpu()
        states.append(picked)
        total += picked.shape[0]
        if total >= size:
            break
    memory = torch.cat(states, dim=0)
    if memory.shape[0] > size:
        keep = torch.randperm(memory.shape[0], generator=generator)[:size].sort().values
        memory = memory[keep]
    return memory.contiguous()


def _file_digest(path: str) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_or_build_memory(
    backbone: Backbone,
    module_name: str,
    module: torch.nn.Module,
    path: str,
    image_root: str,
    *,
    size: int,
    batch_size: int,
    seed: int,
    cache_dir: str | None,
    weight_hash: str,
) -> torch.Tensor:
    """The memory of ``path``'s prompts for this model, from the cache or built (and cached) now."""
    from safetensors.torch import load_file, save_file

    key_text = "|".join(
        [
            MEMORY_RECIPE,
            weight_hash,
            _file_digest(path),
            os.path.abspath(image_root),
            module_name,
            str(size),
            str(seed),
        ]
    )
    key = hashlib.blake2b(key_text.encode(), digest_size=16).hexdigest()
    folder = cache_dir or default_cache_dir()
    file = os.path.join(folder, f"memory-{key}.safetensors")
    if os.path.isfile(file):
        memory = load_file(file)["memory"]
        logger.info("T-Patcher: %d memory states loaded from %s", memory.shape[0], file)
        return memory
    samples = memory_samples(path, image_root)
    memory = build_memory(backbone, module, samples, size=size, batch_size=batch_size, seed=seed)
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=".memory-", suffix=".safetensors", dir=folder)
    os.close(handle)
    try:
        save_file(
            {"memory": memory},
            tmp,
            metadata={"source": os.path.abspath(path), "module": module_name, "recipe": MEMORY_RECIPE},
        )
        os.replace(tmp, file)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    logger.info(
        "T-Patcher: %d memory states from %d prompts of %s cached in %s",
        memory.shape[0],
        len(samples),
        path,
        file,
    )
    return memory

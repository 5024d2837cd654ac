"""Pretraining the world's tiny LLaVA: model config, pre-tokenized training set, Trainer, accuracy.

The training examples are exactly the teacher-forced prompts :meth:`Backbone.build_batch` makes (the
saved processor's chat template, target after the generation prompt, no EOS), so that editing and
evaluation later query the model the same way it learned. Each distinct ``(prompt, target)`` is
tokenized once through :meth:`Backbone.encode_sample`; the images of the training pool are turned into
pixel values once through the processor's image processor; a collator pads and gathers per batch.
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset
from transformers import TrainerCallback

from .spec import (
    CAPTION_RELATION,
    PERCEPTION_RELATIONS,
    TEXT_RELATIONS,
    VISUAL_RELATIONS,
    WorldPreset,
    WorldSpec,
)

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration

    from odedit_hf.backbones import Backbone, PromptSample

logger = logging.getLogger(__name__)

__all__ = [
    "TrainingRow",
    "WorldCollator",
    "attribute_labels",
    "build_model",
    "make_training_rows",
    "pretrain_vision",
    "teacher_forced_accuracy",
    "train_model",
]


# Text-only facts are learnt far faster than visual ones (the name is a token, the image needs a
# vision tower), so each round keeps only this share of them.
_TEXT_SHARE = 0.5


def build_model(preset: WorldPreset, processor: Any) -> LlavaForConditionalGeneration:
    """A freshly initialised tiny ``LlavaForConditionalGeneration`` (CLIP vision tower + Llama decoder).

    Initialisation uses torch's global generator: seed it first.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from .render import IMAGE_SIZE
    from .tokenizer import PATCH_SIZE

    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=preset.vision_hidden,
        intermediate_size=preset.vision_hidden * 4,
        num_hidden_layers=preset.vision_layers,
        num_attention_heads=preset.heads,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=preset.vision_hidden,
        hidden_act="gelu",
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=preset.text_hidden,
        intermediate_size=preset.text_intermediate,
        num_hidden_layers=preset.text_layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.heads,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    num_image_tokens = (IMAGE_SIZE // PATCH_SIZE) ** 2 + 1  # + CLS, kept by the "full" strategy
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(processor.image_token),
        image_seq_length=num_image_tokens,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    config.pad_token_id = tokenizer.pad_token_id
    return LlavaForConditionalGeneration(config)


@dataclass(frozen=True)
class TrainingRow:
    """One pre-tokenized training example.

    Args:
        input_ids: prompt + target token ids, unpadded.
        labels: ``-100`` on the prompt, the target ids on the target.
        image: index into the pixel-value pool, or ``-1`` for a text-only example.
    """

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    image: int


class _RowDataset(Dataset):
    def __init__(self, rows: Sequence[TrainingRow]):
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        return {"input_ids": row.input_ids, "labels": row.labels, "image": row.image}


class WorldCollator:
    """Pads pre-tokenized rows (right) and gathers their images' pixel values, in row order.

    Args:
        pixel_values: ``(num_pool_images, 3, H, W)``, the training image pool.
        pad_token_id: the tokenizer's pad id.
    """

    def __init__(self, pixel_values: torch.Tensor, pad_token_id: int):
        self.pixel_values = pixel_values
        self.pad_token_id = int(pad_token_id)

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), length), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(features), length), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[i, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.tensor(f["labels"], dtype=torch.long)
            attention_mask[i, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        images = [f["image"] for f in features if f["image"] >= 0]
        if images:
            batch["pixel_values"] = self.pixel_values[torch.tensor(images, dtype=torch.long)]
        return batch


def make_training_rows(
    world: WorldSpec,
    backbone: Backbone,
    *,
    pool_size: int,
    num_samples: int,
    seed: int,
    warmup_samples: int = 0,
) -> list[TrainingRow]:
    """Draw ``num_samples`` training examples and tokenize them through ``backbone``.

    Examples come in balanced rounds: each round holds every (entity, visual relation), every
    (entity, caption), every (entity, perception relation) and half the (entity, text relation), each
    with a random *training* template and, for image examples, a random rendering of the entity's training pool (pool index
    ``entity * pool_size + k``). Held-out templates and held-out renderings are never drawn. The first
    ``warmup_samples`` rows ask perception questions only (a curriculum); the order of the returned
    list is the training order (the Trainer samples sequentially).
    """
    from PIL import Image

    from odedit_hf.backbones import PromptSample

    rng = random.Random(f"odedit-hf-world-train/{seed}")
    dummy = Image.new("RGB", (8, 8))
    cache: dict[tuple[str, str, bool, str], tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def encode(
        prompt: str, target: str, with_image: bool, task: str
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        key = (prompt, target, with_image, task)
        hit = cache.get(key)
        if hit is None:
            sample = PromptSample(
                prompt=prompt, target=target, image=dummy if with_image else None, task=task
            )
            ids, labels, _ = backbone.encode_sample(sample)
            hit = cache[key] = (tuple(ids), tuple(labels))
        return hit

    if not 0 <= warmup_samples <= num_samples:
        raise ValueError(
            f"make_training_rows: need 0 <= warmup_samples <= num_samples, got {warmup_samples}, {num_samples}"
        )
    perception_share = world.preset.perception_share
    knowledge = [(e, r) for e in world.entities for r in (*VISUAL_RELATIONS, CAPTION_RELATION)]
    perception = [(e, r) for e in world.entities for r in PERCEPTION_RELATIONS]
    textual = [(e, r) for e in world.entities for r in TEXT_RELATIONS]

    def image_row(entity: Any, relation: str) -> TrainingRow:
        template = rng.choice(world.train_templates(relation))
        task = "caption" if relation == CAPTION_RELATION else "vqa"
        ids, labels = encode(template.render(), entity.facts[relation], True, task)
        return TrainingRow(ids, labels, entity.index * pool_size + rng.randrange(pool_size))

    warmup: list[TrainingRow] = []
    while len(warmup) < warmup_samples:
        warmup.extend(image_row(e, r) for e, r in perception)
    warmup = warmup[:warmup_samples]
    rng.shuffle(warmup)
    rows: list[TrainingRow] = []
    while len(rows) < num_samples - warmup_samples:
        rows.extend(image_row(e, r) for e, r in knowledge)
        if perception_share >= 1.0:
            # without vision pretraining, every perception question every round: with one per entity and
            # round instead, the micro world's perception fell from 0.96 to 0.65, trained facts 1.0 -> 0.85
            rows.extend(image_row(e, r) for e, r in perception)
        else:
            # a pretrained vision tower needs fewer (256 entities, 1200 steps: trained facts 0.954 with
            # a share of 0.34 against 0.939 with all of them)
            rows.extend(image_row(e, r) for e, r in perception if rng.random() < perception_share)
        for entity, relation in textual:
            if rng.random() >= _TEXT_SHARE:
                continue
            template = rng.choice(world.train_templates(relation))
            ids, labels = encode(template.render(entity.name), entity.facts[relation], False, "vqa")
            rows.append(TrainingRow(ids, labels, -1))
    rows = rows[: num_samples - warmup_samples]
    rng.shuffle(rows)
    logger.info(
        "training set: %d examples (%d perception warm-up), %d distinct token rows",
        num_samples,
        warmup_samples,
        len(cache),
    )
    return warmup + rows


def train_model(
    model: torch.nn.Module,
    rows: Sequence[TrainingRow],
    pixel_values: torch.Tensor,
    pad_token_id: int,
    preset: WorldPreset,
    *,
    seed: int,
    progress: bool = True,
    freeze_vision: bool = False,
) -> dict[str, float]:
    """Train ``model`` on ``rows`` with a ``transformers.Trainer`` (one pass; CPU unless CUDA is there).

    With ``freeze_vision`` the vision tower is kept fixed (LLaVA's second stage: the attributes it
    learnt in the perception warm-up stay put while the language model binds them to facts).

    Returns:
        ``{"train_loss", "train_steps", "train_seconds"}``.
    """
    from transformers import PrinterCallback, Trainer

    steps = math.ceil(len(rows) / preset.batch_size)
    with tempfile.TemporaryDirectory(prefix="odedit-hf-world-train-") as tmp:
        # rows come pre-shuffled, warm-up block first: sequential sampling
        args = _training_arguments(tmp, preset, steps, preset.learning_rate, steps // 10, seed, progress)
        # The vision tower and projector learn through the whole language model, so they get a larger
        # learning rate (preset.vision_lr_scale) to learn the entities' visual attributes in time.
        frozen = []
        if freeze_vision:
            frozen = [p for n, p in model.named_parameters() if "vision_tower" in n and p.requires_grad]
            for param in frozen:
                param.requires_grad_(False)
        vision = [p for n, p in model.named_parameters() if "vision_tower" in n and p.requires_grad]
        projector = [
            p for n, p in model.named_parameters() if "multi_modal_projector" in n and p.requires_grad
        ]
        special = {id(p) for p in (*vision, *projector)}
        rest = [p for p in model.parameters() if id(p) not in special and p.requires_grad]
        optimizer = torch.optim.AdamW(
            [
                {"params": rest, "lr": preset.learning_rate},
                {"params": vision, "lr": preset.learning_rate * preset.vision_lr_scale},
                {"params": projector, "lr": preset.learning_rate * preset.projector_lr_scale},
            ],
            betas=(0.9, 0.98),
            weight_decay=0.0,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=_RowDataset(rows),
            data_collator=WorldCollator(pixel_values, pad_token_id),
            optimizers=(optimizer, None),
        )
        if not progress:  # without bars, Trainer prints its logs to stdout; send them to the logger only
            trainer.remove_callback(PrinterCallback)
            trainer.add_callback(_LogCallback())
        else:  # with bars, Trainer writes its log dicts between them; show the loss on the bar instead
            _use_bar_postfix(trainer)
        start = time.perf_counter()
        try:
            result = trainer.train()
        finally:
            for param in frozen:
                param.requires_grad_(True)
        seconds = time.perf_counter() - start
    model.eval()
    return {"train_loss": float(result.training_loss), "train_steps": float(steps), "train_seconds": seconds}


def attribute_labels(world: WorldSpec, pool_size: int) -> torch.Tensor:
    """``(N * pool_size, len(PERCEPTION_RELATIONS))`` class indices of the training pool's images (entity-major):
    per perception relation, the index of the entity's answer in ``world.answers[relation]``."""
    rows = [
        [world.answers[r].index(e.facts[r]) for r in PERCEPTION_RELATIONS]
        for e in world.entities
        for _ in range(pool_size)
    ]
    return torch.tensor(rows, dtype=torch.long)


class _AttributeProbe(torch.nn.Module):
    """The LLaVA vision tower with one linear head per perception relation over the features LLaVA feeds
    its projector (every token of the last layer: the ``"full"`` strategy). Used only by
    :func:`pretrain_vision`; the heads are dropped afterwards."""

    def __init__(self, vision_tower: torch.nn.Module, num_tokens: int, sizes: Sequence[int]):
        super().__init__()
        self.vision_tower = vision_tower
        self.sizes = list(sizes)
        self.heads = torch.nn.Linear(vision_tower.config.hidden_size * num_tokens, sum(self.sizes))

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.vision_tower(pixel_values=pixel_values).last_hidden_state.flatten(1)
        logits = self.heads(features).split(self.sizes, dim=-1)
        loss = sum(torch.nn.functional.cross_entropy(part, labels[:, i]) for i, part in enumerate(logits))
        return {"loss": loss}


class _PoolDataset(Dataset):
    def __init__(self, indices: Sequence[int]):
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> int:
        return self.indices[index]


def pretrain_vision(
    model: LlavaForConditionalGeneration,
    world: WorldSpec,
    pixel_values: torch.Tensor,
    preset: WorldPreset,
    *,
    seed: int,
    progress: bool = True,
) -> dict[str, float]:
    """Pretrain the vision tower alone to classify the training pool's visual attributes (colour, shape,
    pattern) with a ``transformers.Trainer`` — the role a pretrained CLIP encoder plays in LLaVA.

    Through the language model alone, the tower learns shape slowly (measured, 128 entities: shape
    accuracy 0.27, near chance, after 600 steps of batch 128); with this direct loss it reaches 0.96 on
    unseen renderings of 256 entities in 100 steps. The linear heads are discarded; the tower then
    trains with the rest of the model at ``preset.vision_lr_scale``.

    Returns:
        ``{"vision_loss", "vision_steps", "vision_seconds"}``.
    """
    from transformers import PrinterCallback, Trainer

    steps = preset.vision_pretrain_steps
    tower = model.model.vision_tower
    labels = attribute_labels(world, preset.train_renderings)
    if labels.shape[0] != pixel_values.shape[0]:
        raise ValueError(f"pretrain_vision: {pixel_values.shape[0]} pool images but {labels.shape[0]} labels")
    num_tokens = tower.embeddings.num_positions  # patches + CLS
    probe = _AttributeProbe(tower, num_tokens, [len(world.answers[r]) for r in PERCEPTION_RELATIONS])
    rng = random.Random(f"odedit-hf-world-vision/{seed}")
    indices = [rng.randrange(pixel_values.shape[0]) for _ in range(steps * preset.batch_size)]

    def collate(batch: Sequence[int]) -> dict[str, torch.Tensor]:
        index = torch.tensor(batch, dtype=torch.long)
        return {"pixel_values": pixel_values[index], "labels": labels[index]}

    with tempfile.TemporaryDirectory(prefix="odedit-hf-world-vision-") as tmp:
        # indices are drawn above, seeded: sequential sampling
        args = _training_arguments(tmp, preset, steps, preset.vision_pretrain_lr, steps // 5, seed, progress)
        trainer = Trainer(model=probe, args=args, train_dataset=_PoolDataset(indices), data_collator=collate)
        if not progress:
            trainer.remove_callback(PrinterCallback)
            trainer.add_callback(_LogCallback())
        else:
            _use_bar_postfix(trainer)
        start = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - start
    return {
        "vision_loss": float(result.training_loss),
        "vision_steps": float(steps),
        "vision_seconds": seconds,
    }


def _training_arguments(
    output_dir: str,
    preset: WorldPreset,
    steps: int,
    learning_rate: float,
    logging_steps: int,
    seed: int,
    progress: bool,
) -> Any:
    """The ``TrainingArguments`` of both world training stages: one sequential pass (the examples come
    pre-shuffled), cosine schedule with warm-up, AdamW(β2 0.98), clipping at 1, no checkpoints."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=preset.batch_size,
        num_train_epochs=1,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, int(preset.warmup_ratio * steps)),
        weight_decay=0.0,
        adam_beta2=0.98,
        max_grad_norm=1.0,
        logging_steps=max(1, logging_steps),
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        train_sampling_strategy="sequential",
        disable_tqdm=not progress,
        use_cpu=not torch.cuda.is_available(),
    )


def _use_bar_postfix(trainer: Any) -> None:
    """Replace the Trainer's ProgressCallback by one that puts the logs on the bar (and the logger)."""
    from transformers import ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_postfix_progress_cls()())


def _postfix_progress_cls() -> type:
    from transformers import ProgressCallback

    class _PostfixProgress(ProgressCallback):
        """``ProgressCallback`` whose logs go to the bar's postfix and the logger, not printed between bars."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            if state.is_world_process_zero and self.training_bar is not None:
                shown = {
                    k: f"{v:.4g}"
                    for k, v in logs.items()
                    if k in ("loss", "learning_rate") and isinstance(v, float)
                }
                if shown:
                    self.training_bar.set_postfix(shown, refresh=False)
            logger.info("step %d: %s", state.global_step, logs)

    return _PostfixProgress


class _LogCallback(TrainerCallback):
    """Trainer logs to this module's logger (instead of stdout) when the progress bars are off."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        logger.info("step %d: %s", state.global_step, logs)


@torch.no_grad()
def teacher_forced_accuracy(
    backbone: Backbone, samples: Sequence[PromptSample], *, batch_size: int = 128
) -> tuple[float, float]:
    """Mean per-sample token accuracy over target tokens, and exact match (DESIGN §4's metric).

    One forward pass per batch; logits at t predict the label at t + 1.
    """
    from odedit_hf.evaluation.metrics import token_accuracy

    if not samples:
        raise ValueError("teacher_forced_accuracy: no samples")
    model = backbone.model
    model.eval()
    device = next(model.parameters()).device
    accs: list[float] = []
    ems: list[float] = []
    for start in range(0, len(samples), batch_size):
        chunk = list(samples[start : start + batch_size])
        batch = backbone.build_batch(chunk, device=device)
        labels = batch.pop("labels")
        acc, em = token_accuracy(model(**batch).logits, labels)
        accs.extend(acc.tolist())
        ems.extend(em.tolist())
    return sum(accs) / len(accs), sum(ems) / len(ems)

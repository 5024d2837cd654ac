"""Writing the world to disk: PNG renderings and MMEdit-schema files (E-VQA-like and E-IC-like).

Layout of the data directory::

    images/e0007_train0.png    rendering 0 of entity 7 (trained on; record ``image``, ``m_loc``, ``hard_m_loc``)
    images/e0007_unseen0.png   a held-out rendering (never trained on; ``image_rephrase``, ``image_rephrases``)
    evqa_train.json  evqa_eval.json  eic_train.json  eic_eval.json
    world.json                 the entities, their facts and the templates (for people and tools)

Each record holds the eleven MMEdit fields and, after them, the optional probe fields (world version 4;
see :func:`edit_records`). The eleven fields are drawn from their own generator, seeded by the content
version, and the probes from a second one, so adding probes left the eleven fields of every record exactly
as version 3 wrote them.

Files are byte-identical for the same ``(preset, seed)``: records are generated from a seeded
``random.Random``, JSON is written with a fixed layout, and PNGs carry no metadata or timestamps.
Every file is written atomically (temporary file + ``os.replace``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass

from .render import render_entity
from .spec import (
    CAPTION_RELATION,
    CONTENT_VERSION,
    TEXT_RELATIONS,
    VISUAL_RELATIONS,
    WORLD_VERSION,
    Entity,
    WorldSpec,
)

logger = logging.getLogger(__name__)

__all__ = [
    "HELDOUT_RENDERING_BASE",
    "ExportedFiles",
    "edit_records",
    "export_world",
    "hard_negative",
    "image_name",
    "shared_attributes",
    "write_bytes_atomic",
]

#: Renderings ``0 .. train_renderings - 1`` are the training pool; held-out renderings are numbered from
#: here, so the two sets can never overlap whatever the pool size.
HELDOUT_RENDERING_BASE = 1_000_000
_IMAGES = "images"


@dataclass(frozen=True)
class ExportedFiles:
    """Paths of one exported world (all absolute)."""

    data_dir: str
    image_root: str
    vqa_train: str
    vqa_eval: str
    caption_train: str
    caption_eval: str
    world_json: str


def image_name(entity: Entity, *, unseen: int | None = None) -> str:
    """Path relative to the image root: training rendering 0, or held-out rendering ``unseen``."""
    kind = "train0" if unseen is None else f"unseen{unseen}"
    return f"e{entity.index:04d}_{kind}.png"


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        from odedit_hf.editing.saving import default_mode

        os.chmod(tmp, default_mode())  # mkstemp's 0600 -> the umask's mode, as open() would give
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _png_bytes(image) -> bytes:
    import io

    buf = io.BytesIO()
    # no pnginfo, no timestamps: the bytes depend on the pixels (and zlib) only
    image.save(buf, format="PNG", optimize=False, compress_level=9)
    return buf.getvalue()


def _other(rng: random.Random, choices: Iterable[str], not_this: str) -> str:
    pool = [c for c in choices if c != not_this]
    return rng.choice(pool)


#: The visual attributes that make up an entity's identity.
VISUAL_ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "pattern", "accent")


def shared_attributes(a: Entity, b: Entity) -> int:
    """How many of the four visual attributes (shape, colour, pattern, accent) ``a`` and ``b`` share."""
    return sum(getattr(a, k) == getattr(b, k) for k in VISUAL_ATTRIBUTES)


def hard_negative(world: WorldSpec, entity: Entity, relation: str, avoid: str, rng: random.Random) -> Entity:
    """A visually similar entity: the most attributes shared with ``entity`` (3 of 4 wherever one exists).

    Among those, one whose answer to ``relation`` is not ``avoid`` (the edit's new answer) is drawn with
    ``rng``, so an edit that leaks to the look-alike changes that answer and shows as lost locality.
    """
    others = [e for e in world.entities if e.index != entity.index]
    best = max(shared_attributes(entity, e) for e in others)
    pool = [e for e in others if shared_attributes(entity, e) == best]
    return rng.choice([e for e in pool if e.facts[relation] != avoid] or pool)


def _probe_fields(
    world: WorldSpec, entity: Entity, relation: str, record: dict[str, str], rng: random.Random
) -> dict:
    """The optional probe fields of one record (see :func:`edit_records`)."""
    alt = record["alt"]
    image = image_name(entity)
    caption_prompt = lambda: rng.choice(world.train_templates(CAPTION_RELATION)).render()  # noqa: E731
    by_name: list[dict[str, str]] = []
    one_hop: list[dict[str, str]] = []
    if relation in TEXT_RELATIONS:
        by_name.append(
            {"prompt": rng.choice(world.train_templates(relation)).render(entity.name), "ground_truth": alt}
        )
    if relation == "food":
        one_hop.append(
            {"prompt": caption_prompt(), "ground_truth": f"{entity.name} eating {alt}", "image": image}
        )
    elif relation == "name":
        one_hop.append(
            {
                "prompt": caption_prompt(),
                "ground_truth": f"{alt} eating {entity.facts['food']}",
                "image": image,
            }
        )
    elif relation == CAPTION_RELATION:
        name, food = alt.split(" eating ", 1)
        for part_relation, answer in (("name", name), ("food", food)):
            prompt = rng.choice(world.train_templates(part_relation)).render()
            one_hop.append({"prompt": prompt, "ground_truth": answer, "image": image})
    portability = {k: v for k, v in (("by_name", by_name), ("one_hop", one_hop)) if v}

    neighbour = hard_negative(world, entity, relation, alt, rng)
    text_relation = relation if relation in TEXT_RELATIONS else rng.choice(TEXT_RELATIONS)
    rephrases = [record["rephrase"]]
    rephrases += [t.render() for t in world.heldout_templates(relation) if t.render() != record["rephrase"]]
    return {
        "portability": portability,
        "hard_loc": rng.choice(world.train_templates(text_relation)).render(neighbour.name),
        "hard_loc_ans": neighbour.facts[text_relation],
        "hard_m_loc": image_name(neighbour),
        "hard_m_loc_q": rng.choice(world.train_templates(relation)).render(),
        "hard_m_loc_a": neighbour.facts[relation],
        "rephrases": rephrases,
        "image_rephrases": [image_name(entity, unseen=j) for j in range(world.preset.heldout_renderings)],
    }


def edit_records(world: WorldSpec, task: str, split: str, *, probes: bool = True) -> list[dict]:
    """The MMEdit records of ``task`` (``"vqa"`` or ``"caption"``) and ``split`` (``"train"``/``"eval"``).

    Each record edits one (entity, relation): ``pred`` is the world's answer (what the trained model
    says), ``alt`` another answer of the same relation, ``rephrase`` a held-out paraphrase template,
    ``image_rephrase`` a held-out rendering, ``loc``/``loc_ans`` a text-only fact about another entity,
    ``m_loc``/``m_loc_q``/``m_loc_a`` another entity's image and a question about it. Train and eval
    records edit disjoint (entity, relation) pairs.

    With ``probes`` (the default; world version 4), each record also carries, after those eleven fields:

    * ``portability``: ``{"by_name": [...], "one_hop": [...]}`` (KnowEdit's layout: category -> list of
      ``{"prompt", "ground_truth"[, "image"]}``), target = the edit's consequence. ``by_name``: the edited
      relation asked about the entity by name, text only ("which place is home to guman ?" -> ``alt``),
      for home / food / maker. ``one_hop``: a fact that follows from the edit, asked on the edit image —
      the caption after a name or food edit (``"{name} eating {food}"`` with the new part), and the name
      and the food after a caption edit (the parts of the new caption). Home and maker have no one-hop
      fact in this world.
    * ``hard_loc`` / ``hard_loc_ans``: a text-only question about a look-alike entity (the most visual
      attributes shared with the edited one, 3 of 4 wherever one exists; see :func:`hard_negative`), on
      the edited relation where it has a text form, else on a random text relation.
    * ``hard_m_loc`` / ``hard_m_loc_q`` / ``hard_m_loc_a``: that look-alike's image and the edited
      relation's question about it.
    * ``rephrases`` / ``image_rephrases``: the knowledge unit — every held-out paraphrase template of the
      relation (``rephrase`` first) and every held-out rendering of the entity (``image_rephrase`` first).
    """
    if task not in ("vqa", "caption") or split not in ("train", "eval"):
        raise ValueError(
            f"edit_records: task must be 'vqa' or 'caption' and split 'train' or 'eval'; got {task!r}, {split!r}"
        )
    p = world.preset
    rng = random.Random(f"odedit-hf-world-edits/{CONTENT_VERSION}/{p.name}/{world.seed}/{task}")
    relations = VISUAL_RELATIONS if task == "vqa" else (CAPTION_RELATION,)
    pairs = [(e, r) for e in world.entities for r in relations]
    rng.shuffle(pairs)
    num_eval, num_train = p.num_eval_edits, p.num_train_edits
    if num_eval + num_train > len(pairs):
        # e.g. the caption task has one relation, so only num_entities pairs: split them instead
        num_eval = min(num_eval, len(pairs) // 2)
        num_train = min(num_train, len(pairs) - num_eval)
    chosen = pairs[:num_eval] if split == "eval" else pairs[num_eval : num_eval + num_train]
    records = []
    for entity, relation in chosen:
        others = [e for e in world.entities if e.index != entity.index]
        loc_entity, mloc_entity = rng.choice(others), rng.choice(others)
        loc_relation = rng.choice(TEXT_RELATIONS)
        mloc_relation = rng.choice(VISUAL_RELATIONS)
        pred = entity.facts[relation]
        records.append(
            {
                "src": rng.choice(world.train_templates(relation)).render(),
                "pred": pred,
                "alt": _other(rng, world.answers[relation], pred),
                "image": image_name(entity),
                "rephrase": rng.choice(world.heldout_templates(relation)).render(),
                "image_rephrase": image_name(entity, unseen=0),
                "loc": rng.choice(world.train_templates(loc_relation)).render(loc_entity.name),
                "loc_ans": loc_entity.facts[loc_relation],
                "m_loc": image_name(mloc_entity),
                "m_loc_q": rng.choice(world.train_templates(mloc_relation)).render(),
                "m_loc_a": mloc_entity.facts[mloc_relation],
            }
        )
    if probes:
        # a second generator: the eleven fields above stay exactly what they were without probes
        probe_rng = random.Random(
            f"odedit-hf-world-probes/{WORLD_VERSION}/{p.name}/{world.seed}/{task}/{split}"
        )
        for record, (entity, relation) in zip(records, chosen):
            record.update(_probe_fields(world, entity, relation, record, probe_rng))
    return records


def _world_json(world: WorldSpec) -> dict:
    return {
        "world_version": WORLD_VERSION,
        "content_version": CONTENT_VERSION,
        "preset": world.preset.name,
        "seed": world.seed,
        "entities": [
            {
                "index": e.index,
                "shape": e.shape,
                "colour": e.colour,
                "pattern": e.pattern,
                "accent": e.accent,
                "facts": e.facts,
                "image": image_name(e),
                "unseen_images": [image_name(e, unseen=j) for j in range(world.preset.heldout_renderings)],
            }
            for e in world.entities
        ],
        "answers": {r: list(a) for r, a in world.answers.items()},
        "templates": {
            r: {"train": [t.text for t in ts if not t.heldout], "heldout": [t.text for t in ts if t.heldout]}
            for r, ts in world.templates.items()
        },
    }


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=False) + "\n").encode("utf-8")


def export_world(world: WorldSpec, data_dir: str) -> ExportedFiles:
    """Write the world's images and MMEdit files under ``data_dir`` (created if missing)."""
    data_dir = os.path.abspath(data_dir)
    image_root = os.path.join(data_dir, _IMAGES)
    os.makedirs(image_root, exist_ok=True)
    for entity in world.entities:
        write_bytes_atomic(
            os.path.join(image_root, image_name(entity)), _png_bytes(render_entity(entity, world.seed, 0))
        )
        for j in range(world.preset.heldout_renderings):
            image = render_entity(entity, world.seed, HELDOUT_RENDERING_BASE + j)
            write_bytes_atomic(os.path.join(image_root, image_name(entity, unseen=j)), _png_bytes(image))
    paths = {}
    for key, task, split in (
        ("vqa_train", "vqa", "train"),
        ("vqa_eval", "vqa", "eval"),
        ("caption_train", "caption", "train"),
        ("caption_eval", "caption", "eval"),
    ):
        stem = "evqa" if task == "vqa" else "eic"
        path = os.path.join(data_dir, f"{stem}_{split}.json")
        write_bytes_atomic(path, _json_bytes(edit_records(world, task, split)))
        paths[key] = path
    world_json = os.path.join(data_dir, "world.json")
    write_bytes_atomic(world_json, _json_bytes(_world_json(world)))
    logger.info("exported world %s/seed %d to %s", world.preset.name, world.seed, data_dir)
    return ExportedFiles(data_dir=data_dir, image_root=image_root, world_json=world_json, **paths)

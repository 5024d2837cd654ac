"""The embedded world's specification: presets, entities, relations, facts and question templates.

Everything here is pure Python, deterministic from ``(preset, seed)`` and free of heavy imports, so the
generator can be tested on its own. The world is built so a tiny model can learn it in minutes:

* an entity's identity is *compositional in its visual attributes* (shape x colour x pattern x
  accent): a tiny vision tower tells entities apart on renderings it never saw by recognising the
  attributes, not by memorising pixels;
* its facts (name, home, food, maker, caption) are drawn at random per entity, so nothing in the
  picture hints at the answers: the model must really store them;
* every question is a *template* = prefix x core. Each relation has a few cores that carry its key
  word ("home", "eat", "made", "name") and a few neutral prefixes. Training sees most (prefix, core)
  pairs; the held-out paraphrase templates are the remaining pairs, so a paraphrase is a genuinely new
  sentence made of words the model has read, and generalising to it means keying on the relation word.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = [
    "CAPTION_RELATION",
    "EDIT_RELATIONS",
    "PERCEPTION_RELATIONS",
    "PRESETS",
    "RELATIONS",
    "CONTENT_VERSION",
    "TEXT_RELATIONS",
    "VISUAL_RELATIONS",
    "WORLD_VERSION",
    "Entity",
    "Template",
    "WorldPreset",
    "WorldSpec",
    "generate_world",
    "get_preset",
]

#: Version of the world's *content*: the entities, their facts, the templates, the eleven MMEdit fields of
#: every record and hence the trained model. It seeds the generators, so bumping it redraws the world (and
#: retrains the model). Bump it whenever the generated world or the model's training changes.
CONTENT_VERSION = "3"
#: Version of the built world as a whole (the cache key): bumps with :data:`CONTENT_VERSION` and whenever
#: the exported files gain anything. 4 = content 3 plus the probe fields (portability, hard-negative
#: locality, knowledge units); a cached world from older code is never reused as such.
WORLD_VERSION = "4"

SHAPES: tuple[str, ...] = ("dome", "square", "triangle", "cross", "star", "ring")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (235, 220, 30),
    "green": (40, 170, 50),
    "cyan": (30, 200, 210),
    "blue": (30, 60, 220),
    "purple": (140, 40, 200),
    "pink": (240, 100, 190),
}
PATTERNS: tuple[str, ...] = ("solid", "stripes", "dots", "checker")
ACCENTS: dict[str, tuple[int, int, int]] = {"white": (250, 250, 250), "black": (15, 15, 15)}

#: Relations asked about an image ("this object"), in a fixed order.
VISUAL_RELATIONS: tuple[str, ...] = ("name", "home", "food", "maker")
#: Perception relations: what the picture shows (colour, shape, "{accent} {pattern}" or "plain"). Trained
#: on every entity so the vision tower learns the attributes that make up an entity's identity; never
#: edited (they are read off the image, not stored).
PERCEPTION_RELATIONS: tuple[str, ...] = ("colour", "shape", "pattern")
#: Relations also asked in text only, about the entity's name.
TEXT_RELATIONS: tuple[str, ...] = ("home", "food", "maker")
#: The image-caption relation (E-IC): a caption prompt in, the entity's caption out.
CAPTION_RELATION = "caption"
#: Relations the MMEdit records edit (the knowledge relations and the caption).
EDIT_RELATIONS: tuple[str, ...] = (*VISUAL_RELATIONS, CAPTION_RELATION)
RELATIONS: tuple[str, ...] = (*VISUAL_RELATIONS, CAPTION_RELATION, *PERCEPTION_RELATIONS)

VISUAL_SUBJECT = "this object"

# Question cores per relation: each carries the relation's key word; "{s}" is the subject.
_QUESTION_CORES: dict[str, tuple[str, ...]] = {
    "name": ("what is the name of {s}", "what is {s} called", "which name does {s} have"),
    "home": ("where does {s} live", "what is the home of {s}", "which place is home to {s}"),
    "food": ("what does {s} eat", "what is the food of {s}", "which food does {s} like"),
    "maker": ("who made {s}", "who is the maker of {s}", "which maker made {s}"),
    "colour": ("what colour is {s}", "what is the colour of {s}", "which colour does {s} have"),
    "shape": ("what shape is {s}", "what is the shape of {s}", "which shape does {s} have"),
    "pattern": ("what pattern is on {s}", "what is the pattern of {s}", "which pattern does {s} have"),
}
_CAPTION_CORES: tuple[str, ...] = (
    "describe the image",
    "write a caption for the image",
    "say what the image shows",
)
# Neutral prefixes shared by every relation; a template is (prefix, core).
_PREFIXES: tuple[str, ...] = ("", "tell me ,", "quick question :", "please answer :")

_FOODS: tuple[str, ...] = (
    "apples", "bread", "rice", "cheese", "honey", "noodles", "plums", "beans", "carrots", "fish",
    "melons", "nuts", "soup", "grapes", "corn", "pears", "eggs", "olives", "berries", "cakes",
    "figs", "lemons", "peas", "dates",
)  # fmt: skip
_MAKER_SUFFIXES: tuple[str, ...] = ("labs", "works", "guild", "forge")
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "kr", "tr", "st")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "n", "r", "l", "m", "s")


@dataclass(frozen=True)
class WorldPreset:
    """Sizes of one world preset.

    Args:
        name: the preset's name (``"micro"`` or ``"tiny"``).
        num_entities: how many entities the world holds.
        num_homes, num_foods, num_makers: sizes of the answer sets of the shared relations.
        train_renderings: renderings per entity the model trains on.
        heldout_renderings: renderings per entity it never sees (image_rephrase, unseen-rendering eval).
        num_eval_edits, num_train_edits: records in the eval and train MMEdit files of each task. A task
            with fewer (entity, relation) pairs than both together (the caption task has one relation)
            splits its pairs: eval gets up to half, train the rest up to its count.
        train_samples: training examples drawn in all (Trainer steps = train_samples / batch_size).
        warmup_samples: how many of them come first and ask perception questions only, so the vision
            tower learns the attributes before it has to carry entity identity (a curriculum).
        freeze_vision_after_warmup: train in two stages (LLaVA style): the warm-up with everything
            trainable, then the rest with the vision tower frozen.
        batch_size, learning_rate, warmup_ratio: optimisation.
        vision_lr_scale, projector_lr_scale: learning-rate multipliers of the vision tower and of the
            multimodal projector.
        perception_share: the share of (entity, perception relation) questions in each training round.
        vision_pretrain_steps, vision_pretrain_lr: a first stage that trains the vision tower alone to
            classify the training renderings' colour, shape and pattern (batch ``batch_size``); 0 skips it.
        vision_hidden, vision_layers, text_hidden, text_layers, text_intermediate, heads: model sizes.
    """

    name: str
    num_entities: int
    num_homes: int
    num_foods: int
    num_makers: int
    train_renderings: int
    heldout_renderings: int
    num_eval_edits: int
    num_train_edits: int
    train_samples: int
    warmup_samples: int
    freeze_vision_after_warmup: bool
    batch_size: int
    learning_rate: float
    warmup_ratio: float
    vision_lr_scale: float
    projector_lr_scale: float
    perception_share: float
    vision_pretrain_steps: int
    vision_pretrain_lr: float
    vision_hidden: int
    vision_layers: int
    text_hidden: int
    text_layers: int
    text_intermediate: int
    heads: int

    def __post_init__(self):
        if not 0.0 < self.perception_share <= 1.0:
            raise ValueError(
                f"WorldPreset {self.name!r}: perception_share must be in (0, 1], got {self.perception_share}"
            )
        if self.vision_pretrain_steps < 0 or self.vision_pretrain_lr <= 0:
            raise ValueError(
                f"WorldPreset {self.name!r}: need vision_pretrain_steps >= 0 and vision_pretrain_lr > 0, got "
                f"{self.vision_pretrain_steps} and {self.vision_pretrain_lr}"
            )
        if self.vision_lr_scale < 0 or self.projector_lr_scale < 0:
            raise ValueError(f"WorldPreset {self.name!r}: learning-rate scales must be >= 0")


PRESETS: dict[str, WorldPreset] = {
    "micro": WorldPreset(
        name="micro", num_entities=32, num_homes=8, num_foods=8, num_makers=8, train_renderings=32,
        heldout_renderings=2, num_eval_edits=16, num_train_edits=16, train_samples=32_000, warmup_samples=0, freeze_vision_after_warmup=False, batch_size=64,
        learning_rate=3e-3, warmup_ratio=0.05, vision_lr_scale=0.4, projector_lr_scale=0.4,
        perception_share=1.0, vision_pretrain_steps=0, vision_pretrain_lr=1e-3,
        vision_hidden=96, vision_layers=2, text_hidden=128, text_layers=2, text_intermediate=256, heads=4,
    ),
    "tiny": WorldPreset(
        name="tiny", num_entities=256, num_homes=12, num_foods=12, num_makers=8, train_renderings=48,
        heldout_renderings=2, num_eval_edits=120, num_train_edits=60, train_samples=179_200, warmup_samples=0, freeze_vision_after_warmup=False,
        batch_size=128, learning_rate=2e-3, warmup_ratio=0.05, vision_lr_scale=0.01, projector_lr_scale=0.01,
        perception_share=0.34, vision_pretrain_steps=200, vision_pretrain_lr=2e-3, vision_hidden=96,
        vision_layers=2, text_hidden=128, text_layers=2, text_intermediate=512, heads=4,
    ),
}  # fmt: skip


def get_preset(preset: str | WorldPreset) -> WorldPreset:
    """Return the :class:`WorldPreset` named ``preset`` (or ``preset`` itself)."""
    if isinstance(preset, WorldPreset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown world preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]


@dataclass(frozen=True)
class Template:
    """A question (or caption prompt) template.

    Args:
        relation: the relation it asks about.
        text: the template, with ``{s}`` for the subject (absent in caption prompts).
        heldout: True for a held-out paraphrase template (never trained on).
    """

    relation: str
    text: str
    heldout: bool

    def render(self, subject: str = VISUAL_SUBJECT) -> str:
        """The prompt for ``subject``: a question ending in ``?``, or a caption prompt ending in ``.``."""
        return self.text.format(s=subject)


@dataclass(frozen=True)
class Entity:
    """One entity: its visual identity and its facts.

    Args:
        index: its position in the world (0-based).
        shape, colour, pattern, accent: visual attributes (``accent`` is ``"none"`` for solid ones).
        facts: relation -> answer, for every relation in :data:`RELATIONS` (perception ones included).
    """

    index: int
    shape: str
    colour: str
    pattern: str
    accent: str
    facts: dict[str, str] = field(hash=False)

    @property
    def name(self) -> str:
        return self.facts["name"]


@dataclass(frozen=True)
class WorldSpec:
    """A generated world: entities, answer sets and templates.

    Args:
        preset: the sizes it was generated with.
        seed: the generator's seed.
        entities: the entities, in index order.
        answers: relation -> every answer of that relation (sorted; alt targets are drawn from it).
        templates: relation -> templates, training ones first.
    """

    preset: WorldPreset
    seed: int
    entities: tuple[Entity, ...]
    answers: dict[str, tuple[str, ...]]
    templates: dict[str, tuple[Template, ...]]

    def train_templates(self, relation: str) -> tuple[Template, ...]:
        return tuple(t for t in self.templates[relation] if not t.heldout)

    def heldout_templates(self, relation: str) -> tuple[Template, ...]:
        return tuple(t for t in self.templates[relation] if t.heldout)

    def all_text(self) -> list[str]:
        """Every string the world can produce (to train the word-level tokenizer on)."""
        out: list[str] = []
        for templates in self.templates.values():
            for t in templates:
                out.append(t.render())
                out.extend(t.render(e.name) for e in self.entities[:1])
        for answers in self.answers.values():
            out.extend(answers)
        out.extend(e.name for e in self.entities)
        return out


def _pseudo_words(rng: random.Random, count: int, taken: set[str], syllables: tuple[int, int]) -> list[str]:
    """``count`` new pronounceable pseudo-words (lowercase letters only), none in ``taken``."""
    words: list[str] = []
    while len(words) < count:
        n = rng.randint(*syllables)
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n)) + rng.choice(_CODAS)
        if word not in taken and 4 <= len(word) <= 9:
            taken.add(word)
            words.append(word)
    return words


def _templates() -> dict[str, tuple[Template, ...]]:
    """(prefix, core) templates per relation; held out: one pair per core, a different prefix each."""
    out: dict[str, tuple[Template, ...]] = {}
    for r_idx, relation in enumerate(RELATIONS):
        if relation == CAPTION_RELATION:
            cores, end = _CAPTION_CORES, " ."
        else:
            cores, end = _QUESTION_CORES[relation], " ?"
        train, heldout = [], []
        for c_idx, core in enumerate(cores):
            for p_idx, prefix in enumerate(_PREFIXES):
                text = f"{prefix} {core}{end}".strip()
                is_heldout = p_idx == (c_idx + r_idx + 1) % len(_PREFIXES)
                (heldout if is_heldout else train).append(Template(relation, text, is_heldout))
        out[relation] = (*train, *heldout)
    return out


def generate_world(preset: str | WorldPreset = "tiny", seed: int = 0) -> WorldSpec:
    """Generate the world of ``preset`` deterministically from ``seed`` (no global random state used)."""
    p = get_preset(preset)
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"generate_world: seed must be a non-negative int, got {seed!r}")
    rng = random.Random(f"odedit-hf-world/{CONTENT_VERSION}/{p.name}/{seed}")

    combos = [
        (shape, colour, pattern, accent)
        for shape in SHAPES
        for colour in COLOURS
        for pattern in PATTERNS
        for accent in (("none",) if pattern == "solid" else tuple(ACCENTS))
    ]
    if p.num_entities > len(combos):
        raise ValueError(
            f"preset {p.name!r} asks for {p.num_entities} entities but only {len(combos)} visual identities "
            "exist; lower num_entities"
        )
    if p.num_foods > len(_FOODS):
        raise ValueError(f"preset {p.name!r}: num_foods must be <= {len(_FOODS)}, got {p.num_foods}")
    chosen = rng.sample(combos, p.num_entities)

    # words the templates and foods use may never be drawn as a name (e.g. "na" + "me")
    taken: set[str] = {w for t in _templates().values() for x in t for w in x.text.split()} | set(_FOODS)
    taken |= set(_MAKER_SUFFIXES)
    names = _pseudo_words(rng, p.num_entities, taken, (2, 2))
    homes = _pseudo_words(rng, p.num_homes, taken, (2, 3))
    maker_heads = _pseudo_words(rng, p.num_makers, taken, (2, 2))
    makers = [f"{head} {rng.choice(_MAKER_SUFFIXES)}" for head in maker_heads]
    foods = rng.sample(list(_FOODS), p.num_foods)

    entities = []
    for idx, (shape, colour, pattern, accent) in enumerate(chosen):
        facts = {
            "name": names[idx],
            # cycle through the answer set so every answer is used, then shuffle who gets which
            "home": homes[idx % len(homes)],
            "food": foods[idx % len(foods)],
            "maker": makers[idx % len(makers)],
        }
        entities.append([idx, shape, colour, pattern, accent, facts])
    for relation in ("home", "food", "maker"):
        values = [e[5][relation] for e in entities]
        rng.shuffle(values)
        for e, v in zip(entities, values):
            e[5][relation] = v
    for e in entities:
        e[5][CAPTION_RELATION] = f"{e[5]['name']} eating {e[5]['food']}"
        e[5]["colour"], e[5]["shape"] = e[2], e[1]
        e[5]["pattern"] = "plain" if e[3] == "solid" else f"{e[4]} {e[3]}"
    ents = tuple(Entity(*e) for e in entities)
    answers = {r: tuple(sorted({e.facts[r] for e in ents})) for r in RELATIONS}
    return WorldSpec(preset=p, seed=seed, entities=ents, answers=answers, templates=_templates())

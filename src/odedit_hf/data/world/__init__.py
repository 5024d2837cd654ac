"""The embedded world: a deterministic synthetic multimodal knowledge world and its tiny LLaVA.

``build_world(preset, seed)`` generates entities with procedurally drawn images and text facts,
exports MMEdit-schema files (E-VQA-like and E-IC-like) with PNG images, pretrains a tiny
``LlavaForConditionalGeneration`` on the world with a ``transformers.Trainer``, measures its pre-edit
accuracies and caches everything on disk keyed by ``(WORLD_VERSION, preset, seed)``. Version 4 adds the
probe fields (portability, hard-negative locality, knowledge units) to the records; the world's content
(``CONTENT_VERSION`` 3: entities, facts, the eleven MMEdit fields, the model) is version 3's.
"""

from __future__ import annotations

from .build import ACCURACY_KEYS, World, build_world, measure_accuracies
from .cache import default_cache_root, world_dir
from .export import edit_records, export_world
from .spec import CONTENT_VERSION, PRESETS, WORLD_VERSION, WorldPreset, WorldSpec, generate_world, get_preset

__all__ = [
    "ACCURACY_KEYS",
    "CONTENT_VERSION",
    "PRESETS",
    "WORLD_VERSION",
    "World",
    "WorldPreset",
    "WorldSpec",
    "build_world",
    "default_cache_root",
    "edit_records",
    "export_world",
    "generate_world",
    "get_preset",
    "measure_accuracies",
    "world_dir",
]

"""Procedural renderings of the world's entities (numpy in, PIL image out).

One rendering = one entity drawn with its fixed identity (shape, colour, pattern, accent) under a
random *view*: position, scale, rotation, background (a low-saturation tone with a gradient, never
one of the saturated entity colours), lighting jitter and pixel noise. Renderings are drawn at twice
the target size and box-downsampled (anti-aliasing), then quantised to uint8. Each rendering's
randomness comes from its own generator seeded by ``(world seed, entity, rendering index)``, so an
image never depends on the order in which images are drawn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .spec import ACCENTS, COLOURS, Entity

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["IMAGE_SIZE", "render_entity", "render_array"]

#: Side of every rendering in pixels (the vision tower's input size).
IMAGE_SIZE = 32
_SUPERSAMPLE = 2
# Ranges of the random view (fractions of the image side; radians).
_CENTRE = (0.46, 0.54)
_RADIUS = (0.27, 0.37)
_ROTATION = np.pi / 12


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r = np.sqrt(u * u + v * v)
    if shape == "dome":  # a half disc, flat side down
        return (u * u + (v - 0.4) ** 2 <= 1.3) & (v <= 0.4)
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if shape == "triangle":  # apex up (image y grows downwards)
        return (v <= 0.72) & (np.abs(u) <= (v + 1.0) * 0.56)
    if shape == "cross":
        arm, length = 0.34, 0.98
        return ((np.abs(u) <= arm) & (np.abs(v) <= length)) | ((np.abs(v) <= arm) & (np.abs(u) <= length))
    if shape == "star":
        phi = np.arctan2(u, -v)
        radius = 0.42 + 0.62 * ((np.cos(5 * phi) + 1) / 2) ** 1.5
        return r <= radius
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.55)
    raise ValueError(f"render: unknown shape {shape!r}")


def _pattern_mask(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if pattern == "solid":
        return np.zeros_like(u, dtype=bool)
    if pattern == "stripes":
        return np.floor((u + 4.0) * 2.6).astype(np.int64) % 2 == 0
    if pattern == "dots":
        fu, fv = (u * 2.3) % 1.0 - 0.5, (v * 2.3) % 1.0 - 0.5
        return fu * fu + fv * fv <= 0.09
    if pattern == "checker":
        return (
            np.floor((u + 4.0) * 2.4).astype(np.int64) + np.floor((v + 4.0) * 2.4).astype(np.int64)
        ) % 2 == 0
    raise ValueError(f"render: unknown pattern {pattern!r}")


def render_array(entity: Entity, world_seed: int, rendering: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """Rendering number ``rendering`` of ``entity`` as a ``(size, size, 3)`` uint8 array."""
    rng = np.random.default_rng([int(world_seed), int(entity.index), int(rendering), 0x0DED17])
    big = size * _SUPERSAMPLE
    coords = (np.arange(big, dtype=np.float64) + 0.5) / big
    y, x = np.meshgrid(coords, coords, indexing="ij")

    # background: a muted tone with a linear gradient
    grey = rng.uniform(0.3, 0.8)
    base = np.clip(grey + rng.uniform(-0.07, 0.07, size=3), 0.0, 1.0)
    angle = rng.uniform(0, 2 * np.pi)
    gradient = (np.cos(angle) * (x - 0.5) + np.sin(angle) * (y - 0.5)) * rng.uniform(0.1, 0.3)
    img = np.clip(base[None, None, :] + gradient[..., None], 0.0, 1.0)

    # the object, in its own rotated and scaled frame (u, v)
    cx, cy = rng.uniform(*_CENTRE, size=2)
    radius = rng.uniform(*_RADIUS)
    theta = rng.uniform(-_ROTATION, _ROTATION)
    dx, dy = x - cx, y - cy
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / radius
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / radius
    light = rng.uniform(0.88, 1.08)
    body = np.clip(np.asarray(COLOURS[entity.colour], dtype=np.float64) / 255.0 * light, 0.0, 1.0)
    inside = _shape_mask(entity.shape, u, v)
    img[inside] = body
    if entity.pattern != "solid":
        accent = np.asarray(ACCENTS[entity.accent], dtype=np.float64) / 255.0
        img[inside & _pattern_mask(entity.pattern, u, v)] = accent

    img = img.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    img = img + rng.normal(0.0, 0.025, size=img.shape)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def render_entity(entity: Entity, world_seed: int, rendering: int, size: int = IMAGE_SIZE) -> Image.Image:
    """Rendering number ``rendering`` of ``entity`` as an RGB PIL image (see :func:`render_array`)."""
    from PIL import Image

    return Image.fromarray(render_array(entity, world_seed, rendering, size), mode="RGB")

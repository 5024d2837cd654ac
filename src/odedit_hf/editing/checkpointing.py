"""Gradient (activation) checkpointing for edits, which run in eval mode.

An edit's backward pass keeps every decoder layer's activations between the edited layer and the loss;
for a large model edited in an early layer that is most of its memory. transformers checkpoints a
decoder layer (:class:`transformers.modeling_layers.GradientCheckpointingLayer`) only while that layer is
in training mode, and the protocols edit with the model in eval mode, so that dropout never makes an
edit depend on the random state. :func:`eval_mode_checkpointing` reconciles the two: it enables
transformers' own checkpointing (``activation_checkpointing_enable``, non-reentrant) and sets the
``training`` flag of the checkpointed layer modules themselves -- not of their children -- so the layers
recompute their forward in the backward pass while every dropout inside them stays off. The edit is the
same as without checkpointing (the recomputed forward is the same computation); it trades one extra
forward of the checkpointed layers per step for their activations.

Editors whose forward hooks keep per-forward state (GRACE's keys, WISE's activations, ...) would see
those hooks run a second time during the recompute; a method opts in with
``supports_gradient_checkpointing`` (see :func:`check_supported`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["check_supported", "checkpointed_layers", "eval_mode_checkpointing"]

_ABSENT = object()


def _transformers_model(model: Any) -> Any:
    """The ``PreTrainedModel`` under a PEFT wrapper (or ``model`` itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def checkpointed_layers(model: Any) -> list[torch.nn.Module]:
    """The modules transformers checkpoints: its ``GradientCheckpointingLayer`` blocks (decoder layers)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in _transformers_model(model).modules() if isinstance(m, GradientCheckpointingLayer)]


def check_supported(method: Any) -> None:
    """Refuse a method that has not declared its edits checkpointing-safe (``supports_gradient_checkpointing``).

    Raises:
        ValueError: the method (or a part of a composite method) does not support it.
    """
    if not getattr(method, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"gradient checkpointing: the method {getattr(method, 'name', method)!r} does not support it (its "
            "forward hooks keep per-forward state, which the backward pass's recompute would run twice); "
            "run it without --gradient-checkpointing"
        )


@contextlib.contextmanager
def eval_mode_checkpointing(model: Any, enabled: bool = True) -> Iterator[list[torch.nn.Module]]:
    """Checkpoint ``model``'s decoder layers during edits while the model stays in eval mode.

    Call it after ``model.eval()`` (a later ``eval()``/``train()`` resets the layers' flags). On exit the
    layers' flags and transformers' checkpointing are put back as they were.

    Yields:
        The checkpointed layer modules (empty when ``enabled`` is False).

    Raises:
        ValueError: the model does not support gradient checkpointing or has no checkpointable layer.
    """
    if not enabled:
        yield []
        return
    base = _transformers_model(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"gradient checkpointing: {type(base).__name__} does not support it "
            "(supports_gradient_checkpointing is False); run without --gradient-checkpointing"
        )
    layers = checkpointed_layers(base)
    if not layers:
        raise ValueError(
            f"gradient checkpointing: {type(base).__name__} has no GradientCheckpointingLayer to checkpoint; "
            "run without --gradient-checkpointing"
        )
    was_enabled = bool(getattr(base, "is_activation_checkpointing", False))
    if was_enabled:
        raise ValueError(
            "gradient checkpointing is already enabled on this model; disable it "
            "(model.activation_checkpointing_disable()) or let the protocol enable it"
        )
    flags = [(layer, layer.training) for layer in layers]
    # teacher-forced edit steps need no KV cache (the layers would drop it under checkpointing, with a warning)
    configs = [base.config]
    text_config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else None
    if text_config is not None and text_config is not base.config:
        configs.append(text_config)
    caches = [(c, c.__dict__.get("use_cache", _ABSENT)) for c in configs]
    for c in configs:
        c.use_cache = False
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # non-reentrant checkpointing needs no grad-requiring inputs: transformers' hook that makes the input
    # embeddings require grad would send the backward through every layer below the edited one
    base.disable_input_require_grads()
    try:
        for layer in layers:
            layer.training = True  # the layer module only: its dropouts stay in eval mode
        logger.info("gradient checkpointing on %d decoder layers (eval mode kept inside them)", len(layers))
        yield layers
    finally:
        for layer, flag in flags:
            layer.training = flag
        base.activation_checkpointing_disable()
        for c, value in caches:
            if value is _ABSENT:
                c.__dict__.pop("use_cache", None)
            else:
                c.use_cache = value

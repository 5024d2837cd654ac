"""A memory estimate of an edit run, printed before it starts, and a check that it fits.

The estimate adds up, in bytes:

* **model** -- the loaded parameters and buffers (exact, as loaded: dtype and placement included);
* **edit parameters** -- what the method trains per edit (exact: the method's adapter is wrapped once on
  the model, its ``edit_parameters`` counted, and unloaded), their **gradients** (same size) and the
  **optimiser state** (Adam: two fp32 moments per trainable value); editors whose state grows with
  every edit (GRACE codebooks, T-Patcher neurons, WISE memories) have few or no parameters before the
  first edit, which the line says;
* the method's **own state** (:meth:`~odedit_hf.editing.Editor.extra_memory_bytes`, e.g. ODEdit's
  λ-network with its gradients);
* **activations** kept for the backward pass of one step, on the prompts of one step (the edit prompt,
  its rephrases, the locality prompts; ``batch_size`` requests for the batch protocol). The base weights
  are frozen and the backward stops at the lowest decoder layer holding the method's adapter (layers below
  it run without saving anything for the gradient; every layer when the adapter sits outside the decoder
  stack, e.g. on the input embedding). Each layer from that one to the top keeps, per position,
  ``6·h + 3·i + a·s`` values in the model's dtype (``h`` hidden size, ``i`` FFN size, ``a`` heads, ``s``
  the padded length): the inputs of its two norms, the query and the (expanded) key and value, the
  attention output, the gate, its activation and the up projection of the FFN, and the attention
  probabilities where the attention backend saves them (flash / memory-efficient kernels keep only a
  log-sum-exp). Measured with ``benchmarks/activation_memory.py`` (the tensors autograd saves): 0.7-1.8 %
  above ``6·h + 3·i`` per layer on the tiny world, a random Llama and SmolLM2-135M, below the count with
  ``a·s``; the edited layer itself keeps less (only what lies above the edited module: the down
  projection's input for an FFN edit), which the count does not subtract. Plus, over the vocabulary, three
  fp32 copies of the logits (autograd keeps about two: the log-softmax and the loss's own; the gradient
  is the third). With gradient checkpointing, each kept layer keeps only its input (``s·b·h`` values) and
  one layer's activations are live at a time during the recompute (not measured).

It is an estimate (allocator slack, CUDA context, the Python/torch runtime and fragmentation are not
counted). It is made after the model is loaded, so the check compares what the run needs beyond the
model (``needed``) with what the device still has free, refuses a run only when that does not fit, and
says what to change.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["MemoryEstimate", "available_bytes", "estimate_edit_memory"]

_GiB = 2**30


def _fmt(n: int) -> str:
    return f"{n / _GiB:.2f} GiB" if n >= _GiB // 10 else f"{n / 2**20:.1f} MiB"


@dataclass
class MemoryEstimate:
    """Bytes per component (see the module docstring); ``available`` is the device's free memory."""

    device: str
    model: int
    edit_parameters: int
    num_edit_parameters: int
    gradients: int
    optimizer_state: int
    method_state: int
    activations: int
    tokens_per_step: int
    available: int | None
    grows_per_edit: bool = False

    @property
    def total(self) -> int:
        return (
            self.model
            + self.edit_parameters
            + self.gradients
            + self.optimizer_state
            + self.method_state
            + self.activations
        )

    @property
    def needed(self) -> int:
        """What the run needs beyond the loaded model (the estimate is made after loading it, so the device's
        free memory no longer includes the model)."""
        return self.total - self.model

    def fits(self) -> bool:
        return self.available is None or self.needed <= self.available

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "model_bytes": self.model,
            "edit_parameters": self.num_edit_parameters,
            "edit_parameter_bytes": self.edit_parameters,
            "gradient_bytes": self.gradients,
            "optimizer_state_bytes": self.optimizer_state,
            "method_state_bytes": self.method_state,
            "activation_bytes": self.activations,
            "tokens_per_step": self.tokens_per_step,
            "total_bytes": self.total,
            "needed_bytes": self.needed,
            "available_bytes": self.available,
            "grows_per_edit": self.grows_per_edit,
        }

    def format(self) -> str:
        grows = " (grows with every edit: counted before the first)" if self.grows_per_edit else ""
        lines = [
            f"memory estimate on {self.device}:",
            f"  model (parameters + buffers)  {_fmt(self.model):>12}",
            f"  edit parameters{grows:<14} {_fmt(self.edit_parameters):>12}  ({self.num_edit_parameters:,} values)",
            f"  their gradients               {_fmt(self.gradients):>12}",
            f"  optimiser state (Adam)        {_fmt(self.optimizer_state):>12}",
            f"  method state                  {_fmt(self.method_state):>12}",
            f"  activations of one step       {_fmt(self.activations):>12}  ({self.tokens_per_step} tokens)",
            f"  total                         {_fmt(self.total):>12}",
        ]
        if self.available is not None:
            lines.append(
                f"  needed beyond the loaded model {_fmt(self.needed):>11}; free on the device {_fmt(self.available)}"
            )
        return "\n".join(lines)


def available_bytes(device: Any) -> int | None:
    """Free memory of ``device``: ``torch.cuda.mem_get_info`` on CUDA, ``MemAvailable`` on a Linux CPU, else None."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return None


def _model_bytes(model: Any, device: Any) -> int:
    """Bytes of the parameters and buffers on ``device`` (all of them when ``device`` is None)."""
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        if device is None or t.device == device:
            total += t.numel() * t.element_size()
    return total


def _kept_layers(backbone: Any, peft_model: Any) -> int | None:
    """How many decoder layers an edit's backward runs through: from the lowest one holding an adapter layer
    of ``peft_model`` to the top; all of them when an adapter layer sits outside the decoder stack (the
    input embedding); ``None`` when the stack cannot be read."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    try:
        layers = list(backbone.decoder_layers())
    except (AttributeError, ValueError):
        return None
    index = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
    found = [index.get(id(m)) for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]
    if not found or any(i is None for i in found):
        return len(layers)
    return len(layers) - min(found)


def _activation_bytes(
    backbone: Any,
    requests: list[Any],
    dtype_bytes: int,
    gradient_checkpointing: bool = False,
    kept_layers: int | None = None,
) -> tuple[int, int]:
    """(bytes, tokens) of one step's activations on the prompts of ``requests``, for a backward through the
    top ``kept_layers`` decoder layers (all of them when ``None``); see the module docstring."""
    from odedit_hf.editing.environments import CORE_GROUPS, build_edit_batch

    # every group, as a wrapper method's step runs them (text-only records have no rows in the image
    # groups, as in the step)
    batch = build_edit_batch(backbone, requests, CORE_GROUPS, num_rephrases=1, device="cpu")
    config = backbone.model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    if kept_layers is not None and 0 <= kept_layers <= layers:
        layers = kept_layers
    heads = int(getattr(text, "num_attention_heads", 1) or 1)
    ffn = int(getattr(text, "intermediate_size", 0) or getattr(text, "ffn_dim", 0) or 4 * hidden)
    vocab = int(getattr(text, "vocab_size", 0) or 0)
    total, tokens = 0, 0
    for b in batch.batches:
        rows, seq = b["input_ids"].shape
        tokens += int(b["attention_mask"].sum())
        per_layer = rows * seq * (6 * hidden + 3 * ffn + heads * seq) * dtype_bytes
        if gradient_checkpointing:  # the kept layers' inputs, plus one layer recomputed at a time
            total += rows * seq * hidden * dtype_bytes * layers + (per_layer if layers else 0)
        else:
            total += per_layer * layers
        total += rows * seq * vocab * 4 * 3  # fp32 logits, their log-softmax and their gradient
    return total, tokens


def estimate_edit_memory(
    method: Any,
    backbone: Any,
    requests: list[Any],
    *,
    batch_size: int = 1,
    gradient_checkpointing: bool = False,
) -> MemoryEstimate:
    """The memory estimate of editing ``requests`` with ``method`` on ``backbone`` (see the module docstring).

    ``gradient_checkpointing`` counts the activations as ``run_protocol(..., gradient_checkpointing=True)``
    keeps them.

    The method's adapter is wrapped once on ``backbone.model`` to count its trainable values, and
    unloaded; the base weights are checked unchanged afterwards.

    Raises:
        ValueError: the model already carries adapters, or no requests.
    """
    from peft import get_peft_model

    from odedit_hf.editing.editor import model_device
    from odedit_hf.editing.rollback import BaseWeights

    if not requests:
        raise ValueError("estimate_edit_memory: give at least one request")
    model = backbone.model
    if hasattr(model, "peft_config"):
        raise ValueError(
            "estimate_edit_memory: the model already carries PEFT adapters; pass the plain model"
        )
    device = model_device(model)
    base = BaseWeights(model)
    digest = base.digest()
    import torch

    with torch.random.fork_rng(devices=[]):  # the trial wrap draws adapter inits: leave the RNG as it was
        peft_model = get_peft_model(model, method.peft_config(backbone))
    try:
        try:
            params = list(method.edit_parameters(peft_model))
        except ValueError:  # growing editors: no trainable parameter before the first edit
            params = []
        num = sum(p.numel() for p in params)
        edit_bytes = sum(p.numel() * p.element_size() for p in params)
        kept = _kept_layers(backbone, peft_model)
    finally:
        peft_model.unload()
        base.restore_requires_grad()
    base.check(digest, context="after the memory estimate's trial wrap")
    dtype_bytes = next(model.parameters()).element_size()
    activations, tokens = _activation_bytes(
        backbone, list(requests[: max(1, batch_size)]), dtype_bytes, gradient_checkpointing, kept
    )
    extra = getattr(method, "extra_memory_bytes", None)
    placed = set(getattr(model, "hf_device_map", None) or {})
    spread = len({str(v) for v in (getattr(model, "hf_device_map", None) or {}).values()}) > 1
    if spread:
        logger.info(
            "the model is placed over several devices: the estimate is a total, not checked per device"
        )
    return MemoryEstimate(
        device=str(device),
        model=_model_bytes(model, None if placed else device),
        edit_parameters=edit_bytes,
        num_edit_parameters=num,
        gradients=edit_bytes,
        optimizer_state=2 * 4 * num,
        method_state=int(extra(num)) if callable(extra) else 0,
        activations=activations,
        tokens_per_step=tokens,
        available=None if spread else available_bytes(device),
        grows_per_edit=bool(getattr(method, "grows_per_edit", False)) or num == 0,
    )

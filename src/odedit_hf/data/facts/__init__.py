"""A shipped set of public facts and the real-knowledge edit benchmark built from it.

``load_facts()`` reads the shipped ``facts.jsonl`` (a few hundred facts of ten relations, each with a
counterfactual target, paraphrases and an unrelated locality fact); ``build_fact_benchmark(model_dir,
out)`` keeps those a pretrained model answers correctly before editing and writes them in EasyEdit's
ZsRE layout. How prompts are formatted (raw completion vs chat template) is decided once, in
:mod:`odedit_hf.data.facts.prompting`.
"""

from __future__ import annotations

from .benchmark import (
    DEFAULT_THRESHOLD,
    SCORE_KINDS,
    ZSRE_FIELDS,
    FactBenchmark,
    FactScore,
    build_fact_benchmark,
    score_facts,
    to_zsre_record,
)
from .load import FACT_FIELDS, FACTS_FILE, FACTS_VERSION, Fact, load_facts, shipped_facts_path, validate_facts
from .prompting import (
    DEFAULT_PROMPT_FORMAT,
    PREFILL_INSTRUCTION,
    PROMPT_FORMATS,
    FactPrompts,
    PromptFormat,
    fact_prompts,
    load_fact_prompts,
)

__all__ = [
    "DEFAULT_PROMPT_FORMAT",
    "DEFAULT_THRESHOLD",
    "FACTS_FILE",
    "FACTS_VERSION",
    "FACT_FIELDS",
    "PREFILL_INSTRUCTION",
    "PROMPT_FORMATS",
    "SCORE_KINDS",
    "ZSRE_FIELDS",
    "Fact",
    "FactBenchmark",
    "FactPrompts",
    "FactScore",
    "PromptFormat",
    "build_fact_benchmark",
    "fact_prompts",
    "load_fact_prompts",
    "load_facts",
    "score_facts",
    "shipped_facts_path",
    "to_zsre_record",
    "validate_facts",
]

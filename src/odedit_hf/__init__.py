"""odedit-hf: Hugging Face-native editing of facts inside multimodal LLMs.

Importing this package does no work beyond registering odedit-hf's PEFT methods with peft
(done by the method packages as they land); it configures no logging and seeds nothing.
"""

from __future__ import annotations

__version__ = "0.1.0.dev0"

# Registers every method's PEFT type (FTL, ODEDIT, ...) with peft: at once if peft is already
# imported, otherwise right after peft's own import, so this import stays free of torch and peft.
from odedit_hf._registration import install_peft_import_hook as _install_peft_import_hook

_install_peft_import_hook()

__all__ = ["__version__"]

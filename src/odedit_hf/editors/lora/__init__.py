"""LoRA as a base editor: peft's own ``LoraConfig`` on the targets the backbone registry names.

One name everywhere: folder ``lora``, method ``lora``, PEFT type ``LORA`` and prefix ``lora_`` (peft's
own; nothing is registered, LoRA adapters are plain peft adapters, saved and loaded with peft alone).
"""

from __future__ import annotations

from .method import LoRAMethod, lora_config_for

#: The method of this folder (``get_method("lora")``).
METHOD = LoRAMethod

__all__ = ["METHOD", "LoRAMethod", "lora_config_for"]

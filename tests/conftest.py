"""Shared pytest setup.

Triton runs its kernels on the CPU only in interpreter mode, and the variable must be set before
triton (or any kernel module) is imported — so it is set here, at conftest import, when no GPU is
present.
"""

from __future__ import annotations

import os
import shutil
import subprocess


def _has_cuda_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


if not _has_cuda_gpu():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

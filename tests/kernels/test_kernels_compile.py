"""Every Triton kernel compiles for sm_90 (H100) with its GPU block sizes, on a machine without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from odedit_kernels import triton_available

SCRIPT = Path(__file__).with_name("_compile_sm90.py")


def _ptxas_present() -> bool:
    if not triton_available():
        return False
    import importlib.util

    spec = importlib.util.find_spec("triton")
    root = Path(spec.origin).parent
    return (root / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.slow
@pytest.mark.skipif(not _ptxas_present(), reason="needs triton with its bundled NVIDIA ptxas")
def test_all_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300, env=env, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("ok   ") == 14, proc.stdout

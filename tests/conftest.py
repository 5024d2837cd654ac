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


# ---------------------------------------------------------------- embedded world (issue 3)
import hashlib  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402


def _world_source_hash() -> str:
    """Hash of the world package's sources: a cached micro world is reused only by the same code."""
    folder = pathlib.Path(__file__).resolve().parents[1] / "src" / "odedit_hf" / "data" / "world"
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


@pytest.fixture(scope="session")
def micro_world():
    """The micro embedded world (``odedit_hf.data.world.World``), built once and cached in the repo's
    gitignored ``.cache/worlds/`` (keyed by the world code's hash), so a test session builds it at most once."""
    from odedit_hf.data.world import build_world

    root = (
        pathlib.Path(__file__).resolve().parents[1]
        / ".cache"
        / "worlds"
        / f"micro-seed0-{_world_source_hash()}"
    )
    return build_world(preset="micro", seed=0, out=root, progress=False)

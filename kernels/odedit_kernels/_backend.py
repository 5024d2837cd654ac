"""Backend selection shared by every op: ``"auto"`` | ``"triton"`` | ``"torch"``.

Triton is an optional dependency: nothing here imports it. ``"auto"`` picks Triton only for CUDA
tensors of a dtype the kernels support and when Triton is installed; everything else runs the
pure-torch reference. ``"triton"`` on CPU tensors works only under the Triton interpreter
(``TRITON_INTERPRET=1`` set before Triton is first imported), which is how the tests run the kernels.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Literal

import torch

logger = logging.getLogger(__name__)

Backend = Literal["auto", "triton", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")
TRITON_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)

# Debug hook: when this variable is "1", launchers allocate every buffer a kernel must fill with NaN
# instead of leaving it uninitialised, so that an element no program writes shows up as NaN in tests.
POISON_ENV = "ODEDIT_KERNELS_POISON"


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` asks Triton to run kernels on the CPU with its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def poison_enabled() -> bool:
    """Whether launchers must pre-fill output buffers with NaN (see ``POISON_ENV``)."""
    return os.environ.get(POISON_ENV, "0") == "1"


def new_buffer(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer that the kernel must write completely: NaN-filled in poison mode, else empty."""
    if poison_enabled():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def resolve_backend(backend: str, op: str, *tensors: torch.Tensor) -> str:
    """Turn ``backend`` into ``"triton"`` or ``"torch"`` for ``tensors``; raise ``ValueError`` if it cannot run.

    Args:
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        op: name of the calling op, used in error messages.
        tensors: the floating-point inputs (all on one device, same dtype; checked by the caller).
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    device = tensors[0].device
    dtype = tensors[0].dtype
    if backend == "auto":
        if device.type == "cuda" and dtype in TRITON_DTYPES and triton_available():
            return "triton"
        if device.type == "cuda":
            logger.debug(
                "%s: using the torch reference (dtype %s, triton installed: %s)",
                op,
                dtype,
                triton_available(),
            )
        return "torch"
    # backend == "triton": say exactly why it cannot run rather than silently falling back.
    if not triton_available():
        raise ValueError(
            f"{op}: backend='triton' needs the 'triton' package; install it or use backend='torch'"
        )
    if dtype not in TRITON_DTYPES:
        raise ValueError(
            f"{op}: the Triton kernels support float32, float16 and bfloat16 inputs, got {dtype}; "
            "cast the inputs or use backend='torch'"
        )
    if device.type == "cpu":
        if not interpreter_enabled():
            raise ValueError(
                f"{op}: backend='triton' got CPU tensors; Triton runs on CPU only in interpreter mode "
                "(set TRITON_INTERPRET=1 before triton is first imported), otherwise move the tensors to a "
                "CUDA device or use backend='torch'"
            )
        return "triton"
    if device.type != "cuda":
        raise ValueError(
            f"{op}: backend='triton' supports CUDA (or CPU under TRITON_INTERPRET=1), got {device}"
        )
    return "triton"

"""Fixtures of the kernel tests: device choice, NaN poisoning, and the Triton availability gate.

On a machine without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton): fp32 only, tiny shapes, big blocks.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from odedit_kernels._backend import POISON_ENV, interpreter_enabled, triton_available


@pytest.fixture
def device() -> torch.device:
    """Where the Triton kernels run: the GPU when there is one, else the CPU under the interpreter."""
    if not triton_available():
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not interpreter_enabled():
        pytest.skip("no CUDA GPU and TRITON_INTERPRET is not set")
    return torch.device("cpu")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every kernel output buffer starts as NaN, so an element no program writes fails the test."""
    monkeypatch.setenv(POISON_ENV, "1")


@pytest.fixture(autouse=True)
def quiet_interpreter():
    # The interpreter evaluates both sides of tl.where with numpy: −inf − (−inf) in the masked lanes
    # warns although the selected value is finite. Real NaNs still fail the comparisons.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton")
        yield

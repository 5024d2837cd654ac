"""odedit_kernels as a package: no eager triton import, a working torch path without triton, the
backend switch, and the NaN-poison test hook itself."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

import odedit_kernels
from odedit_kernels._backend import POISON_ENV, new_buffer, resolve_backend


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_import_does_not_import_triton_and_cpu_auto_uses_torch():
    proc = _python(
        """
        import sys, torch, odedit_kernels as ok
        assert "triton" not in sys.modules, "import odedit_kernels imported triton"
        x, y = torch.randn(3, 4), torch.randn(2, 4)
        ok.rbf_mmd(x, y, [1.0])
        ok.kl_with_omega(torch.randn(2, 5), torch.randn(2, 5))
        ok.nll_with_omega(torch.randn(2, 5), torch.tensor([1, 2]))
        assert "triton" not in sys.modules, "the CPU 'auto' path imported triton"
        print("ok")
        """
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_works_without_triton_installed():
    proc = _python(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` fail and find_spec return None
        import torch, odedit_kernels as ok
        assert not ok.triton_available()
        print(float(ok.logits_kl(torch.zeros(2, 5), torch.ones(2, 5))))
        try:
            ok.rbf_mmd(torch.zeros(2, 3), torch.ones(2, 3), [1.0], backend="triton")
        except ValueError as err:
            assert "needs the 'triton' package" in str(err), err
        else:
            raise SystemExit("backend='triton' without triton did not raise")
        print("ok")
        """
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr


def test_resolve_backend_choices():
    cpu = torch.zeros(2)
    assert resolve_backend("auto", "op", cpu) == "torch"
    assert resolve_backend("torch", "op", cpu) == "torch"


def test_poison_hook_fills_buffers_with_nan(monkeypatch):
    monkeypatch.setenv(POISON_ENV, "1")
    assert torch.isnan(new_buffer((3, 2), dtype=torch.float32, device=torch.device("cpu"))).all()


def test_public_names():
    for name in ("rbf_mmd", "logits_kl", "kl_with_omega", "nll_with_omega"):
        assert callable(getattr(odedit_kernels, name))
        assert callable(getattr(odedit_kernels, f"{name}_reference"))

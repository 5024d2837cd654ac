"""Microbenchmarks of the kernels against eager torch and ``torch.compile`` (and Liger's KL if installed).

Shared by ``python -m benchmarks.kernel_bench`` and ``odedit-hf bench kernels``: this module measures and
formats, the callers print. Rows carry impl | op | shape | mode | ms p50 (p20–p80) | TFLOP/s or
GB/s | peak MB | speedup; a speedup is given only when that impl matched the eager reference in the
same run (checked on the benchmark inputs before timing, or on a reduced shape where eager torch
runs out of memory).

On CUDA the shapes are the issue's bars (MMD n = m = 2048, d = 4096, 5 bandwidths, bf16; KL and NLL
8192 × 32000 and 8192 × 151936, bf16). Without CUDA the references run at small fp32 shapes as a
smoke test, and the Triton kernels are checked for correctness under the interpreter (never timed:
the interpreter is numpy, its speed means nothing).

Throughput conventions (the same nominal count for every impl, so the ratios are speedups):
MMD FLOPs = 2·d·(n² + m² + nm) for the forward (the three Gram products), ×3 for forward+backward;
KL bytes = 2·R·V·s forward (read pre and post), +3·R·V·s backward (read both, write d_post);
NLL bytes = R·V·s forward, +2·R·V·s backward.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import importlib.metadata
import io
import json
import logging
import math
import os
import platform
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from odedit_kernels._backend import interpreter_enabled, triton_available
from odedit_kernels.kl import kl_with_omega, kl_with_omega_reference, nll_with_omega, nll_with_omega_reference
from odedit_kernels.mmd import rbf_mmd, rbf_mmd_reference

logger = logging.getLogger(__name__)

OPS: tuple[str, ...] = ("mmd", "kl", "nll")
MODES: tuple[str, ...] = ("fwd", "fwd+bwd")
# Relative tolerance (to the largest reference magnitude) of the in-run correctness gate, per dtype.
GATE_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@dataclasses.dataclass
class BenchRow:
    """One measured (impl, op, shape, mode); times in milliseconds, None where not measured."""

    impl: str
    op: str
    shape: str
    dtype: str
    mode: str
    ms_p50: float | None = None
    ms_p20: float | None = None
    ms_p80: float | None = None
    throughput: float | None = None
    unit: str = ""
    peak_mb: float | None = None
    speedup: float | None = None
    correct: bool | None = None
    note: str = ""


@dataclasses.dataclass
class BenchReport:
    env: dict[str, str]
    rows: list[BenchRow]
    notes: list[str]


@dataclasses.dataclass(frozen=True)
class _Case:
    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def label(self) -> str:
        return "×".join(str(s) for s in self.shape)


# ----------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------


def _git_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"


def environment(device: torch.device) -> dict[str, str]:
    """Device, versions and commit that head every table."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        name = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "absent"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version
        + (" (interpreter)" if device.type != "cuda" and interpreter_enabled() else ""),
        "python": platform.python_version(),
        "commit": _git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# ----------------------------------------------------------------------------------------------------
# Inputs and implementations
# ----------------------------------------------------------------------------------------------------


def _sigmas(d: int) -> list[float]:
    base = math.sqrt(2.0 * d)  # typical distance between two standard normal points in d dimensions
    return [base * f for f in (0.25, 0.5, 1.0, 2.0, 4.0)]


def _inputs(case: _Case, device: torch.device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    if case.op == "mmd":
        n, m, d = case.shape
        x = torch.randn(n, d, generator=g).to(device=device, dtype=case.dtype)
        y = (1.1 * torch.randn(m, d, generator=g) + 0.1).to(device=device, dtype=case.dtype)
        return {"diff": [x, y], "sigmas": _sigmas(d), "grads": [torch.ones((), device=device)]}
    rows, vocab = case.shape
    # Generated on the device in chunks: an 8192 × 151936 CPU tensor would cost seconds per case.
    gen = torch.Generator(device=device).manual_seed(0)
    pre = torch.randn(rows, vocab, generator=gen, device=device, dtype=torch.float32).mul_(2.0)
    post = (pre + torch.randn(rows, vocab, generator=gen, device=device, dtype=torch.float32)).to(case.dtype)
    pre = pre.to(case.dtype)
    g_a = torch.randn(rows, generator=gen, device=device)
    g_b = torch.randn(rows, generator=gen, device=device)
    if case.op == "kl":
        return {"diff": [post], "pre": pre, "grads": [g_a, g_b]}
    target = torch.randint(0, vocab, (rows,), generator=gen, device=device)
    return {"diff": [post], "target": target, "grads": [g_a, g_b]}


def _impl_fn(op: str, impl: str, inp: dict) -> Callable[[list[torch.Tensor]], tuple[torch.Tensor, ...]]:
    """A function of the differentiable inputs returning the op's outputs as a tuple."""
    if op == "mmd":
        sig = inp["sigmas"]
        if impl == "triton":
            return lambda d: (rbf_mmd(d[0], d[1], sig, backend="triton"),)
        fn = rbf_mmd_reference if impl == "torch" else torch.compile(rbf_mmd_reference)
        return lambda d: (fn(d[0], d[1], sig),)
    if op == "kl":
        pre = inp["pre"]
        if impl == "triton":
            return lambda d: kl_with_omega(pre, d[0], backend="triton")
        if impl == "liger":
            return _liger_kl(pre)
        fn = kl_with_omega_reference if impl == "torch" else torch.compile(kl_with_omega_reference)
        return lambda d: fn(pre, d[0])
    target = inp["target"]
    if impl == "triton":
        return lambda d: nll_with_omega(d[0], target, backend="triton")
    fn = nll_with_omega_reference if impl == "torch" else torch.compile(nll_with_omega_reference)
    return lambda d: fn(d[0], target)


def _liger_kl(pre: torch.Tensor) -> Callable[[list[torch.Tensor]], tuple[torch.Tensor, ...]]:
    """Liger-Kernel's KL divergence (log-probabilities in, KL only: no ω-derivative), rows summed."""
    from liger_kernel.transformers import LigerKLDIVLoss  # optional; ImportError means "skip"

    loss = LigerKLDIVLoss(reduction="sum", log_target=True)
    log_p0 = torch.log_softmax(pre.float(), -1)
    return lambda d: (loss(torch.log_softmax(d[0].float(), -1), log_p0),)


# ----------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------


def _step(fn, diff: list[torch.Tensor], grads: list[torch.Tensor], mode: str):
    outs = fn(diff)
    if mode == "fwd":
        return outs, ()
    # One combined backward over every output (loss and ω-derivative), as ODEdit's objective does.
    used = [(o, g) for o, g in zip(outs, grads)]
    return outs, torch.autograd.grad([o for o, _ in used], diff, [g.reshape(o.shape) for o, g in used])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, diff, grads, mode: str, device: torch.device, warmup: int, reps: int) -> list[float]:
    ctx = torch.no_grad() if mode == "fwd" else torch.enable_grad()
    with ctx:
        for _ in range(warmup):
            _step(fn, diff, grads, mode)
        _sync(device)
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                _step(fn, diff, grads, mode)
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                _step(fn, diff, grads, mode)
                times.append((time.perf_counter() - t0) * 1e3)
    return times


def _peak_mb(fn, diff, grads, mode: str, device: torch.device) -> float | None:
    """Peak memory above what was allocated before the call (CUDA only; None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    ctx = torch.no_grad() if mode == "fwd" else torch.enable_grad()
    with ctx:
        result = _step(fn, diff, grads, mode)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del result
    return peak / 2**20


def _quantile(values: Sequence[float], q: float) -> float:
    return float(torch.tensor(values, dtype=torch.float64).quantile(q))


def _work(case: _Case, mode: str) -> tuple[float, str]:
    """Nominal FLOPs (MMD, unit TFLOP/s) or bytes (KL/NLL, unit GB/s) of one call."""
    if case.op == "mmd":
        n, m, d = case.shape
        flops = 2.0 * d * (n * n + m * m + n * m)
        return (flops if mode == "fwd" else 3.0 * flops), "TFLOP/s"
    rows, vocab = case.shape
    size = torch.tensor([], dtype=case.dtype).element_size()
    per = rows * vocab * size
    if case.op == "kl":
        return (2.0 * per if mode == "fwd" else 5.0 * per), "GB/s"
    return (1.0 * per if mode == "fwd" else 3.0 * per), "GB/s"


def _max_rel_err(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    worst = 0.0
    for a, b in zip(got, want):
        if a.shape != b.shape:
            return math.inf
        a64, b64 = a.detach().double(), b.detach().double()
        if not torch.isfinite(a64).all():
            return math.inf
        worst = max(worst, (a64 - b64).abs().max().item() / max(b64.abs().max().item(), 1e-30))
    return worst


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def _all_outputs(fn, inp: dict) -> list[torch.Tensor]:
    """Outputs and gradients of one forward+backward, for the correctness gate."""
    diff = [t.detach().requires_grad_() for t in inp["diff"]]
    with torch.enable_grad():
        outs, grads = _step(fn, diff, inp["grads"], "fwd+bwd")
    return [o.detach() for o in outs] + [g.detach() for g in grads]


def _for_impl(impl: str, inp: dict) -> dict:
    """Liger's op returns one scalar (KL summed over rows): its grad_out is a scalar one."""
    if impl != "liger":
        return inp
    return {**inp, "grads": [torch.ones((), device=inp["pre"].device)]}


def _gate(case: _Case, impl: str, device: torch.device, notes: list[str]) -> tuple[bool, str]:
    """Compare ``impl`` to eager torch on the benchmark inputs (a reduced shape if eager runs out of memory)."""
    shapes = [case.shape]
    reduced = (min(case.shape[0], 256),) + case.shape[1:]
    if reduced != case.shape:
        shapes.append(reduced)
    for shape in shapes:
        check = _Case(case.op, shape, case.dtype)
        inp = _for_impl(impl, _inputs(check, device))
        try:
            if impl == "liger":
                want = _all_outputs(
                    lambda d, pre=inp["pre"]: (kl_with_omega_reference(pre, d[0])[0].sum(),), inp
                )
            else:
                want = _all_outputs(_impl_fn(case.op, "torch", inp), inp)
        except RuntimeError as err:
            if not _is_oom(err):
                raise
            del inp
            torch.cuda.empty_cache()
            continue
        err = _max_rel_err(_all_outputs(_impl_fn(case.op, impl, inp), inp), want)
        where = "bench shape" if shape == case.shape else f"reduced shape {check.label}"
        return err <= GATE_TOL[case.dtype], f"max rel err {err:.1e} vs eager ({where})"
    notes.append(f"{case.op} {case.label}: eager torch ran out of memory even at the reduced shape; no gate")
    return False, "no correctness gate (eager OOM)"


def _measure(
    case: _Case, impl: str, device: torch.device, warmup: int, reps: int, notes: list[str]
) -> list[BenchRow]:
    rows: list[BenchRow] = []
    dtype_name = str(case.dtype).replace("torch.", "")
    try:
        correct, detail = (True, "reference") if impl == "torch" else _gate(case, impl, device, notes)
    except ImportError as err:
        notes.append(f"{impl}: not installed ({err.name or err}); skipped")
        return rows
    except RuntimeError as err:
        if not _is_oom(err):
            raise
        correct, detail = False, "OOM in correctness check"
    inp = _for_impl(impl, _inputs(case, device))
    fn = _impl_fn(case.op, impl, inp)
    diff = [t.detach().requires_grad_() for t in inp["diff"]]
    for mode in MODES:
        row = BenchRow(impl=impl, op=case.op, shape=case.label, dtype=dtype_name, mode=mode, correct=correct)
        row.note = "" if correct else detail
        try:
            times = _time(fn, diff, inp["grads"], mode, device, warmup, reps)
            row.peak_mb = _peak_mb(fn, diff, inp["grads"], mode, device)
        except RuntimeError as err:
            if not _is_oom(err):
                raise
            torch.cuda.empty_cache()
            row.note = "OOM"
            rows.append(row)
            continue
        row.ms_p50, row.ms_p20, row.ms_p80 = (_quantile(times, q) for q in (0.5, 0.2, 0.8))
        work, row.unit = _work(case, mode)
        scale = 1e12 if row.unit == "TFLOP/s" else 1e9
        row.throughput = work / (row.ms_p50 * 1e-3) / scale
        if correct and impl != "torch":
            row.note = detail
        rows.append(row)
    return rows


def _interpreter_checks(notes: list[str], ops: Sequence[str]) -> None:
    """On CPU: the Triton kernels under the interpreter against the references (tiny fp32 shapes)."""
    if not (triton_available() and interpreter_enabled()):
        notes.append("triton interpreter correctness: not run (needs triton and TRITON_INTERPRET=1 at start)")
        return
    cpu = torch.device("cpu")
    cases = (
        _Case("mmd", (3, 5, 63), torch.float32),
        _Case("kl", (4, 1023), torch.float32),
        _Case("nll", (4, 1023), torch.float32),
    )
    for case in (c for c in cases if c.op in ops):
        inp = _inputs(case, cpu)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            # numpy evaluates both sides of tl.where: −inf − (−inf) in masked lanes warns, harmlessly.
            warnings.filterwarnings("ignore", category=RuntimeWarning)
            got = _all_outputs(_impl_fn(case.op, "triton", inp), inp)
        elapsed = time.perf_counter() - t0
        err = _max_rel_err(got, _all_outputs(_impl_fn(case.op, "torch", inp), inp))
        verdict = "pass" if err <= GATE_TOL[torch.float32] else "FAIL"
        notes.append(
            f"triton interpreter correctness {case.op} {case.label} fp32 fwd+bwd: {verdict} "
            f"(max rel err {err:.1e}, {elapsed:.2f} s in the interpreter)"
        )


def _cases(device: torch.device, ops: Sequence[str], quick: bool) -> list[_Case]:
    if device.type == "cuda":
        table = {
            "mmd": [_Case("mmd", (2048, 2048, 4096), torch.bfloat16)],
            "kl": [_Case("kl", (8192, 32000), torch.bfloat16), _Case("kl", (8192, 151936), torch.bfloat16)],
            "nll": [
                _Case("nll", (8192, 32000), torch.bfloat16),
                _Case("nll", (8192, 151936), torch.bfloat16),
            ],
        }
        if quick:
            table = {k: v[:1] for k, v in table.items()}
    else:
        small = 64 if quick else 256
        table = {
            "mmd": [_Case("mmd", (small, small, 512), torch.float32)],
            "kl": [_Case("kl", (small // 4, 32000), torch.float32)],
            "nll": [_Case("nll", (small // 4, 32000), torch.float32)],
        }
    return [case for op in ops for case in table[op]]


def run_benchmarks(
    *,
    device: str = "auto",
    ops: Sequence[str] = OPS,
    compile_: bool | None = None,
    quick: bool = False,
    warmup: int | None = None,
    reps: int | None = None,
) -> BenchReport:
    """Measure every (op, impl, mode) and return the rows; see the module docstring for conventions.

    Args:
        device: ``"auto"`` (CUDA when present), ``"cuda"`` or ``"cpu"``.
        ops: subset of ``("mmd", "kl", "nll")``.
        compile_: include ``torch.compile`` of the reference; None = on CUDA only (on this CPU a
            compile of one op with its backward takes ~35 s).
        quick: smaller CPU shapes / one shape per op on CUDA.
        warmup, reps: timing loop sizes (defaults 3/20 on CUDA, 2/5 on CPU).
    """
    bad = [op for op in ops if op not in OPS]
    if bad:
        raise ValueError(f"run_benchmarks: unknown ops {bad}; choose from {OPS}")
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"run_benchmarks: device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("run_benchmarks: device='cuda' but torch sees no CUDA device; use --device cpu")
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else device.replace("auto", "cpu")
    )
    warmup = warmup if warmup is not None else (3 if dev.type == "cuda" else 2)
    reps = reps if reps is not None else (20 if dev.type == "cuda" else 5)
    compile_ = (dev.type == "cuda") if compile_ is None else compile_
    notes: list[str] = []
    impls = ["torch"]
    if dev.type == "cuda":
        if triton_available():
            impls.insert(0, "triton")
        else:
            notes.append("triton not installed: kernels not timed")
    else:
        notes.append("no CUDA device: references only, at small fp32 shapes (a smoke test, not the bars)")
        _interpreter_checks(notes, ops)
    if compile_:
        impls.append("torch.compile")
    else:
        notes.append(
            "torch.compile skipped"
            + (" on CPU (~35 s compile per op here; pass --compile)" if dev.type != "cuda" else "")
        )
    rows: list[BenchRow] = []
    for case in _cases(dev, ops, quick):
        case_impls = impls + (["liger"] if case.op == "kl" and dev.type == "cuda" else [])
        case_rows = []
        for impl in case_impls:
            logger.info("benchmark %s %s %s", case.op, case.label, impl)
            case_rows += _measure(case, impl, dev, warmup, reps, notes)
        base = {r.mode: r.ms_p50 for r in case_rows if r.impl == "torch" and r.ms_p50}
        for r in case_rows:
            if r.correct and r.ms_p50 and base.get(r.mode):
                r.speedup = base[r.mode] / r.ms_p50
        rows += case_rows
    return BenchReport(env=environment(dev), rows=rows, notes=list(dict.fromkeys(notes)))


# ----------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def format_table(report: BenchReport) -> str:
    """Markdown table headed by device, versions and commit."""
    env = report.env
    lines = [
        f"device: {env['device']}",
        f"torch {env['torch']} | triton {env['triton']} | python {env['python']} | commit {env['commit']} | {env['date']}",
        "",
        "| impl | op | shape | dtype | mode | ms p50 (p20–p80) | TFLOP/s or GB/s | peak MB | speedup | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.rows:
        ms = "—" if r.ms_p50 is None else f"{r.ms_p50:.3f} ({r.ms_p20:.3f}–{r.ms_p80:.3f})"
        thr = "—" if r.throughput is None else f"{r.throughput:.2f} {r.unit}"
        speed = "—" if r.speedup is None else f"{r.speedup:.2f}×"
        lines.append(
            f"| {r.impl} | {r.op} | {r.shape} | {r.dtype} | {r.mode} | {ms} | {thr} | {_fmt(r.peak_mb, '.0f')} | {speed} | {r.note} |"
        )
    if report.notes:
        lines.append("")
        lines += [f"- {n}" for n in report.notes]
    return "\n".join(lines)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(report: BenchReport, out: str | os.PathLike) -> list[Path]:
    """Write ``kernels-<timestamp>.csv`` and ``.json`` into directory ``out`` (or ``out``.csv/.json if it has a suffix)."""
    out = Path(out)
    if out.suffix:
        stem = out.with_suffix("")
    else:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        stem = out / f"kernels-{stamp}"
    fields = [f.name for f in dataclasses.fields(BenchRow)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(report.env) + fields)
    writer.writeheader()
    for r in report.rows:
        writer.writerow({**report.env, **dataclasses.asdict(r)})
    csv_path, json_path = stem.with_suffix(".csv"), stem.with_suffix(".json")
    _atomic_write(csv_path, buf.getvalue())
    payload = {"env": report.env, "notes": report.notes, "rows": [dataclasses.asdict(r) for r in report.rows]}
    _atomic_write(json_path, json.dumps(payload, indent=2) + "\n")
    return [csv_path, json_path]


# ----------------------------------------------------------------------------------------------------
# Command line: the options are defined in odedit_hf.cli.bench (torch-free, for a fast --help)
# ----------------------------------------------------------------------------------------------------


def run_from_args(args: argparse.Namespace) -> tuple[str, list[Path]]:
    """Run with parsed arguments; returns the formatted table and the files written."""
    for name in ("warmup", "reps"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            raise ValueError(f"--{name} must be >= {0 if name == 'warmup' else 1}, got {value}")
    report = run_benchmarks(
        device=args.device,
        ops=args.ops,
        compile_=args.compile_,
        quick=args.quick,
        warmup=args.warmup,
        reps=args.reps,
    )
    return format_table(report), write_report(report, args.out)

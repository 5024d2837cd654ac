"""GPU check: kernel tests in fp32/fp16/bf16, kernel benchmarks at the bar shapes, ODEdit's cost ratio.

Usage::

    python benchmarks/gpu_check.py [--dry-run] [--out-dir benchmarks/gpu] [--skip-install]
                                   [--time-budget-s 480] [--parts kernel_tests,kernel_bench,cost_ratio]

One script for whenever a GPU machine is lent (one H200, at most 8 minutes). Parts, in order:

1. ``environment``: imports what the parts need (nothing is installed when the imports work; a
   missing package is pip-installed unless ``--skip-install``, and listed if that fails: the GPU
   machine has no network), and records device, versions, commit and date. The project itself is
   used from this checkout (``src/`` and ``kernels/`` on the path), not installed.
2. ``kernel_tests``: ``pytest tests/kernels -m "not slow"`` with the GPU present, so the fp16 and
   bf16 cases run next to the fp32 ones; outcomes are counted per dtype. Without pytest, a built-in
   sweep checks every kernel against its reference in the three dtypes instead.
3. ``kernel_bench``: MMD n = m = 2048, d = 4096, 5 bandwidths; KL 8192 x 32000 and 8192 x 151936
   (then NLL at the same shapes if time is left), bf16, forward and forward+backward, Triton vs eager
   torch vs ``torch.compile`` (and Liger's KL when installed), each impl gated against eager torch on
   the same inputs before it is timed.
4. ``cost_ratio``: time per edit of ODEdit+FT-L vs FT-L and ODEdit+LoRA vs LoRA (equal steps, no
   early stop; also ODEdit+FT-L with the torch references instead of the Triton kernels) on a
   random-init LLaVA whose language model has a real-size Llama config (hidden 2048, intermediate
   8192, 32 heads / 8 KV heads, vocab 32000, 4 layers) in bf16, with a 16x16-pixel CLIP tower and
   synthetic images; methods built by ``odedit_hf.editing.get_method``.

Each measuring part runs in its own process with its own time budget (a share of
``--time-budget-s``; time a part leaves unused passes to the next) and is killed when the budget is
spent; what it measured until then is kept. A part that cannot start (budget spent, a package
missing) is recorded as skipped with the reason. Writes ``gpu_check.json`` (every figure, the
status of each part), ``gpu_check.md`` (tables) and ``gpu_check.log`` (the parts' output) into
``--out-dir`` after every part.

``--dry-run``: the same parts on the CPU at tiny shapes (MMD n = m = 64, d = 32; KL 64 x 512; a
2-layer tiny LLaVA, 2 requests, 2 steps), fp32 kernel tests only, Triton in its interpreter
(``TRITON_INTERPRET=1``, set before triton is imported; gated, not timed) and ``torch.compile`` with
the ``eager`` backend (inductor's C++ build takes ~35 s per op on this CPU): a test of the script, not
of speed. It takes ~35 s of one core.

Exit status: 1 when a correctness check failed (a kernel test, a benchmark gate of the Triton
kernels, unequal edit steps), 2 when a part crashed or no CUDA device was found without
``--dry-run``, else 0 (skipped or time-limited parts do not fail the check; the JSON says why).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUT = HERE / "gpu"
SCHEMA = 1

PARTS = ("kernel_tests", "kernel_bench", "cost_ratio")
# share of --time-budget-s per part (what a part leaves unused goes to the next); the environment
# part and the report writing take the rest
SHARES = {"kernel_tests": 0.25, "kernel_bench": 0.40, "cost_ratio": 0.30}
MIN_BUDGET_S = {"gpu": 30.0, "dry-run": 4.0}
# import name -> (pip name, parts that cannot run without it); triton is needed by no part as a whole
# (without it the Triton rows and tests are skipped), pytest by none (the built-in sweep replaces it)
REQUIREMENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "torch": ("torch", PARTS),
    "numpy": ("numpy", PARTS),
    "triton": ("triton", ()),
    "pytest": ("pytest", ()),
    "transformers": ("transformers", ("cost_ratio",)),
    "peft": ("peft", ("cost_ratio",)),
    "tokenizers": ("tokenizers", ("cost_ratio",)),
    "PIL": ("pillow", ("cost_ratio",)),
    "safetensors": ("safetensors", ("cost_ratio",)),
}
# this checkout's own packages (used from src/ and kernels/, never installed)
PROJECT_MODULES: dict[str, tuple[str, ...]] = {
    "odedit_kernels": ("kernel_tests", "kernel_bench"),
    "odedit_hf.editing": ("cost_ratio",),
    "odedit_hf.testing": ("cost_ratio",),
}

# Kernel tests left out of the GPU run, with the reason recorded in the JSON (none since the bench smoke
# test reads the interpreter note by whether the interpreter is on).
GPU_DESELECT: dict[str, str] = {}

# Bar shapes on the GPU; tiny ones for the dry run.
GPU_BENCH = {
    "dtype": "bfloat16",
    "primary": [("mmd", [2048, 2048, 4096]), ("kl", [8192, 32000]), ("kl", [8192, 151936])],
    "secondary": [("nll", [8192, 32000]), ("nll", [8192, 151936])],
    "warmup": 3,
    "reps": 20,
    "compile_backend": "inductor",
}
DRY_BENCH = {
    "dtype": "float32",
    "primary": [("mmd", [64, 64, 32]), ("kl", [64, 512])],
    "secondary": [],
    "warmup": 1,
    "reps": 2,
    "compile_backend": "eager",
}
GPU_COST = {
    "text_config": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 4,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "max_position_embeddings": 2048,
    },
    "dtype": "bfloat16",
    "n_requests": 8,
    "steps": 20,
    "rounds": 3,
}
DRY_COST = {
    "text_config": {"num_hidden_layers": 2},
    "dtype": "bfloat16",
    "n_requests": 2,
    "steps": 2,
    "rounds": 1,
}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------


def _version(module: Any, name: str) -> str:
    if name in PROJECT_MODULES:
        return "this checkout"
    version = getattr(module, "__version__", None)
    if version:
        return str(version)
    try:
        return importlib.metadata.version(REQUIREMENTS.get(name, (name,))[0])
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _probe(names: list[str], *, import_: bool) -> dict[str, dict[str, str]]:
    """``{name: {"version": ...}}`` or ``{name: {"error": ...}}`` per module.

    With ``import_`` each module is imported (a broken install shows up here, not in a part);
    without, it is only looked up (``find_spec``), which the dry run uses to save ~10 s of imports.
    """
    importlib.invalidate_caches()
    found: dict[str, dict[str, str]] = {}
    for name in names:
        try:
            if import_:
                found[name] = {"version": _version(importlib.import_module(name), name)}
            elif importlib.util.find_spec(name) is None:
                found[name] = {"error": f"ModuleNotFoundError: no module named {name!r}"}
            else:
                found[name] = {"version": _version(None, name) + " (found, not imported)"}
        except Exception as err:  # noqa: BLE001 - ImportError, or a broken install raising anything
            found[name] = {"error": f"{type(err).__name__}: {err}"[:500]}
    return found


def _pip_install(pip_names: list[str], timeout_s: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pip", "install", "--retries", "0", "--timeout", "10", *pip_names]
    print(f"[environment] trying: {shlex.join(cmd)}", flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {
            "command": shlex.join(cmd),
            "returncode": None,
            "output_tail": f"timed out after {timeout_s:.0f} s",
        }
    except OSError as err:
        return {"command": shlex.join(cmd), "returncode": None, "output_tail": str(err)}
    return {
        "command": shlex.join(cmd),
        "returncode": proc.returncode,
        "output_tail": (proc.stdout + proc.stderr)[-1500:],
    }


def _git(*args: str) -> str | None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return None
    try:
        proc = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _source_hash() -> str:
    """sha256 (12 hex) of the code the check runs: src/, kernels/, tests/kernels/, benchmarks/gpu_*."""
    digest = hashlib.sha256()
    files = [p for folder in ("src", "kernels", "tests/kernels") for p in (ROOT / folder).rglob("*.py")]
    files += list(HERE.glob("gpu_*.py"))
    for path in sorted(files):
        if "__pycache__" in path.parts:
            continue
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _device_info(dry_run: bool) -> dict[str, Any]:
    info: dict[str, Any] = {"cuda_available": False, "cpu": f"{platform.processor() or platform.machine()}"}
    info["cpu"] += f", {os.cpu_count()} cores"
    if dry_run:  # torch is not imported here in the dry run (its parts import it): ~3 s saved
        return info
    try:
        import torch
    except Exception as err:  # noqa: BLE001
        info["error"] = f"torch does not import: {err}"
        return info
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = bool(torch.cuda.is_available())
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            count=torch.cuda.device_count(),
        )
    if shutil.which("nvidia-smi"):
        try:
            proc = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
            info["nvidia_smi"] = proc.stdout.strip()
        except (OSError, subprocess.SubprocessError) as err:
            info["nvidia_smi"] = f"failed: {err}"
    info["torch_threads"] = torch.get_num_threads()
    return info


def environment_part(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """Imports (and installs when asked and needed), device, versions, commit."""
    start = time.monotonic()
    for folder in (ROOT / "kernels", ROOT / "src"):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    third_party = list(REQUIREMENTS)
    device = _device_info(args.dry_run)
    # import everything on a GPU machine (a broken install shows here); only look modules up in the dry
    # run and where the GPU check cannot run anyway (no CUDA), to save their ~10 s of imports
    import_ = mode == "gpu" and bool(device.get("cuda_available"))
    imports = _probe(third_party, import_=import_)
    install: dict[str, Any] | None = None
    missing = [n for n in third_party if "error" in imports[n]]
    if missing and not args.skip_install:
        install = _pip_install([REQUIREMENTS[n][0] for n in missing], timeout_s=90.0)
        imports.update(_probe(missing, import_=True))
        if "torch" in missing and "version" in imports["torch"]:
            device = _device_info(args.dry_run)
    imports.update(_probe(list(PROJECT_MODULES), import_=import_))
    missing = [n for n in imports if "error" in imports[n]]
    commit = args.commit or os.environ.get("GPU_CHECK_COMMIT") or _git("rev-parse", "--short=12", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    result: dict[str, Any] = {
        "mode": mode,
        "date": _now(),
        "commit": (commit or "unknown (no git checkout; pass --commit)") + ("-dirty" if dirty else ""),
        "source_hash": _source_hash(),
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "imports": imports,
        "missing": missing,
        "install": install
        if install is not None
        else ("skipped (--skip-install)" if missing else "not needed"),
        "device": device,
        "env": {
            k: os.environ.get(k) for k in ("TRITON_INTERPRET", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
        },
    }
    if mode == "gpu" and not device.get("cuda_available"):
        result["status"] = "error"
        result["reason"] = (
            "no CUDA device visible to torch: run on the GPU machine, or use --dry-run on a CPU"
        )
    elif missing:
        result["status"] = "partial"
        result["reason"] = "missing: " + ", ".join(
            f"{n} ({imports[n]['error'].split(':')[0]})" for n in missing
        )
    else:
        result["status"] = "pass"
    result["seconds"] = time.monotonic() - start
    return result


# ----------------------------------------------------------------------------------------------------
# Running a part under a time limit
# ----------------------------------------------------------------------------------------------------


def _child_env(mode: str) -> dict[str, str]:
    env = dict(os.environ)
    # not benchmarks/ itself: its kernels.py would shadow Hugging Face's `kernels` package, which
    # transformers looks up (and imports) at import time; the pytest plugin is benchmarks.gpu_pytest_plugin
    path = [str(ROOT / "src"), str(ROOT / "kernels")]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(path)
    env["TRITON_INTERPRET"] = "1" if mode == "dry-run" else "0"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run_limited(cmd: list[str], env: dict[str, str], budget_s: float, log: Path) -> tuple[int | None, float]:
    """Run ``cmd`` in its own process group, output appended to ``log``; kill the group after ``budget_s``.

    Returns (exit status, or None when it was killed; seconds).
    """
    start = time.monotonic()
    cpu0 = _children_cpu_s()
    with open(log, "a", encoding="utf-8") as handle:
        handle.write(f"\n===== {_now()} $ {shlex.join(cmd)}\n")
        handle.flush()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            returncode: int | None = proc.wait(timeout=max(budget_s, 1.0))
        except (subprocess.TimeoutExpired, KeyboardInterrupt) as err:
            for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 30.0)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=wait_s)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
            if isinstance(err, KeyboardInterrupt):
                raise
            returncode = None
            handle.write(f"\n===== killed after {budget_s:.0f} s (the part's time budget)\n")
        handle.write(f"===== {time.monotonic() - start:.1f} s wall, {_children_cpu_s() - cpu0:.1f} s CPU\n")
    return returncode, time.monotonic() - start


def _children_cpu_s() -> float:
    """CPU seconds (user + system) of the finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _log_tail(log: Path, lines: int = 25) -> str:
    try:
        return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _run_worker(part: str, cfg: dict[str, Any], budget_s: float, ctx: dict[str, Any]) -> dict[str, Any]:
    """Run ``gpu_parts.py <part>`` under ``budget_s``; its result JSON, or an error/timeout record."""
    grace = max(3.0, min(30.0, 0.15 * budget_s))
    cfg = {**cfg, "deadline": time.time() + budget_s - grace}
    work = Path(ctx["workdir"])
    cfg_path, out_path = work / f"{part}.config.json", work / f"{part}.result.json"
    cfg_path.write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    cmd = [
        sys.executable,
        str(HERE / "gpu_parts.py"),
        part,
        "--config",
        str(cfg_path),
        "--out",
        str(out_path),
    ]
    returncode, seconds = _run_limited(cmd, ctx["env"], budget_s, ctx["log"])
    try:
        result = json.loads(out_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        result = {}
    if returncode is None:
        result["status"] = "timeout"
        result["reason"] = (
            f"killed when its {budget_s:.0f} s budget was spent; figures measured before are kept"
        )
    elif returncode != 0 or "status" not in result:
        result["status"] = "error"
        result["reason"] = result.get("reason") or f"exit status {returncode}; see gpu_check.log"
    result["seconds"] = seconds
    return result


# ----------------------------------------------------------------------------------------------------
# Parts
# ----------------------------------------------------------------------------------------------------


def _summarise_tests(records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    by_dtype: dict[str, dict[str, int]] = {}
    skip_reasons: dict[str, int] = {}
    failures = []
    for nodeid, rec in records.items():
        counts = by_dtype.setdefault(rec["dtype"], {})
        counts[rec["outcome"]] = counts.get(rec["outcome"], 0) + 1
        if rec["outcome"] == "skipped":
            skip_reasons[rec["message"]] = skip_reasons.get(rec["message"], 0) + 1
        if rec["outcome"] in ("failed", "error"):
            failures.append({"test": nodeid, "dtype": rec["dtype"], "message": rec["message"][-800:]})
    totals: dict[str, int] = {}
    for counts in by_dtype.values():
        for k, v in counts.items():
            totals[k] = totals.get(k, 0) + v
    return {"by_dtype": by_dtype, "totals": totals, "skip_reasons": skip_reasons, "failures": failures}


def kernel_tests_part(budget_s: float, ctx: dict[str, Any]) -> dict[str, Any]:
    mode = ctx["mode"]
    if "error" in ctx["imports"].get("pytest", {"error": "?"}):
        dtypes = ["float32"] if mode == "dry-run" else ["float32", "float16", "bfloat16"]
        cfg = {"device": "cpu" if mode == "dry-run" else "cuda", "dtypes": dtypes}
        result = _run_worker("kernel_sweep", cfg, budget_s, ctx)
        result["runner"] = "built-in sweep (pytest is missing)"
        return result
    if mode == "dry-run":  # the Triton-vs-reference tests of the two kernel files (fp32; fp16/bf16 skip)
        targets = ["tests/kernels/test_kernels_mmd.py", "tests/kernels/test_kernels_kl.py"]
        targets += ["-k", "triton_matches_reference or half_precision"]
    else:
        targets = ["tests/kernels"] + [arg for test in GPU_DESELECT for arg in ("--deselect", test)]
    report = Path(ctx["workdir"]) / "pytest.json"
    cmd = [sys.executable, "-m", "pytest", *targets, "-q", "-m", "not slow", "-p", "no:cacheprovider"]
    cmd += ["-p", "benchmarks.gpu_pytest_plugin"]  # importable: `python -m` puts the cwd (ROOT) on sys.path
    env = {**ctx["env"], "GPU_CHECK_PYTEST_JSON": str(report)}
    returncode, seconds = _run_limited(cmd, env, budget_s, ctx["log"])
    result: dict[str, Any] = {
        "runner": "pytest " + shlex.join(cmd[3:]),
        "seconds": seconds,
        "exit_status": returncode,
    }
    if mode == "gpu":
        result["deselected"] = dict(GPU_DESELECT)
    try:
        payload = json.loads(report.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        payload = None
    if payload is not None:
        result.update(_summarise_tests(payload["tests"]))
    if returncode is None:
        result["status"] = "timeout"
        result["reason"] = f"pytest killed when its {budget_s:.0f} s budget was spent"
        return result
    if payload is None:
        result["status"] = "error"
        result["reason"] = f"pytest exited with {returncode} without a report; see gpu_check.log"
        result["log_tail"] = _log_tail(ctx["log"])
        return result
    totals, by_dtype = result["totals"], result["by_dtype"]
    half_passed = sum(by_dtype.get(d, {}).get("passed", 0) for d in ("float16", "bfloat16"))
    if result["failures"]:
        result["status"] = "fail"
        result["reason"] = f"{len(result['failures'])} kernel test(s) failed: " + ", ".join(
            f["test"].split("::")[-1] for f in result["failures"][:6]
        )
    elif returncode != 0:
        result["status"] = "error"
        result["reason"] = f"pytest exited with {returncode} (no test failed); see gpu_check.log"
    elif not totals.get("passed"):
        result["status"] = "error"
        result["reason"] = "no kernel test passed"
    elif mode == "gpu" and half_passed == 0:
        result["status"] = "partial"
        result["reason"] = "the fp16/bf16 cases did not run: " + ("; ".join(result["skip_reasons"]) or "?")
    else:
        result["status"] = "pass"
        if mode == "dry-run":
            result["reason"] = "CPU interpreter: fp32 cases only (the fp16/bf16 cases are skipped off-GPU)"
    return result


def _bench_jobs(spec: dict[str, Any], on_gpu: bool) -> list[dict[str, Any]]:
    """Measurements in priority order: Triton and eager first, then torch.compile, Liger, the NLL."""
    dtype = spec["dtype"]
    job = lambda op, shape, impl: {"op": op, "shape": shape, "dtype": dtype, "impl": impl}  # noqa: E731
    jobs = [job(op, shape, impl) for op, shape in spec["primary"] for impl in ("triton", "torch")]
    jobs += [job(op, shape, "torch.compile") for op, shape in spec["primary"]]
    if on_gpu:
        jobs += [job(op, shape, "liger") for op, shape in spec["primary"] if op == "kl"]
    jobs += [
        job(op, shape, impl)
        for op, shape in spec["secondary"]
        for impl in ("triton", "torch", "torch.compile")
    ]
    return jobs


def kernel_bench_part(budget_s: float, ctx: dict[str, Any]) -> dict[str, Any]:
    on_gpu = ctx["mode"] == "gpu"
    spec = GPU_BENCH if on_gpu else DRY_BENCH
    cfg = {
        "device": "cuda" if on_gpu else "cpu",
        "jobs": _bench_jobs(spec, on_gpu),
        "warmup": spec["warmup"],
        "reps": spec["reps"],
        "compile_backend": spec["compile_backend"],
    }
    return _run_worker("kernel_bench", cfg, budget_s, ctx)


def cost_ratio_part(budget_s: float, ctx: dict[str, Any]) -> dict[str, Any]:
    on_gpu = ctx["mode"] == "gpu"
    spec = GPU_COST if on_gpu else DRY_COST
    methods = [{"label": name, "name": name} for name in ("ft", "odedit+ft", "lora", "odedit+lora")]
    # the same ODEdit+FT-L with the pure-torch references: what the Triton kernels save end to end (on
    # the CPU both run the references: the dry run only exercises the code path)
    methods.append(
        {"label": "odedit+ft (torch kernels)", "name": "odedit+ft", "kwargs": {"kernel_backend": "torch"}}
    )
    cfg = {**spec, "device": "cuda" if on_gpu else "cpu", "methods": methods}
    # the dry run also checks that the fallback LLaVA builder (for transformers releases without the PIL
    # CLIP image processor tiny_backbone uses) gives the very model and batches of tiny_backbone
    cfg["check_fallback"] = not on_gpu
    return _run_worker("cost_ratio", cfg, budget_s, ctx)


PART_FUNCS = {
    "kernel_tests": kernel_tests_part,
    "kernel_bench": kernel_bench_part,
    "cost_ratio": cost_ratio_part,
}


def _needs(part: str, ctx: dict[str, Any]) -> list[str]:
    """The missing imports that keep ``part`` from running at all."""
    missing = [n for n, (_, parts) in REQUIREMENTS.items() if part in parts and "error" in ctx["imports"][n]]
    return missing + [
        n for n, parts in PROJECT_MODULES.items() if part in parts and "error" in ctx["imports"][n]
    ]


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


def _f(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _env_lines(report: dict[str, Any]) -> list[str]:
    env = report["parts"]["environment"]
    dev = env["device"]
    versions = ", ".join(
        f"{n} {env['imports'][n].get('version', 'MISSING')}"
        for n in ("torch", "triton", "transformers", "peft", "pytest")
        if n in env["imports"]
    )
    if dev.get("name"):
        device = f"{dev['name']} ({dev.get('memory_gib')} GiB, sm {dev.get('capability')}), CUDA {dev.get('torch_cuda')}"
        if dev.get("nvidia_smi"):
            device += f", nvidia-smi: {dev['nvidia_smi']}"
    else:
        threads = dev.get("torch_threads") or report["parts"].get("kernel_bench", {}).get("torch_threads")
        device = f"CPU {dev.get('cpu')}, torch threads {threads or '?'}"
    lines = [
        f"device: {device}",
        f"{versions} | python {env['python'].split()[0]}",
        f"commit {env['commit']} (source hash {env['source_hash']}) | {env['date']}",
        f"command: `{report['command']}`",
    ]
    if env["missing"]:
        lines.append(f"**missing:** {', '.join(env['missing'])} (install: {_install_text(env['install'])})")
    return lines


def _install_text(install: Any) -> str:
    if isinstance(install, dict):
        return f"`{install['command']}` -> exit {install['returncode']}"
    return str(install)


def _tests_md(part: dict[str, Any]) -> list[str]:
    lines = [f"runner: `{part.get('runner', '?')}`", ""]
    by_dtype = part.get("by_dtype")
    if by_dtype:
        lines += ["| dtype | passed | failed | error | skipped |", "|---|---|---|---|---|"]
        for dtype in sorted(by_dtype):
            c = by_dtype[dtype]
            lines.append(
                f"| {dtype} | {c.get('passed', 0)} | {c.get('failed', 0)} | {c.get('error', 0)} | {c.get('skipped', 0)} |"
            )
        for reason, count in part.get("skip_reasons", {}).items():
            lines.append(f"- skipped ({count}): {reason}")
        for test, reason in part.get("deselected", {}).items():
            lines.append(f"- deselected: `{test}`: {reason}")
        for fail in part.get("failures", []):
            lines.append(f"- **{fail['test']}**: {fail['message'][-300:]!r}")
    for check in part.get("checks", []):  # built-in sweep
        verdict = "pass" if check["passed"] else "FAIL"
        lines.append(
            f"- {check['op']} {check['shape']} {check['dtype']}: {verdict} "
            f"(max rel err {_f(check.get('max_rel_err'), '.1e')}) {check.get('error', '')}"
        )
    return lines


def _bench_md(part: dict[str, Any]) -> list[str]:
    lines = [
        "| impl | op | shape | dtype | mode | ms p50 (p20–p80) | TFLOP/s or GB/s | peak MB | vs eager | "
        "Triton vs compile | max rel err (gate) | first call s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in part.get("rows", []):
        ms = "—" if r.get("ms_p50") is None else f"{r['ms_p50']:.3f} ({r['ms_p20']:.3f}–{r['ms_p80']:.3f})"
        thr = "—" if r.get("throughput") is None else f"{r['throughput']:.2f} {r['unit']}"
        gate = f"{r['max_rel_err']:.1e}" + ("" if r["correct"] else f" > {r['tol']:.0e} FAIL")
        lines.append(
            f"| {r['impl']} | {r['op']} | {r['shape']} | {r['dtype']} | {r['mode']} | {ms} | {thr} | "
            f"{_f(r.get('peak_mb'), '.0f')} | {_f(r.get('speedup_vs_eager'), '.2f')} | "
            f"{_f(r.get('speedup_vs_compile'), '.2f')} | {gate} | {r['first_call_s']:.2f} |"
        )
    for note in part.get("notes", []):
        lines.append(f"- {note}")
    for err in part.get("errors", []):
        lines.append(f"- error: {err['impl']} {err['op']} {err['shape']}: {err['error'][:300]}")
    for skip in part.get("skipped", []):
        lines.append(f"- not run: {skip['impl']} {skip['op']} {skip['shape']}: {skip['reason']}")
    return lines


def _cost_md(part: dict[str, Any]) -> list[str]:
    lines = []
    model, cfg = part.get("model"), part.get("config", {})
    if model:
        tc = ", ".join(f"{k} {v}" for k, v in model["text_config"].items())
        lines.append(
            f"model: {model['class']} ({model['builder']}), language model {tc}; {model['parameters']:,} "
            f"parameters, {model['dtype']} on {model['device']}; edit prompt {model['edit_sequence_length']} tokens"
        )
    if cfg:
        lines.append(
            f"{cfg.get('n_requests')} synthetic requests x {part.get('rounds_done')} of {cfg.get('rounds')} rounds, "
            f"{cfg.get('steps')} steps per edit (stop_loss off; ODEdit penalty from step 0, so every method runs the same steps), methods interleaved round-robin, "
            "adapter restored before each edit; times from synchronised wall clock"
        )
    lines += [
        "",
        "| method | edits | steps | s/edit median (p20–p80) | s/edit mean | edit peak MB | trainable params | warm-up edit s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in part.get("rows", []):
        lines.append(
            f"| {r['method']} | {r['edits']} | {','.join(map(str, r['steps']))} | {r['s_per_edit_median']:.4f} "
            f"({r['s_per_edit_p20']:.4f}–{r['s_per_edit_p80']:.4f}) | {r['s_per_edit_mean']:.4f} | "
            f"{_f(r.get('edit_peak_mb'), '.0f')} | {r.get('trainable_params', 0):,} | {_f(r.get('warmup_edit_s'), '.2f')} |"
        )
    if part.get("ratios"):
        lines.append("")
        lines += [f"- **{k}**: {v:.2f}x (median time per edit)" for k, v in part["ratios"].items()]
    for note in part.get("notes", []):
        lines.append(f"- {note}")
    for label, err in part.get("errors", {}).items():
        lines.append(f"- error: {label}: {err[:300]}")
    if "fallback_check" in part:
        lines.append(f"- fallback LLaVA builder vs tiny_backbone: {part['fallback_check']}")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    mode = report["mode"]
    title = "GPU check" if mode == "gpu" else "GPU check — CPU dry run (tiny shapes; not performance figures)"
    lines = [f"# {title}", "", *_env_lines(report), ""]
    lines += ["| part | status | seconds | budget s | note |", "|---|---|---|---|---|"]
    for name, part in report["parts"].items():
        reason = str(part.get("reason", "")).replace("|", "/").replace("\n", " ")[:300]
        lines.append(
            f"| {name} | {part['status']} | {_f(part.get('seconds'), '.1f')} | {_f(part.get('budget_s'), '.0f')} | {reason} |"
        )
    lines.append(
        f"\ntotal {report['total_s']:.1f} s of a {report['time_budget_s']:.0f} s budget; exit status {report['exit_status']}"
    )
    sections = (
        ("kernel_tests", "Kernel tests", _tests_md),
        ("kernel_bench", "Kernel benchmarks", _bench_md),
        ("cost_ratio", "ODEdit cost ratio", _cost_md),
    )
    for key, heading, fn in sections:
        part = report["parts"].get(key)
        if part and part["status"] != "skipped":
            lines += ["", f"## {heading}", "", *fn(part)]
    return "\n".join(lines) + "\n"


def exit_status(parts: dict[str, dict[str, Any]]) -> int:
    statuses = [p["status"] for p in parts.values()]
    if "fail" in statuses:
        return 1
    if "error" in statuses:
        return 2
    return 0


def write_report(report: dict[str, Any], out_dir: Path, t0: float) -> None:
    report["total_s"] = time.monotonic() - t0
    report["exit_status"] = exit_status(report["parts"])
    _atomic_write(out_dir / "gpu_check.json", json.dumps(report, indent=2, default=str) + "\n")
    _atomic_write(out_dir / "gpu_check.md", render_markdown(report))


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/gpu_check.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter")
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT), help="where gpu_check.json/.md/.log go")
    parser.add_argument(
        "--skip-install", action="store_true", help="never run pip, only list what is missing"
    )
    parser.add_argument("--time-budget-s", type=float, default=480.0, help="the whole check's time budget")
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated subset of {','.join(PARTS)} (environment always runs)",
    )
    parser.add_argument("--commit", help="commit id to record when the checkout has no .git (else git's)")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        parser.error(f"--parts: unknown part(s) {bad}; choose from {','.join(PARTS)}")
    if args.time_budget_s <= 0:
        parser.error(f"--time-budget-s must be > 0, got {args.time_budget_s}")
    args.parts = parts
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = "dry-run" if args.dry_run else "gpu"
    # before anything imports triton: the interpreter for the dry run, compiled kernels on the GPU
    os.environ["TRITON_INTERPRET"] = "1" if args.dry_run else "0"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "gpu_check.log"
    log.write_text(f"gpu_check {mode} started {_now()}\n", encoding="utf-8")
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "mode": mode,
        "command": shlex.join(
            [Path(sys.executable).name, "benchmarks/gpu_check.py", *(argv or sys.argv[1:])]
        ),
        "time_budget_s": args.time_budget_s,
        "parts": {},
    }
    env_part = environment_part(args, mode)
    env_part["budget_s"] = None
    report["parts"]["environment"] = env_part
    print(f"[environment] {env_part['status']}: {env_part.get('reason', '')}".rstrip(": "), flush=True)
    if env_part["missing"]:
        print("MISSING (parts that need them are skipped):", flush=True)
        for name in env_part["missing"]:
            print(f"  - {name}: {env_part['imports'][name]['error']}", flush=True)
    ctx = {"mode": mode, "imports": env_part["imports"], "env": _child_env(mode), "log": log}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir:
        ctx["workdir"] = workdir
        carry = 0.0
        for name in PARTS:
            if env_part["status"] == "error":
                report["parts"][name] = {"status": "skipped", "reason": f"environment: {env_part['reason']}"}
                continue
            if name not in args.parts:
                report["parts"][name] = {"status": "skipped", "reason": "not in --parts"}
                continue
            left = args.time_budget_s - (time.monotonic() - t0) - 3.0  # 3 s for the report
            budget = min(SHARES[name] * args.time_budget_s + carry, left)
            missing = _needs(name, ctx)
            if missing:
                part = {"status": "skipped", "reason": "missing: " + ", ".join(missing)}
            elif budget < MIN_BUDGET_S[mode]:
                part = {
                    "status": "skipped",
                    "reason": f"time budget spent ({max(left, 0):.0f} s left of the whole)",
                }
            else:
                print(f"[{name}] running, budget {budget:.0f} s", flush=True)
                part = PART_FUNCS[name](budget, ctx)
                carry = max(budget - part.get("seconds", budget), 0.0)
            part["budget_s"] = budget
            report["parts"][name] = part
            print(
                f"[{name}] {part['status']} in {part.get('seconds', 0):.1f} s: {part.get('reason', '')}",
                flush=True,
            )
            if part["status"] in ("error", "timeout", "fail") and "seconds" in part:
                print(_log_tail(log, 30), flush=True)
            write_report(report, out_dir, t0)
    write_report(report, out_dir, t0)
    print(render_markdown(report), flush=True)
    print(f"wrote {out_dir / 'gpu_check.json'} and {out_dir / 'gpu_check.md'}", flush=True)
    return report["exit_status"]


if __name__ == "__main__":
    # run as a script, this folder is sys.path[0]: its kernels.py would shadow Hugging Face's `kernels`
    # package, which transformers looks up (and imports) when the environment part imports it
    if sys.path and Path(sys.path[0] or ".").resolve() == HERE:
        sys.path.pop(0)
    sys.exit(main())

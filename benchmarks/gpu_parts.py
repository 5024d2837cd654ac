"""The measuring parts of ``benchmarks/gpu_check.py``, each run in its own process under a time limit.

    python benchmarks/gpu_parts.py {kernel_bench,kernel_sweep,cost_ratio} --config CFG.json --out RESULT.json

``gpu_check.py`` writes the config, starts the part, and kills it when its budget is spent; the part
stops starting new measurements at ``config["deadline"]`` (a ``time.time()`` value set a little before
the kill) and rewrites ``RESULT.json`` after every measurement, so that whatever was measured
survives a kill. Every result carries ``status`` (``pass`` | ``fail`` | ``partial`` | ``error``) and
a ``reason`` when it is not ``pass``.

- ``kernel_bench``: the Triton kernels against eager torch and ``torch.compile`` (and Liger's KL when
  installed), forward and forward+backward, each impl gated against eager torch on the same inputs.
  Same conventions as ``odedit_kernels.bench`` (inputs, nominal FLOP/byte counts), own loop so that
  the shapes, the order of the measurements and the compile backend can be chosen.
- ``kernel_sweep``: the fallback when pytest is missing: each kernel against its reference in
  float32, float16 and bfloat16 (forward and every gradient) at small awkward shapes.
- ``cost_ratio``: time per edit of ODEdit+FT-L vs FT-L and ODEdit+LoRA vs LoRA (equal steps, no
  early stop) on a random-init LLaVA whose language model has a real-size config, edits interleaved
  round-robin so that a load change hits every method alike.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Atomic JSON write (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, default=str)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def _free(device: Any) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _dtype(name: str) -> Any:
    import torch

    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"gpu_parts: dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


# ----------------------------------------------------------------------------------------------------
# Kernel benchmark
# ----------------------------------------------------------------------------------------------------


def _sigmas(d: int) -> list[float]:
    base = math.sqrt(2.0 * d)  # typical distance of two standard normal points in d dimensions
    return [base * f for f in (0.25, 0.5, 1.0, 2.0, 4.0)]  # the bar's 5 bandwidths


def _bench_inputs(op: str, shape: list[int], dtype: Any, device: Any) -> dict[str, Any]:
    """The inputs of ``odedit_kernels.bench`` (same distributions), generated on the device."""
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    if op == "mmd":
        n, m, d = shape
        x = torch.randn(n, d, generator=gen, device=device).to(dtype)
        y = (1.1 * torch.randn(m, d, generator=gen, device=device) + 0.1).to(dtype)
        return {"diff": [x, y], "sigmas": _sigmas(d), "grads": [torch.ones((), device=device)]}
    rows, vocab = shape
    pre = torch.randn(rows, vocab, generator=gen, device=device).mul_(2.0)
    post = (pre + torch.randn(rows, vocab, generator=gen, device=device)).to(dtype)
    pre = pre.to(dtype)
    grads = [torch.randn(rows, generator=gen, device=device), torch.randn(rows, generator=gen, device=device)]
    if op == "kl":
        return {"diff": [post], "pre": pre, "grads": grads}
    target = torch.randint(0, vocab, (rows,), generator=gen, device=device)
    return {"diff": [post], "target": target, "grads": grads}


def _op_fn(op: str, impl: str, inp: dict[str, Any], compile_backend: str) -> Callable[[list[Any]], tuple]:
    """A function of the differentiable inputs that returns the op's outputs as a tuple."""
    import torch

    from odedit_kernels import (
        kl_with_omega,
        kl_with_omega_reference,
        nll_with_omega,
        nll_with_omega_reference,
        rbf_mmd,
        rbf_mmd_reference,
    )

    def compiled(fn: Callable) -> Callable:
        return torch.compile(fn, backend=compile_backend, dynamic=False)

    if impl == "liger":
        from liger_kernel.transformers import LigerKLDIVLoss  # optional: ImportError means "skip"

        loss = LigerKLDIVLoss(reduction="sum", log_target=True)
        log_p0 = torch.log_softmax(inp["pre"].float(), -1)
        return lambda d: (loss(torch.log_softmax(d[0].float(), -1), log_p0),)
    if op == "mmd":
        sig = inp["sigmas"]
        if impl == "triton":
            return lambda d: (rbf_mmd(d[0], d[1], sig, backend="triton"),)
        fn = rbf_mmd_reference if impl == "torch" else compiled(rbf_mmd_reference)
        return lambda d: (fn(d[0], d[1], sig),)
    if op == "kl":
        pre = inp["pre"]
        if impl == "triton":
            return lambda d: kl_with_omega(pre, d[0], backend="triton")
        fn = kl_with_omega_reference if impl == "torch" else compiled(kl_with_omega_reference)
        return lambda d: fn(pre, d[0])
    target = inp["target"]
    if impl == "triton":
        return lambda d: nll_with_omega(d[0], target, backend="triton")
    fn = nll_with_omega_reference if impl == "torch" else compiled(nll_with_omega_reference)
    return lambda d: fn(d[0], target)


def _step(fn: Callable, diff: list[Any], grads: list[Any], mode: str) -> tuple:
    outs = fn(diff)
    if mode == "fwd":
        return outs, ()
    import torch

    # one combined backward over every output (loss and ω-derivative), as ODEdit's objective does
    return outs, torch.autograd.grad(list(outs), diff, [g.reshape(o.shape) for o, g in zip(outs, grads)])


def _all_outputs(fn: Callable, inp: dict[str, Any], grads: list[Any]) -> list[Any]:
    import torch

    diff = [t.detach().requires_grad_() for t in inp["diff"]]
    with torch.enable_grad():
        outs, dgrads = _step(fn, diff, grads, "fwd+bwd")
    return [o.detach() for o in outs] + [g.detach() for g in dgrads]


def _max_rel_err(got: list[Any], want: list[Any]) -> float:
    import torch

    if len(got) != len(want):
        return math.inf
    worst = 0.0
    for a, b in zip(got, want):
        if a.shape != b.shape or not torch.isfinite(a.double()).all():
            return math.inf
        a64, b64 = a.double(), b.double()
        worst = max(worst, (a64 - b64).abs().max().item() / max(b64.abs().max().item(), 1e-30))
    return worst


def _time_mode(fn, diff, grads, mode: str, device, warmup: int, reps: int) -> list[float]:
    import torch

    ctx = torch.no_grad() if mode == "fwd" else torch.enable_grad()
    times: list[float] = []
    with ctx:
        for _ in range(warmup):
            _step(fn, diff, grads, mode)
        _sync(device)
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


def _peak_mb(fn, diff, grads, mode: str, device) -> float | None:
    """Peak CUDA memory of one call above what was allocated before it (None on CPU)."""
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.no_grad() if mode == "fwd" else torch.enable_grad():
        out = _step(fn, diff, grads, mode)
    torch.cuda.synchronize(device)
    del out
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _work(op: str, shape: list[int], dtype: Any, mode: str) -> tuple[float, str]:
    """The nominal work of one call (the conventions of ``odedit_kernels.bench``)."""
    import torch

    if op == "mmd":
        n, m, d = shape
        flops = 2.0 * d * (n * n + m * m + n * m)
        return (flops if mode == "fwd" else 3.0 * flops), "TFLOP/s"
    rows, vocab = shape
    per = rows * vocab * torch.tensor([], dtype=dtype).element_size()
    if op == "kl":
        return (2.0 * per if mode == "fwd" else 5.0 * per), "GB/s"
    return (1.0 * per if mode == "fwd" else 3.0 * per), "GB/s"


def _measure(job: dict[str, Any], cfg: dict[str, Any], device: Any) -> list[dict[str, Any]]:
    """Rows (one per mode) of one (op, shape, impl): correctness gate first, then the timings."""
    from odedit_kernels.bench import GATE_TOL

    op, shape, impl = job["op"], job["shape"], job["impl"]
    dtype = _dtype(job["dtype"])
    label = "x".join(str(s) for s in shape)
    base = {"op": op, "shape": label, "dtype": job["dtype"], "impl": impl}
    if impl == "torch.compile":
        base["impl"] = f"torch.compile[{cfg['compile_backend']}]"
    inp = _bench_inputs(op, shape, dtype, device)
    grads = inp["grads"] if impl != "liger" else [inp["grads"][0].new_ones(())]
    t0 = time.perf_counter()
    fn = _op_fn(op, impl, inp, cfg["compile_backend"])
    got = _all_outputs(fn, inp, grads)
    _sync(device)
    first_call_s = time.perf_counter() - t0  # compile (torch.compile) or JIT (Triton) included
    if impl == "torch":
        err = 0.0
    else:
        if impl == "liger":
            from odedit_kernels import kl_with_omega_reference

            pre = inp["pre"]
            want = _all_outputs(lambda d: (kl_with_omega_reference(pre, d[0])[0].sum(),), inp, grads)
        else:
            want = _all_outputs(_op_fn(op, "torch", inp, cfg["compile_backend"]), inp, grads)
        err = _max_rel_err(got, want)
        del want
    del got
    correct = err <= GATE_TOL[dtype]
    rows = []
    diff = [t.detach().requires_grad_() for t in inp["diff"]]
    for mode in ("fwd", "fwd+bwd"):
        row = {
            **base,
            "mode": mode,
            "max_rel_err": err,
            "tol": GATE_TOL[dtype],
            "correct": correct,
            "first_call_s": first_call_s,
        }
        if impl == "triton" and device.type == "cpu":
            # the interpreter is numpy: its speed means nothing, so it is checked (the gate) but not timed
            row["note"] = "Triton interpreter: gated, not timed"
            rows.append(row)
            continue
        try:
            times = _time_mode(fn, diff, grads, mode, device, cfg["warmup"], cfg["reps"])
            row["peak_mb"] = _peak_mb(fn, diff, grads, mode, device)
        except RuntimeError as err_:
            if not _is_oom(err_):
                raise
            _free(device)
            row["note"] = "out of memory"
            rows.append(row)
            continue
        row["ms_p50"], row["ms_p20"], row["ms_p80"] = (_quantile(times, q) for q in (0.5, 0.2, 0.8))
        row["reps"] = len(times)
        work, unit = _work(op, shape, dtype, mode)
        row["throughput"] = work / (row["ms_p50"] * 1e-3) / (1e12 if unit == "TFLOP/s" else 1e9)
        row["unit"] = unit
        rows.append(row)
    return rows


def _speedups(rows: list[dict[str, Any]]) -> None:
    """``speedup_vs_eager`` and (Triton rows) ``speedup_vs_compile`` where both sides are correct."""
    key = lambda r: (r["op"], r["shape"], r["dtype"], r["mode"])  # noqa: E731
    eager = {key(r): r["ms_p50"] for r in rows if r["impl"] == "torch" and r.get("ms_p50")}
    comp = {
        key(r): r["ms_p50"]
        for r in rows
        if r["impl"].startswith("torch.compile") and r.get("ms_p50") and r["correct"]
    }
    for r in rows:
        if not (r.get("ms_p50") and r["correct"]):
            continue
        if key(r) in eager:
            r["speedup_vs_eager"] = eager[key(r)] / r["ms_p50"]
        if r["impl"] == "triton" and key(r) in comp:
            r["speedup_vs_compile"] = comp[key(r)] / r["ms_p50"]


def _bench_status(result: dict[str, Any]) -> None:
    rows, errors, skipped = result["rows"], result["errors"], result["skipped"]
    bad_triton = [r for r in rows if r["impl"] == "triton" and not r["correct"]]
    triton_errors = [e for e in errors if e["impl"] == "triton"]
    if bad_triton:
        result["status"] = "fail"
        result["reason"] = "Triton output differs from eager torch: " + "; ".join(
            f"{r['op']} {r['shape']} {r['mode']} max rel err {r['max_rel_err']:.2e} > {r['tol']:.0e}"
            for r in bad_triton
        )
    elif triton_errors:
        result["status"] = "error"
        result["reason"] = "a Triton kernel raised: " + "; ".join(
            f"{e['op']} {e['shape']}: {e['error'][:200]}" for e in triton_errors
        )
    elif [s for s in skipped if s["impl"] != "liger"] or errors:  # Liger is optional: a note, not a gap
        result["status"] = "partial"
        parts = []
        gaps = [s for s in skipped if s["impl"] != "liger"]
        if gaps:
            parts.append(f"{len(gaps)} measurement(s) not run ({gaps[0]['reason']})")
        if errors:
            parts.append(f"{len(errors)} non-Triton measurement(s) raised")
        result["reason"] = "; ".join(parts)
    else:
        result["status"] = "pass"
        result.pop("reason", None)


def run_kernel_bench(cfg: dict[str, Any], out: Path) -> dict[str, Any]:
    import torch

    from odedit_kernels import triton_available

    device = torch.device(cfg["device"])
    result: dict[str, Any] = {
        "status": "partial",
        "reason": "running",
        "config": {k: v for k, v in cfg.items() if k != "jobs"},
        "rows": [],
        "errors": [],
        "skipped": [],
        "notes": list(cfg.get("notes", [])),
    }
    if device.type == "cpu":
        result["notes"].append(
            "CPU dry run: Triton runs in its numpy interpreter, torch.compile with the "
            f"{cfg['compile_backend']!r} backend; times are smoke-test figures, not performance claims"
        )
    jobs = list(cfg["jobs"])
    if not triton_available():
        result["skipped"] += [
            {**j, "reason": "triton is not installed"} for j in jobs if j["impl"] == "triton"
        ]
        jobs = [j for j in jobs if j["impl"] != "triton"]
    for i, job in enumerate(jobs):
        if time.time() > cfg["deadline"]:
            result["skipped"] += [{**j, "reason": "the part's time budget was spent"} for j in jobs[i:]]
            break
        print(f"[kernel_bench] {job['op']} {job['shape']} {job['dtype']} {job['impl']}", flush=True)
        try:
            with warnings.catch_warnings():
                # the interpreter evaluates both sides of tl.where: -inf - (-inf) in masked lanes warns
                warnings.filterwarnings("ignore", category=RuntimeWarning)
                result["rows"] += _measure(job, cfg, device)
        except ImportError as err:
            result["skipped"].append({**job, "reason": f"not installed: {err.name or err}"})
        except Exception as err:  # noqa: BLE001 - recorded per measurement; the others still run
            result["errors"].append({**job, "error": f"{type(err).__name__}: {err}"[:2000]})
            print(traceback.format_exc(), file=sys.stderr, flush=True)
        finally:
            _free(device)
        _speedups(result["rows"])
        write_json(out, result)
    _speedups(result["rows"])
    _bench_status(result)
    return result


# ----------------------------------------------------------------------------------------------------
# Kernel dtype sweep (the fallback when pytest is missing)
# ----------------------------------------------------------------------------------------------------

# Tolerances of tests/kernels (relative to the largest reference magnitude), per dtype.
_SWEEP_TOL = {
    "mmd": {"float32": 2e-5, "float16": 5e-3, "bfloat16": 2e-2},
    "kl": {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2},
    "nll": {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2},
}


def run_kernel_sweep(cfg: dict[str, Any], out: Path) -> dict[str, Any]:
    """Each kernel against its reference, forward and every gradient, per dtype (shapes of the tests)."""
    import torch

    device = torch.device(cfg["device"])
    shapes = {"mmd": [300, 200, 257], "kl": [64, 32001], "nll": [64, 32001]}
    if device.type == "cpu":
        shapes = {"mmd": [40, 70, 63], "kl": [5, 1023], "nll": [5, 1023]}
    result: dict[str, Any] = {"status": "partial", "checks": [], "skipped": [], "config": cfg}
    for dtype_name in cfg["dtypes"]:
        for op, shape in shapes.items():
            if time.time() > cfg["deadline"]:
                result["skipped"].append({"op": op, "dtype": dtype_name, "reason": "time budget spent"})
                continue
            dtype = _dtype(dtype_name)
            inp = _bench_inputs(op, shape, dtype, device)
            check = {"op": op, "shape": "x".join(map(str, shape)), "dtype": dtype_name}
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", category=RuntimeWarning)
                    got = _all_outputs(_op_fn(op, "triton", inp, "inductor"), inp, inp["grads"])
                want = _all_outputs(_op_fn(op, "torch", inp, "inductor"), inp, inp["grads"])
                err = _max_rel_err(got, want)
                check.update(max_rel_err=err, tol=_SWEEP_TOL[op][dtype_name])
                check["passed"] = err <= _SWEEP_TOL[op][dtype_name]
            except Exception as exc:  # noqa: BLE001 - recorded; the other checks still run
                check.update(passed=False, error=f"{type(exc).__name__}: {exc}"[:2000])
            result["checks"].append(check)
            write_json(out, result)
    failed = [c for c in result["checks"] if not c["passed"]]
    if failed:
        result["status"] = "fail"
        result["reason"] = "; ".join(
            f"{c['op']} {c['dtype']}: " + (c.get("error") or f"max rel err {c['max_rel_err']:.2e}")
            for c in failed
        )
    elif result["skipped"]:
        result["status"], result["reason"] = "partial", "time budget spent before every check ran"
    else:
        result["status"] = "pass"
    return result


# ----------------------------------------------------------------------------------------------------
# ODEdit cost ratio
# ----------------------------------------------------------------------------------------------------

_WORDS = ["cube", "ball", "tree", "house", "car", "bird", "fish", "lamp"]
_COLOURS = ["red", "blue", "green", "yellow", "black", "white", "pink", "gray"]


def _corpus() -> list[str]:
    texts = [f"what color is the {w}" for w in _WORDS] + [f"which colour has the {w}" for w in _WORDS]
    return texts + _COLOURS + ["what is the capital of france", "paris", "what animal is this", "cat"]


def _requests(folder: str, n: int) -> list[Any]:
    """``n`` synthetic VQA edit requests with their images (cost does not depend on what is true)."""
    from odedit_hf.data import EditRequest
    from odedit_hf.testing import tiny_image

    paths = []
    for i in range(3 * n):
        paths.append(os.path.join(folder, f"img{i}.png"))
        tiny_image(100 + i).save(paths[-1])
    return [
        EditRequest(
            case_id=i,
            task="vqa",
            source="gpu_check synthetic",
            src=f"what color is the {_WORDS[i % 8]}",
            pred="red",
            alt=_COLOURS[(i + 3) % 8],
            image=paths[i],
            rephrase=f"which colour has the {_WORDS[i % 8]}",
            image_rephrase=paths[n + i],
            loc="what is the capital of france",
            loc_ans="paris",
            m_loc=paths[2 * n + i],
            m_loc_q="what animal is this",
            m_loc_a="cat",
        )
        for i in range(n)
    ]


def _llava_fallback(text_config: dict[str, Any], seed: int) -> Any:
    """The tiny LLaVA of ``odedit_hf.testing`` rebuilt with ``transformers.CLIPImageProcessor``.

    Used only when ``tiny_backbone("llava")`` cannot be built with the installed transformers (its
    PIL image processor class exists only in recent 5.x releases); same sizes and processor settings.
    """
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from odedit_hf.backbones import Backbone
    from odedit_hf.testing import DEFAULT_CORPUS, train_tokenizer

    tok = train_tokenizer([*DEFAULT_CORPUS, *_corpus()], extra_special_tokens={"image_token": "<image>"})
    text = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "vocab_size": len(tok),
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        **text_config,
    }
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
        projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**text),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessor(
        size={"height": 16, "width": 16}, crop_size={"height": 16, "width": 16}, do_center_crop=False
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    model.eval()
    return Backbone(model, processor)


def _build_backbone(cfg: dict[str, Any], notes: list[str]) -> tuple[Any, str]:
    from odedit_hf.testing import tiny_backbone

    try:
        return tiny_backbone(
            "llava", texts=_corpus(), text_config=cfg["text_config"], seed=0
        ), "tiny_backbone"
    except (ImportError, AttributeError) as err:
        notes.append(
            f"tiny_backbone('llava') failed ({type(err).__name__}: {err}); used the fallback builder"
        )
        return _llava_fallback(cfg["text_config"], seed=0), "fallback (transformers.CLIPImageProcessor)"


def _check_fallback(base: Any, cfg: dict[str, Any], requests: list[Any]) -> dict[str, Any]:
    """Whether :func:`_llava_fallback` builds the very model and batches of ``tiny_backbone`` (dry run)."""
    import torch

    from odedit_hf.editing import edit_samples

    other = _llava_fallback(cfg["text_config"], seed=0)
    got, want = (b.build_batch(edit_samples(requests)) for b in (other, base))
    same_batch = set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    mine, theirs = list(other.model.named_parameters()), list(base.model.named_parameters())
    same_params = len(mine) == len(theirs) and all(
        na == nb and torch.equal(a, b) for (na, a), (nb, b) in zip(mine, theirs)
    )
    return {"identical_batches": same_batch, "identical_parameters": same_params}


def _method(spec: dict[str, Any], steps: int) -> Any:
    from odedit_hf.editing import get_method

    kwargs = {"steps": steps, "stop_loss": None, **spec.get("kwargs", {})}
    if spec["name"].startswith("odedit+"):
        # the per-step cost at equal steps: ODEdit's default warm-up schedule (config version 2) adds up to
        # penalty_steps primal-dual steps after the editor's budget, so the ratio is taken penalty-from-start
        kwargs.setdefault("schedule", "from_start")
        return get_method("odedit", editor=spec["name"].split("+", 1)[1], **kwargs)
    return get_method(spec["name"], **kwargs)


def _cost_summary(result: dict[str, Any]) -> None:
    times = result["times_s"]
    rows = []
    for label, values in times.items():
        if not values:
            continue
        rows.append(
            {
                "method": label,
                "edits": len(values),
                "s_per_edit_median": statistics.median(values),
                "s_per_edit_mean": statistics.mean(values),
                "s_per_edit_p20": _quantile(values, 0.2),
                "s_per_edit_p80": _quantile(values, 0.8),
                "steps": sorted(set(result["steps"][label])),
                "edit_peak_mb": max(result["peak_mb"][label]) if result["peak_mb"][label] else None,
                **result["setup"][label],
            }
        )
    result["rows"] = rows
    med = {r["method"]: r["s_per_edit_median"] for r in rows}
    ratios = {}
    for r in rows:
        base = r["method"].split("+", 1)[1].split(" ")[0] if r["method"].startswith("odedit+") else None
        if base and base in med:
            ratios[f"{r['method']} / {base}"] = r["s_per_edit_median"] / med[base]
    if "odedit+ft" in med and "odedit+ft (torch kernels)" in med:
        ratios["odedit+ft (torch kernels) / odedit+ft"] = med["odedit+ft (torch kernels)"] / med["odedit+ft"]
    result["ratios"] = ratios


def run_cost_ratio(cfg: dict[str, Any], out: Path) -> dict[str, Any]:
    import torch
    from peft import get_peft_model

    from odedit_hf.backbones import Backbone
    from odedit_hf.editing import AdapterSnapshot, edit_samples

    device = torch.device(cfg["device"])
    dtype = _dtype(cfg["dtype"])
    labels = [m["label"] for m in cfg["methods"]]
    result: dict[str, Any] = {
        "status": "partial",
        "reason": "running",
        "config": cfg,
        "notes": [],
        "setup": {label: {} for label in labels},
        "times_s": {label: [] for label in labels},
        "steps": {label: [] for label in labels},
        "peak_mb": {label: [] for label in labels},
        "rounds_done": 0,
        "rows": [],
        "ratios": {},
        "errors": {},
    }
    if device.type == "cpu":
        result["notes"].append(
            "CPU dry run at a tiny config: a smoke test of the code path, not a cost claim; on the CPU "
            "'odedit+ft (torch kernels)' and 'odedit+ft' both run the torch references"
        )
    with tempfile.TemporaryDirectory() as tmp:
        requests = _requests(tmp, cfg["n_requests"])
        t0 = time.perf_counter()
        base, builder = _build_backbone(cfg, result["notes"])
        if cfg.get("check_fallback"):
            result["fallback_check"] = _check_fallback(base, cfg, requests)
        base.model.to(device=device, dtype=dtype)
        result["model"] = {
            "builder": builder,
            "class": type(base.model).__name__,
            "text_config": {k: getattr(base.model.config.text_config, k, None) for k in cfg["text_config"]},
            "parameters": sum(p.numel() for p in base.model.parameters()),
            "dtype": cfg["dtype"],
            "device": str(device),
            "edit_sequence_length": int(base.build_batch(edit_samples(requests[:1]))["input_ids"].shape[1]),
            "build_s": time.perf_counter() - t0,
        }
        setups = {}
        for spec in cfg["methods"]:
            label = spec["label"]
            if time.time() > cfg["deadline"]:
                result["notes"].append(f"{label}: not set up (time budget spent)")
                continue
            print(f"[cost_ratio] set up {label}", flush=True)
            start = time.perf_counter()
            try:
                method = _method(spec, cfg["steps"])
                backbone = Backbone(copy.deepcopy(base.model), base.processor)
                model = get_peft_model(backbone.model, method.peft_config(backbone))
                snapshot = AdapterSnapshot(model, model.active_adapter)
                _sync(device)
                warm = time.perf_counter()
                method.edit(model, backbone, requests[:1])  # warm-up: Triton JIT, allocator, cuBLAS set-up
                _sync(device)
                snapshot.restore()
            except Exception as err:  # noqa: BLE001 - recorded; the other methods still run
                result["errors"][label] = f"set-up: {type(err).__name__}: {err}"[:2000]
                print(traceback.format_exc(), file=sys.stderr, flush=True)
                continue
            result["setup"][label] = {
                "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "warmup_edit_s": time.perf_counter() - warm,
                "setup_s": time.perf_counter() - start,
            }
            setups[label] = (method, backbone, model, snapshot)
        del base
        write_json(out, result)
        stop = False
        for _ in range(cfg["rounds"]):
            for request in requests:
                if time.time() > cfg["deadline"]:
                    stop = True
                    break
                for label, (method, backbone, model, snapshot) in list(setups.items()):
                    snapshot.restore()
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                        before = torch.cuda.memory_allocated(device)
                    _sync(device)
                    start = time.perf_counter()
                    try:
                        stats = method.edit(model, backbone, [request])
                    except Exception as err:  # noqa: BLE001 - e.g. a diverged edit: drop the method
                        result["errors"][label] = f"edit: {type(err).__name__}: {err}"[:2000]
                        print(traceback.format_exc(), file=sys.stderr, flush=True)
                        del setups[label]
                        continue
                    _sync(device)
                    result["times_s"][label].append(time.perf_counter() - start)
                    result["steps"][label].append(stats.steps)
                    if device.type == "cuda":
                        result["peak_mb"][label].append(
                            (torch.cuda.max_memory_allocated(device) - before) / 2**20
                        )
            if stop:
                break
            result["rounds_done"] += 1
            _cost_summary(result)
            write_json(out, result)
    _cost_summary(result)
    expected = {
        f"{label} / {label.split('+', 1)[1]}"
        for label in labels
        if label.startswith("odedit+") and label.split("+", 1)[1] in labels
    }
    unequal = [r["method"] for r in result["rows"] if r["steps"] != [cfg["steps"]]]
    if unequal:
        result["status"] = "fail"
        result["reason"] = f"methods did not take the {cfg['steps']} equal steps: {unequal}"
    elif result["errors"]:
        result["status"] = "error"
        result["reason"] = "; ".join(f"{k}: {v[:300]}" for k, v in result["errors"].items())
    elif not expected <= set(result["ratios"]):
        result["status"] = "partial"
        result["reason"] = "time budget spent before every method was timed: missing " + ", ".join(
            sorted(expected - set(result["ratios"]))
        )
    elif result["rounds_done"] < cfg["rounds"]:
        result["status"] = "partial"
        result["reason"] = (
            f"time budget spent after {result['rounds_done']} of {cfg['rounds']} rounds "
            f"({len(result['times_s'][labels[0]])} edits per method timed)"
        )
    else:
        result["status"] = "pass"
        result.pop("reason", None)
    return result


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------

PARTS: dict[str, Callable[[dict[str, Any], Path], dict[str, Any]]] = {
    "kernel_bench": run_kernel_bench,
    "kernel_sweep": run_kernel_sweep,
    "cost_ratio": run_cost_ratio,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one part of benchmarks/gpu_check.py (run by it)")
    parser.add_argument("part", choices=sorted(PARTS))
    parser.add_argument("--config", required=True, help="JSON config written by gpu_check.py")
    parser.add_argument("--out", required=True, help="where the part writes its result JSON")
    args = parser.parse_args(argv)
    cfg = json.loads(Path(args.config).read_text(encoding="utf-8"))
    import torch

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    out = Path(args.out)
    try:
        result = PARTS[args.part](cfg, out)
    except Exception as err:  # noqa: BLE001 - the part's verdict is "error", with the traceback
        previous = json.loads(out.read_text(encoding="utf-8")) if out.exists() else {}
        result = {**previous, "status": "error", "reason": f"{type(err).__name__}: {err}"[:2000]}
        result["traceback"] = traceback.format_exc()[-6000:]
        print(result["traceback"], file=sys.stderr, flush=True)
    result["torch_threads"] = torch.get_num_threads()
    write_json(out, result)
    return 0


if __name__ == "__main__":
    # run as a script, this folder is sys.path[0]: its kernels.py would shadow Hugging Face's `kernels`
    # package, which transformers looks up (and imports) when it is imported
    if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)
    sys.exit(main())

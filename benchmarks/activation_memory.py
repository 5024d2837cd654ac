"""What one edit step's backward really keeps, against ``estimate_edit_memory``'s activation term.

Each configuration runs in its own process: the method's adapter is wrapped on the model, one step's
forward runs on the prompts the estimate counts (every core group of ``build_edit_batch``, one request or
``--batch``), and the tensors autograd saves for the backward are counted (a ``saved_tensors_hooks`` pack
hook; distinct storages, still alive when the backward starts, parameters and buffers excluded), per
decoder layer and for the rest (embedding, final norm, head, loss). The process's resident-memory high-water
mark over the forward and backward (``VmHWM`` reset through ``/proc/self/clear_refs``) is the cross-check.

Example::

    OMP_NUM_THREADS=1 python -m benchmarks.activation_memory
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import weakref
from typing import Any

CONFIGS: dict[str, dict[str, Any]] = {
    # the tiny world (LLaVA, 2 decoder layers, h 128, fp32), one VQA request
    "world-ftl-last": {"model": "world", "method": "ftl"},
    "world-ftl-l0": {"model": "world", "method": "ftl", "layers": [0]},
    "world-lora-l0": {"model": "world", "method": "lora", "layers": [0]},
    # a random Llama (8 layers, h 256, i 688, 8 heads, GQA 2 kv heads, vocab 8000, fp32), 4 ZsRE requests
    "llama-ftl-last": {"model": "llama", "method": "ftl", "batch": 4},
    "llama-ftl-l0": {"model": "llama", "method": "ftl", "layers": [0], "batch": 4},
    "llama-ftl-l4": {"model": "llama", "method": "ftl", "layers": [4], "batch": 4},
    "llama-lora-l0": {"model": "llama", "method": "lora", "layers": [0], "batch": 4},
    # SmolLM2-135M (30 layers, h 576, i 1536, 9 heads, GQA 3 kv heads, vocab 49152, fp32), 8 ZsRE requests
    "smollm2-ftl-l0": {"model": "smollm2", "method": "ftl", "layers": [0], "batch": 8},
    "smollm2-ftl-last": {"model": "smollm2", "method": "ftl", "batch": 8},
}

LLAMA = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 8000,
}
PROMPTS = [
    "the capital of france is",
    "the capital city of france is",
    "the sky over the sea is",
    "blue grey green red paris rome",
]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _backbone_and_requests(cfg: dict[str, Any]) -> tuple[Any, list[Any]]:
    if cfg["model"] == "world":
        from odedit_hf.data import load_mmedit
        from odedit_hf.data.world import build_world

        world = build_world("tiny", seed=0, progress=False)
        requests = list(load_mmedit(world.vqa_eval, world.image_root, world.rephrase_image_root))
        return world.load_backbone(), requests[: cfg.get("batch", 1)]
    import tempfile

    from odedit_hf.data import load_edits
    from odedit_hf.testing import tiny_backbone, write_zsre_file

    if cfg["model"] == "smollm2":
        from odedit_hf.cli.edit import load_backbone
        from odedit_hf.models import get_model

        backbone = load_backbone(str(get_model("smollm2")), device="cpu")
    else:
        backbone = tiny_backbone("llama", seed=0, texts=PROMPTS, text_config=LLAMA)
    targets = ["blue", "grey green", "red", "paris rome", "london", "the sea", "berlin", "a red square"]
    targets = targets[: cfg.get("batch", 1)]
    with tempfile.TemporaryDirectory() as tmp:
        requests = list(load_edits(write_zsre_file(os.path.join(tmp, "z.json"), targets)))
    return backbone, requests


def korthikanti_bytes(backbone: Any, batch: Any, dtype_bytes: int) -> int:
    """The activation term ``estimate_edit_memory`` used before (Korthikanti et al., 2022, every layer)."""
    config = backbone.model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h, n, a, v = text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.vocab_size
    total = 0
    for b in batch.batches:
        rows, seq = b["input_ids"].shape
        total += int(seq * rows * h * (34 + 5 * a * seq / h) * n * dtype_bytes / 2) + rows * seq * v * 12
    return total


def child(name: str) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from peft import get_peft_model

    from odedit_hf.editing import get_method
    from odedit_hf.editing.environments import CORE_GROUPS, build_edit_batch
    from odedit_hf.editing.loss import model_inputs, nll_from_logits
    from odedit_hf.editing.memory import estimate_edit_memory

    cfg = CONFIGS[name]
    backbone, requests = _backbone_and_requests(cfg)
    method = get_method(cfg["method"], **({"layers": cfg["layers"]} if "layers" in cfg else {}))
    estimate = estimate_edit_memory(method, backbone, requests, batch_size=len(requests))
    batch = build_edit_batch(backbone, requests, CORE_GROUPS, num_rephrases=1, device="cpu")
    peft_model = get_peft_model(backbone.model, method.peft_config(backbone))
    peft_model.eval()
    layers = backbone.decoder_layers()
    where = ["embed"]
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, f"layer{i}")))
        hooks.append(layer.register_forward_hook(lambda m, a, o: where.__setitem__(0, "head")))
    skip = {t.untyped_storage().data_ptr() for t in (*peft_model.parameters(), *peft_model.buffers())}
    saved: dict[int, tuple[weakref.ref, int, str]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr and ptr not in skip and ptr not in saved:
            saved[ptr] = (weakref.ref(t), t.untyped_storage().nbytes(), where[0])
        return t

    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    shapes = [tuple(b["input_ids"].shape) for b in batch.batches]

    def step_loss() -> torch.Tensor:
        total = None
        for b in batch.batches:
            where[0] = "embed"
            logits = peft_model(**model_inputs(b)).logits
            where[0] = "loss"
            loss = nll_from_logits(logits, b["labels"])
            del logits
            total = loss if total is None else total + loss
        return total

    if trainable:  # a first step outside the measure: lazy initialisation, allocator pools
        step_loss().backward()
        for p in trainable:
            p.grad = None
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")  # reset VmHWM to the current resident size
    rss_start = _rss_kib("VmRSS")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        total = step_loss()
    alive: dict[str, int] = {}
    for ref, nbytes, at in saved.values():
        if ref() is not None:
            alive[at] = alive.get(at, 0) + nbytes
    rss_forward = _rss_kib("VmRSS")
    if trainable:
        total.backward()
    rss_peak = _rss_kib("VmHWM")
    for h in hooks:
        h.remove()
    layer_bytes = {k: v for k, v in alive.items() if k.startswith("layer")}
    config = backbone.model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    positions = sum(r * c for r, c in shapes)
    full = sorted(layer_bytes.items(), key=lambda kv: int(kv[0][5:]))[1:]  # above the lowest edited layer
    per_position = (
        max(v for _, v in full) / positions / next(backbone.model.parameters()).element_size()
        if full
        else None
    )
    return {
        "config": name,
        "method": cfg["method"],
        "layers": cfg.get("layers", "default"),
        "num_layers": len(layers),
        "trainable": sum(p.numel() for p in trainable),
        "batch_shapes": shapes,
        "tokens": estimate.tokens_per_step,
        "estimate_activation_bytes": estimate.activations,
        "old_estimate_activation_bytes": korthikanti_bytes(
            backbone, batch, next(backbone.model.parameters()).element_size()
        ),
        "values_per_position_per_full_layer": per_position,
        "formula_values_per_position": 6 * text.hidden_size + 3 * text.intermediate_size,
        "saved_bytes": sum(alive.values()),
        "saved_by_place": alive,
        "saved_decoder_bytes": sum(layer_bytes.values()),
        "rss_forward_delta_kib": rss_forward - rss_start,
        "rss_step_peak_delta_kib": rss_peak - rss_start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)))
        return 0
    import torch
    import transformers

    print(
        f"machine {platform.machine()}, {os.cpu_count()} CPUs, 1 torch thread; python "
        f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(
        "| config | edited layer | tokens | old estimate MiB | new estimate MiB | saved MiB (in decoder layers) "
        "| values / position in a layer above the edited one (6h + 3i) | RSS delta fwd / step peak MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.configs:
        cmd = [sys.executable, "-m", "benchmarks.activation_memory", "--child", name]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        mib = 2**20
        per = r["values_per_position_per_full_layer"]
        print(
            f"| {name} | {r['layers']} of {r['num_layers']} | {r['tokens']} | "
            f"{r['old_estimate_activation_bytes'] / mib:.2f} | {r['estimate_activation_bytes'] / mib:.2f} | "
            f"{r['saved_bytes'] / mib:.2f} ({r['saved_decoder_bytes'] / mib:.2f}) | "
            f"{'-' if per is None else f'{per:.0f}'} ({r['formula_values_per_position']}) | "
            f"{r['rss_forward_delta_kib'] / 1024:.1f} / {r['rss_step_peak_delta_kib'] / 1024:.1f} |"
        )
        print(json.dumps(r), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

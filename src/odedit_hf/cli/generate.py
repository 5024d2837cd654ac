"""``odedit-hf generate --model M [--adapter DIR] --prompt TEXT [--image PATH]``: the greedy answer.

A quick look at what an edited model says: the prompt is wrapped exactly as the edits and metrics
wrap it (the backbone's chat template, or ``Question: ... Short answer:``), and the answer is decoded
greedily. ``--compare`` also prints the base model's answer (the same model, adapter disabled).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_parser(subparsers: Any, name: str = "generate", help: str | None = None) -> argparse.ArgumentParser:
    from odedit_hf.cli.edit import _positive_int

    parser = subparsers.add_parser(name, help=help, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the base model (folder or Hub id)")
    parser.add_argument("--adapter", help="adapter folder (or Hub repo id); default: the base model alone")
    parser.add_argument("--prompt", required=True, help="the question (vqa) or caption prompt")
    parser.add_argument("--image", help="an image file for a multimodal model")
    parser.add_argument("--task", default="vqa", choices=("vqa", "caption"), help="how the prompt is wrapped")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=16, help="default 16")
    parser.add_argument("--compare", action="store_true", help="also print the base model's answer")
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument(
        "--dtype", default="auto", choices=_DTYPES, help="model dtype (default: the checkpoint's)"
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow model code from the checkpoint"
    )
    return parser


def prompt_inputs(
    backbone: Any, prompt: str, image: Any = None, task: str = "vqa", device: Any = None
) -> dict:
    """The model inputs of the wrapped prompt alone (the batch the metrics build, cut before the target)."""
    from odedit_hf.backbones import PromptSample

    batch = backbone.build_batch([PromptSample(prompt, "x", image=image, task=task)], device=device)
    labels = batch.pop("labels")
    start = int((labels[0] != -100).nonzero()[0])  # the first target position: the prompt ends here
    length = labels.shape[1]
    return {
        k: (v[:, :start] if v.dim() >= 2 and v.shape[0] == 1 and v.shape[1] == length else v)
        for k, v in batch.items()
    }


def greedy_answer(model: Any, backbone: Any, inputs: dict, max_new_tokens: int) -> str:
    import torch

    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=backbone.pad_token_id,
        )
    return backbone.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def run(args: argparse.Namespace) -> int:
    from odedit_hf.cli.edit import CLIError, load_backbone, quiet_known_warnings, resolve_device
    from odedit_hf.editing import model_device

    try:
        with quiet_known_warnings():
            image = None
            if args.image:
                from PIL import Image

                try:
                    image = Image.open(args.image).convert("RGB")
                except OSError as exc:
                    raise CLIError(f"--image {args.image!r}: cannot read it as an image ({exc})") from None
            device = resolve_device(args.device)
            backbone = load_backbone(
                args.model, trust_remote_code=args.trust_remote_code, dtype=args.dtype, device=device
            )
            model = backbone.model
            if args.adapter:
                from odedit_hf.editing.loading import load_adapter

                model = load_adapter(backbone.model, args.adapter)
                model.eval()
            inputs = prompt_inputs(backbone, args.prompt, image, args.task, device=model_device(model))
            answer = greedy_answer(model, backbone, inputs, args.max_new_tokens)
            base_answer = None
            if args.compare and args.adapter:
                with model.disable_adapter():
                    base_answer = greedy_answer(model, backbone, inputs, args.max_new_tokens)
    except (CLIError, ValueError) as exc:
        print(f"odedit-hf generate: error: {exc}", file=sys.stderr)
        return 2
    label = "edited" if args.adapter else "base"
    print(f"{label}: {answer}")
    if base_answer is not None:
        print(f"base:   {base_answer}")
    return 0

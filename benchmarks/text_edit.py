"""Text-only editing of a real pretrained model: SmolLM2-135M on the shipped facts it knows (ZsRE layout).

Usage:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/text_edit.py --methods ftl lora --n 50

Steps: ``get_model("smollm2")`` (cached after the first fetch); the ZsRE file of the facts the model
answers (``build_fact_benchmark``, raw prompts, threshold 1.0; reused from benchmarks/out/ when present);
``load_text_edits`` on it (the first ``--n`` records); the model through ``load_fact_prompts(..., "raw")``
(raw completion prompts, the format the facts were kept in); then ``run_protocol`` for each method with
its default options (or ``--options`` JSON). Prints each run's table and writes
benchmarks/out/text_edit-{method}-{protocol}.json (the results document).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=["ftl", "lora"])
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument(
        "--every",
        type=int,
        default=1,
        help="take every K-th kept fact (default 1: the first --n, file order)",
    )
    parser.add_argument("--protocol", default="single", choices=("single", "sequential"))
    parser.add_argument("--options", default="{}", help='JSON: {"ftl": {"lr": 1e-3}, ...} (default: none)')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default="", help="suffix of the output files (e.g. the options' name)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import peft
    import transformers

    from odedit_hf.data import load_text_edits
    from odedit_hf.data.facts import build_fact_benchmark, load_fact_prompts
    from odedit_hf.editing import get_method
    from odedit_hf.evaluation import build_report, format_table, run_protocol, write_json_atomic
    from odedit_hf.models import get_model

    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    os.makedirs(out_dir, exist_ok=True)
    model_dir = get_model("smollm2")
    data = os.path.join(out_dir, "zsre_facts-smollm2-raw.json")
    if not os.path.isfile(data):
        start = time.perf_counter()
        built = build_fact_benchmark(model_dir, data, prompt_format="raw")
        print(
            f"built {data}: kept {built.n_kept} of {built.n_facts} facts in {time.perf_counter() - start:.0f} s"
        )
    requests = list(load_text_edits(data))[:: args.every][: args.n]
    prompts = load_fact_prompts(model_dir, "raw")
    backbone = prompts.backbone
    options = json.loads(args.options)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__} ({args.threads} thread(s)), transformers {transformers.__version__}, peft "
        f"{peft.__version__}; model {model_dir}; {len(requests)} edits from {data}; seed {args.seed}"
    )
    _pre_edit(backbone, requests)
    for name in args.methods:
        method = get_method(name, **options.get(name, {}))
        start = time.perf_counter()
        run = run_protocol(args.protocol, method, backbone, requests, seed=args.seed)
        report = build_report(
            run, config={"data": data, "model": model_dir, "method": method.resolved_config()}
        )
        tag = f"-{args.tag}" if args.tag else ""
        path = write_json_atomic(os.path.join(out_dir, f"text_edit-{name}-{args.protocol}{tag}.json"), report)
        print(f"\n{format_table(report)}\nwall {time.perf_counter() - start:.0f} s; results: {path}")
    return 0


def _pre_edit(backbone, requests) -> None:
    """Token accuracy / exact match of the unedited model: the new target at the edit prompt and at the
    rephrase (reliability and generality before any edit), and the true answer at the edit prompt."""
    import torch

    from odedit_hf.backbones import PromptSample
    from odedit_hf.evaluation import token_accuracy

    rows = {"new target @ prompt": [], "new target @ rephrase": [], "true answer @ prompt": []}
    for r in requests:
        samples = [
            PromptSample(prompt=r.src, target=r.alt, task=r.task),
            PromptSample(prompt=r.rephrase, target=r.alt, task=r.task),
            PromptSample(prompt=r.src, target=r.pred, task=r.task),
        ]
        with torch.no_grad():
            for key, sample in zip(rows, samples):
                batch = backbone.build_batch([sample])
                logits = backbone.model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
                acc, em = token_accuracy(logits.float(), batch["labels"])
                rows[key].append((float(acc[0]), float(em[0])))
    for key, values in rows.items():
        acc = sum(v[0] for v in values) / len(values)
        em = sum(v[1] for v in values) / len(values)
        print(f"pre-edit {key:<24} token acc {acc:.3f}  exact {em:.3f}  (n={len(values)})")


if __name__ == "__main__":
    raise SystemExit(main())

"""Real model + real-knowledge benchmark: fetch SmolLM2 (cached), check it, and filter the shipped facts.

Usage:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/real_facts.py        # raw build + chat, chat_prefill answers
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/real_facts.py --compare-only --compare chat_prefill

Steps: ``get_model("smollm2")`` (downloads and dequantises on first use; its info file records the
dequantise and save times), greedy next tokens after "The capital of France is", then
``build_fact_benchmark`` in ``--format`` (every sample kind scored), and for each ``--compare`` format
the true-answer accuracy alone (``score_facts(kinds=("answer",))``, a fifth of the cost). Prints tables
and writes benchmarks/out/real_facts-{format}.json (summary + per-fact scores) and the ZsRE file
benchmarks/out/zsre_facts-{model}-{format}.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

FORMATS = ("raw", "chat", "chat_prefill")  # odedit_hf.data.facts.PROMPT_FORMATS (imported after parsing)


def _print_build(result) -> None:
    m = result.means
    print(
        f"\n{result.prompt_format} prompts, threshold {result.threshold}: kept {result.n_kept} of "
        f"{result.n_facts} facts ({result.kept_fraction:.3f}); load {result.load_seconds} s, "
        f"score {result.score_seconds} s"
    )
    print(f"{'set':<34} {'token acc':>9} {'exact':>7}")
    labels = (
        ("answer", "true answer (edit prompt)"),
        ("counterfactual", "counterfactual target"),
        ("paraphrase", "true answer (paraphrases)"),
        ("locality", "locality answer"),
    )
    for key, label in labels:
        for scope in ("all", "kept"):
            name = f"{label} [{scope}]"
            print(f"{name:<34} {m[f'{scope}/{key}_acc']:>9.3f} {m[f'{scope}/{key}_em']:>7.3f}")
    print(f"{'relation':<20} {'facts':>5} {'kept':>5} {'frac':>6}")
    for rel, row in result.per_relation.items():
        print(f"{rel:<20} {row['facts']:>5} {row['kept']:>5} {row['kept'] / row['facts']:>6.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--format", default="raw", choices=FORMATS, help="format of the built file")
    parser.add_argument("--compare", nargs="*", default=["chat", "chat_prefill"], choices=FORMATS)
    parser.add_argument(
        "--compare-only", action="store_true", help="skip the build; only the --compare scores"
    )
    parser.add_argument("--threshold", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "out"))
    args = parser.parse_args(argv)

    import torch
    import transformers

    from odedit_hf.data.facts import build_fact_benchmark, load_fact_prompts, load_facts, score_facts
    from odedit_hf.models import INFO_FILE, get_model

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    folder = get_model(args.model, progress=lambda m: print(f"[models] {m}", flush=True))
    get_seconds = time.perf_counter() - start
    info = json.loads((folder / INFO_FILE).read_text(encoding="utf-8"))
    size_mb = sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 2**20
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {args.threads} threads"
    )
    print(f"model folder: {folder} ({size_mb:.0f} MiB), get_model {get_seconds:.1f} s this run")
    print(
        f"built: download {info['download_seconds']} s, dequantise {info['dequantise_seconds']} s, "
        f"save {info['save_seconds']} s, {info['num_parameters']:,} parameters ({info['dtype']})"
    )

    backbone = load_fact_prompts(folder, "raw").backbone
    tok = backbone.tokenizer
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        gen = backbone.model.generate(**ids, max_new_tokens=4, do_sample=False)
    print(f"greedy: 'The capital of France is' -> {tok.decode(gen[0, ids['input_ids'].shape[1] :])!r}")

    os.makedirs(args.out_dir, exist_ok=True)
    fmt = args.format
    facts = load_facts()
    relations = list(dict.fromkeys(f.relation for f in facts))
    payload = {"model_info": info, "threshold": args.threshold}
    if not args.compare_only:
        out = os.path.join(args.out_dir, f"zsre_facts-{args.model}-{fmt}.json")
        result = build_fact_benchmark(
            folder, out, threshold=args.threshold, prompt_format=fmt, batch_size=args.batch_size
        )
        _print_build(result)
        payload.update(result.to_dict(with_scores=True))
    compared = {}
    for other in [f for f in args.compare if args.compare_only or f != fmt]:
        start = time.perf_counter()
        scores = score_facts(
            load_fact_prompts(folder, other), facts, batch_size=args.batch_size, kinds=("answer",)
        )
        known = [s.answer[0] >= args.threshold - 1e-9 for s in scores]
        compared[other] = {
            "n_kept": sum(known),
            "kept_fraction": sum(known) / len(facts),
            "answer_acc": sum(s.answer[0] for s in scores) / len(scores),
            "seconds": round(time.perf_counter() - start, 1),
            "kept_by_relation": {
                rel: sum(k for f, k in zip(facts, known) if f.relation == rel) for rel in relations
            },
            "kept_ids": [f.id for f, k in zip(facts, known) if k],
        }
        c = compared[other]
        print(
            f"\n{other} prompts (answer only): kept {c['n_kept']} of {len(facts)} ({c['kept_fraction']:.3f}), "
            f"answer token acc {c['answer_acc']:.3f}, {c['seconds']} s"
        )
        print(f"  kept by relation: {c['kept_by_relation']}")
    payload["compare"] = compared
    name = "real_facts-compare.json" if args.compare_only else f"real_facts-{fmt}.json"
    with open(os.path.join(args.out_dir, name), "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

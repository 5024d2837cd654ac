"""Text-only editing of a real pretrained model: SmolLM2-135M on the shipped facts it knows (ZsRE layout).

Usage:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/text_edit.py --methods ftl lora --n 50

Steps: ``get_model("smollm2")`` (cached after the first fetch); the ZsRE file of the facts the model
answers (``build_fact_benchmark``, raw prompts, threshold 1.0; reused from benchmarks/out/ when present);
``load_text_edits`` on it (the first ``--n`` records); the model through ``load_fact_prompts(..., "raw")``
(raw completion prompts, the format the facts were kept in); then ``run_protocol`` for each method with
its default options (or ``--options`` JSON). Prints each run's table and writes
benchmarks/out/text_edit-{method}-{protocol}.json (the results document), and appends one line of the
run's figures (reliability, generality, locality, s/edit, steps, peak memory, rollback checks, the
command) to benchmarks/out/text_edit-summary.jsonl.

The kept facts that are not edited (``--every`` / ``--n`` pick the edited ones) are written as a ZsRE
file next to the fact file (or ``--train-file`` names one): IKE takes them as its demonstrations unless
``--options`` gives ``demos``, and ``odedit-hf train-editor --method mend|serac --data`` takes the file as
the train split (then ``--options '{"mend": {"editor_weights": DIR}}'``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time


def spread(requests: list, n: int) -> list:
    """``n`` of ``requests`` evenly spaced over the list (index ``round(i * len / n)``), in file order."""
    picked = sorted({round(i * len(requests) / n) for i in range(n)})
    return [requests[i] for i in picked if i < len(requests)]


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
    parser.add_argument(
        "--spread",
        action="store_true",
        help="take --n kept facts evenly spaced over the file (index round(i * kept / n)), so that the "
        "edits span the relations in proportion; overrides --every",
    )
    parser.add_argument("--protocol", default="single", choices=("single", "sequential"))
    parser.add_argument("--options", default="{}", help='JSON: {"ftl": {"lr": 1e-3}, ...} (default: none)')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default="", help="suffix of the output files (e.g. the options' name)")
    parser.add_argument(
        "--train-file",
        default=None,
        help="ZsRE file of the records that are not edited (IKE's demonstrations; MEND/SERAC's train split). "
        "Default: written from the kept facts not among the edited ones, next to the fact file",
    )
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
    all_requests = list(load_text_edits(data))
    if args.spread:
        requests = spread(all_requests, args.n)
    else:
        requests = all_requests[:: args.every][: args.n]
    pick = "spread" if args.spread else f"every{args.every}"
    train_file = args.train_file or _write_rest(data, {r.case_id for r in requests}, pick, args.n)
    train_requests = list(load_text_edits(train_file))
    relations = _relations(requests)
    print(
        f"kept facts {len(all_requests)} of {_n_shipped()} shipped; edited {len(requests)} "
        f"({'evenly spread' if args.spread else f'every {args.every}-th'}): {', '.join(f'{k} {v}' for k, v in relations.items())}; not edited "
        f"{len(train_requests)} records in {train_file}"
    )
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
        method_options = dict(options.get(name, {}))
        if name == "ike" and "demos" not in method_options:
            method_options["demos"] = train_requests
        method = get_method(name, **method_options)
        start = time.perf_counter()
        tag = f"-{args.tag}" if args.tag else ""
        progress = os.path.join(out_dir, f"text_edit-{name}-{args.protocol}{tag}.progress.jsonl")
        with open(progress, "w", encoding="utf-8") as handle:

            def on_edit(i: int, result, handle=handle) -> None:
                # one line per finished edit, so that an interrupted run leaves its rows
                handle.write(json.dumps({"i": i, **result.to_dict()}, default=str) + "\n")
                handle.flush()

            run = run_protocol(args.protocol, method, backbone, requests, seed=args.seed, on_edit=on_edit)
        config = method.resolved_config()
        if name == "ike" and not isinstance(options.get(name, {}).get("demos"), str):
            config = {**config, "demos": f"{len(train_requests)} records of {train_file}"}
        report = build_report(
            run,
            config={"data": data, "model": model_dir, "train_file": train_file, "method": config},
            requests=requests,
        )
        path = write_json_atomic(os.path.join(out_dir, f"text_edit-{name}-{args.protocol}{tag}.json"), report)
        wall = time.perf_counter() - start
        print(f"\n{format_table(report)}\nwall {wall:.0f} s; results: {path}")
        _append_summary(out_dir, name, args, report, wall, path)
    return 0


def _write_rest(data: str, edited: set[int], pick: str, n: int) -> str:
    """Write the records of ``data`` whose index is not in ``edited`` as a ZsRE file; return its path."""
    import json as _json

    from odedit_hf.evaluation import write_json_atomic

    with open(data, encoding="utf-8") as f:
        records = _json.load(f)
    rest = [r for i, r in enumerate(records) if i not in edited]
    stem = os.path.splitext(data)[0]
    path = f"{stem}-rest-{pick}-n{n}.json"
    return write_json_atomic(path, rest) if rest else data


def _n_shipped() -> int:
    from odedit_hf.data.facts import load_facts

    return len(load_facts())


def _relations(requests) -> dict[str, int]:
    """How many of ``requests`` fall in each relation of the shipped facts (matched by prompt)."""
    from odedit_hf.data.facts import load_facts

    by_prompt = {f.prompt: f.relation for f in load_facts()}
    counts: dict[str, int] = {}
    for r in requests:
        rel = by_prompt.get(r.src, "?")
        counts[rel] = counts.get(rel, 0) + 1
    return counts


def _append_summary(out_dir: str, name: str, args, report, wall: float, path: str) -> None:
    """One JSON line per run in benchmarks/out/text_edit-summary.jsonl: the figures of the RESULTS table."""
    import sys

    keys = (
        "reliability",
        "reliability_em",
        "t_generality",
        "t_generality_em",
        "t_locality",
        "t_locality_easyedit",
    )
    aggregates = report["aggregates"]
    timing = report["timing"]
    times = sorted(e["wall_time_s"] for e in report["edits"])
    row = {
        "method": name,
        "protocol": args.protocol,
        "tag": args.tag,
        "n_edits": report["n_edits"],
        "pick": "spread" if args.spread else f"every {args.every}",
        "seed": args.seed,
        "post": {k: aggregates["post"].get(k) for k in keys},
        "final": None if aggregates["final"] is None else {k: aggregates["final"].get(k) for k in keys},
        "edit_s_p50": timing["edit_wall_time_s_median"],
        "edit_s_p20": times[int(0.2 * (len(times) - 1))],
        "edit_s_p80": times[int(0.8 * (len(times) - 1))],
        "steps_mean": timing["steps_mean"],
        "steps_max": max(e["steps"] for e in report["edits"]),
        "peak_mb": timing["peak_memory_mb_max"],
        "rollback_checks": report["rollback"]["checks"],
        "run_s": wall,
        "results": path,
        "command": " ".join(["benchmarks/text_edit.py", *(sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    import json as _json

    with open(os.path.join(out_dir, "text_edit-summary.jsonl"), "a", encoding="utf-8") as f:
        f.write(_json.dumps(row) + "\n")


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

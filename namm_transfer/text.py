"""``python -m namm_transfer.text``: score and KV memory of a model on long-context text tasks, under the full
cache, a NAMM, and every baseline at the NAMM's matched budget and at fixed ratios.

One results folder per method (``predictions.jsonl``, ``metrics.json``, ``config.json``); a rerun of the same
command skips finished items. At the end: a table on stdout, ``summary.json``, a score-vs-KV-memory plot and a
per-layer retention plot in the output folder.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from namm_transfer.cli import ArgumentParser, run_program
from namm_transfer.evals.longbench import load_longbench
from namm_transfer.evals.report import RunFolder, format_table, plot_retention_per_layer, plot_score_vs_memory, run_name
from namm_transfer.evals.text_tasks import TASKS, TextItem, build_suite, token_counter
from namm_transfer.methods import MATCHED, RULES, SHIPPED_NAMM, Method, build_policy, cache_config_for, comparison
from namm_transfer.namm.budget import RetentionRecord
from namm_transfer.namm.checkpoint import NammWeights, load_namm


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [name for name in text.split(",") if name]


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m namm_transfer.text", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="local HF folder or cached hub id (default: embedded SmolLM2)")
    p.add_argument("--namm", default=str(SHIPPED_NAMM), help="NAMM weights (folder or file); 'none' to skip")
    p.add_argument("--tasks", default=",".join(TASKS), help="built-in tasks, comma-separated")
    p.add_argument("--split", default="heldout", choices=("train", "heldout"))
    p.add_argument("--items", type=int, default=2, help="items per built-in task")
    p.add_argument("--length", type=int, default=1536, help="prompt length in tokens (built-in tasks)")
    p.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths, comma-separated")
    p.add_argument("--seed", type=int, default=0, help="first item seed (built-in tasks) and random-rule seed")
    p.add_argument("--longbench", default=None, help="folder of LongBench JSONL files (replaces built-in tasks)")
    p.add_argument("--longbench-tasks", default="passage_retrieval_en", help="LongBench tasks, comma-separated")
    p.add_argument("--limit", type=int, default=None, help="at most this many LongBench items per task")
    p.add_argument("--methods", default=",".join(RULES), help=f"subset of {','.join(RULES)}")
    p.add_argument("--ratios", default="0.25,0.5,0.75", help="fixed budgets for the baselines ('' for none)")
    p.add_argument("--chunk-size", type=int, default=128, help="prefill chunk (namm-spec §1.3)")
    p.add_argument("--update-every", type=int, default=None, help="policy period (default: the NAMM's own)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="middle-truncate longer prompts")
    p.add_argument("--chat-template", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="results/text", help="results folder")
    return p


def _items(args, tokenizer) -> tuple[str, list[TextItem]]:
    if args.longbench:
        return "longbench", load_longbench(args.longbench, _names(args.longbench_tasks), limit=args.limit)
    suite = build_suite(_names(args.tasks), args.split, args.items, args.length, _floats(args.depths), token_counter(tokenizer),
                        seed=args.seed)
    return f"builtin-{args.split}-L{args.length}", suite


def _retention(record: dict) -> list[RetentionRecord]:
    return [RetentionRecord(*row) for row in record["retention"]]


def summarise(method: Method, records: list[dict]) -> dict:
    """Metrics of one method over its finished records: score (0-100) overall and per task, mean retained
    KV (%), per-layer retention (%), mean peak KV bytes and seconds per item."""
    by_task: dict[str, list[float]] = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r["score"])
    num_layers = len(records[0]["kept_per_layer"])
    per_layer = [100 * sum(r["kept_per_layer"][i] for r in records) / len(records) for i in range(num_layers)]
    return {
        "method": method.label,
        "items": len(records),
        "score": 100 * sum(r["score"] for r in records) / len(records),
        "kv_retained_pct": 100 * sum(r["kv_retained"] for r in records) / len(records),
        "kv_bytes_peak": sum(r["kv_bytes_peak"] for r in records) / len(records),
        "seconds_per_item": sum(r["seconds"] for r in records) / len(records),
        "per_task": {t: 100 * sum(v) / len(v) for t, v in sorted(by_task.items())},
        "kept_per_layer_pct": per_layer,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    unknown = sorted(set(_names(args.tasks)) - set(TASKS))
    if unknown and not args.longbench:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    ratios = _floats(args.ratios)
    rules = _names(args.methods)
    namm: NammWeights | None = None if args.namm.lower() == "none" or "namm" not in rules else load_namm(args.namm)
    methods = comparison(rules, ratios, with_namm=namm is not None)
    if not methods:
        raise ValueError("no method to run: check --methods and --namm")
    cache = cache_config_for(None if namm is None else namm.config, args.update_every)

    from namm_transfer.models import load_model  # heavy import after the arguments are known to be good
    from namm_transfer.text_eval import TextGenerator

    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    dataset, items = _items(args, loaded.tokenizer)
    generator = TextGenerator(loaded.model, loaded.tokenizer, cache, args.chunk_size, args.chat_template,
                              args.max_prompt_tokens)
    out = Path(args.out)
    base_config = {
        "dataset": dataset, "model": loaded.name, "items": [i.item_id for i in items], "cache": vars(cache),
        "chunk_size": args.chunk_size, "chat_template": generator.use_chat_template, "dtype": args.dtype,
        "max_prompt_tokens": args.max_prompt_tokens, "namm": None if namm is None else str(args.namm),
    }
    folders = {}
    for method in methods:
        folder = RunFolder(out, run_name(dataset, loaded.name, method.rule, method.budget))
        folder.start({**base_config, "method": method.label, "seed": args.seed})
        folders[method] = folder
    namm_records: dict[str, dict] = {}
    progress = tqdm(total=len(methods) * len(items), desc="text eval", unit="run")
    for method, folder in folders.items():
        done = folder.done_ids()
        for item in items:
            progress.set_postfix_str(f"{method.label} {item.task}")
            if item.item_id in done:
                progress.update()
                continue
            retention = None
            if method.budget == MATCHED:
                if not namm_records:
                    namm_records = {r["item_id"]: r for r in folders[Method("namm")].predictions()}
                retention = _retention(namm_records[item.item_id])
            policy = build_policy(method, namm, retention, seed=args.seed, device=args.device)
            run = generator.run(item, policy)
            record = {
                "item_id": item.item_id, "task": item.task, "prediction": run.predictions[0],
                "answers": item.answers, "score": item.score(run.predictions[0]),
                "kv_retained": run.kv_retained[0], "kept_per_layer": run.kept_per_layer,
                "kv_bytes_peak": run.kv_bytes_peak, "prompt_tokens": run.prompt_tokens, "seconds": run.seconds,
            }
            if method.rule == "namm":
                record["retention"] = [[r.step, r.layer, r.slots_before, r.kept] for r in run.retention]
            folder.append_prediction(record)
            progress.update()
    progress.close()

    rows = []
    for method, folder in folders.items():
        metrics = summarise(method, folder.predictions())
        folder.write_metrics(metrics)
        rows.append(metrics)
    (out / "summary.json").write_text(json.dumps({"dataset": dataset, "model": loaded.name, "methods": rows},
                                                 indent=2) + "\n")
    print(format_table(rows, ["method", "items", "score", "kv_retained_pct", "kv_bytes_peak", "seconds_per_item"]))
    plot_score_vs_memory(rows, out / "score_vs_kv.png", title=f"{dataset} / {loaded.name}")
    plot_retention_per_layer({r["method"]: r["kept_per_layer_pct"] for r in rows}, out / "retention_per_layer.png")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_program(main))

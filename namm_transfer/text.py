"""``python -m namm_transfer.text``: score and KV memory of a model on long-context text tasks, under the full
cache, a NAMM, and every baseline at the NAMM's matched budget and at fixed ratios.

One results folder per method (``predictions.jsonl``, ``metrics.json``, ``config.json``); a rerun of the same
command skips finished items. At the end: a table on stdout, ``summary.json``, a score-vs-KV-memory plot and a
per-layer retention plot in the output folder.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from namm_transfer.cli import (
    ArgumentParser,
    FloatRange,
    InputError,
    IntRange,
    check_choices,
    check_output_dir,
    check_readable_dir,
    float_list,
    name_list,
    run_program,
)
from namm_transfer.evals import longbench
from namm_transfer.evals.report import RunFolder, format_table, plot_retention_per_layer, plot_score_vs_memory, run_name
from namm_transfer.evals.text_tasks import TASKS, TextItem, build_suite, token_counter
from namm_transfer.methods import (
    MATCHED,
    RULES,
    SHIPPED_NAMM,
    Method,
    build_policy,
    cache_config_for,
    comparison,
    load_namm_option,
)
from namm_transfer.models import add_model_options, load_model, resolve_model
from namm_transfer.namm.budget import RetentionRecord
from namm_transfer.namm.checkpoint import NammWeights, check_namm_settings
from namm_transfer.run_lock import RunLock, check_not_locked
from namm_transfer.text_eval import CHUNK_TOKENS, PERIOD_TOKENS, PROMPT_TOKENS, SEED, TextGenerator

INTERRUPTED = "interrupted: every finished item is saved in the results folder; rerun the same command to resume"
ITEMS = IntRange(1, 10_000)
LONGBENCH_LIMIT = IntRange(1, 1_000_000)
MAX_PROMPT_TOKENS = IntRange(64, 1_048_576)
RESULTS_BYTES = 16 * 2**20
"""Room the results folder needs at least (predictions, metrics, two plots)."""


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m namm_transfer.text", description=__doc__.split("\n\n")[0])
    add_model_options(p)
    p.add_argument("--namm", default=None,
                   help="NAMM weights, a folder or either file (default: the shipped NAMM); 'none' to skip")
    p.add_argument("--tasks", type=name_list, default=TASKS, help=f"built-in tasks, comma-separated ({','.join(TASKS)})")
    p.add_argument("--split", default="heldout", choices=("train", "heldout"))
    p.add_argument("--items", type=ITEMS, default=2, help=f"items per built-in task ({ITEMS})")
    p.add_argument("--length", type=PROMPT_TOKENS, default=1536,
                   help=f"prompt length in tokens, built-in tasks ({PROMPT_TOKENS})")
    p.add_argument("--depths", type=float_list(FloatRange(0.0, 1.0)), default=(0.1, 0.5, 0.9),
                   help="needle depths in [0, 1], comma-separated")
    p.add_argument("--seed", type=SEED, default=0, help=f"first item seed and random-rule seed ({SEED})")
    p.add_argument("--longbench", default=None, help="folder of LongBench JSONL files (replaces built-in tasks)")
    p.add_argument("--longbench-tasks", type=name_list, default=("passage_retrieval_en",),
                   help="LongBench tasks, comma-separated")
    p.add_argument("--limit", type=LONGBENCH_LIMIT, default=None, help=f"at most this many LongBench items per task ({LONGBENCH_LIMIT})")
    p.add_argument("--methods", type=name_list, default=RULES, help=f"subset of {','.join(RULES)}")
    p.add_argument("--ratios", type=float_list(FloatRange(0.0, 1.0, open_low=True), allow_empty=True),
                   default=(0.25, 0.5, 0.75), help="fixed budgets for the baselines in (0, 1] ('' for none)")
    p.add_argument("--chunk-size", type=CHUNK_TOKENS, default=128, help=f"prefill chunk in tokens ({CHUNK_TOKENS})")
    p.add_argument("--update-every", type=PERIOD_TOKENS, default=None,
                   help=f"policy period in tokens ({PERIOD_TOKENS}); must equal the NAMM's own (the default)")
    p.add_argument("--max-prompt-tokens", type=MAX_PROMPT_TOKENS, default=None,
                   help=f"middle-truncate longer prompts ({MAX_PROMPT_TOKENS})")
    p.add_argument("--chat-template", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--out", default="results/text", help="results folder")
    return p


def namm_identity(namm: NammWeights) -> str:
    """SHA-256 of a NAMM's tensors and config: a results folder is tied to the weights, not to their path."""
    digest = hashlib.sha256(json.dumps(namm.config.to_dict(), sort_keys=True).encode())
    for tensor in (namm.params, namm.norm_mean, namm.norm_var):
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def check_arguments(args) -> tuple[NammWeights | None, list[Method], list[TextItem] | None]:
    """Every check that needs no model: methods, tasks, seeds, NAMM file and its settings, LongBench files,
    the results folder. Returns the NAMM (None when skipped), the methods, and the LongBench items (None for
    built-in tasks, which need the tokenizer)."""
    check_choices(args.methods, RULES, "--methods")
    longbench_items = None
    if args.longbench:
        check_readable_dir(args.longbench, "--longbench")
        check_choices(args.longbench_tasks, longbench.TASKS, "--longbench-tasks")
        longbench_items = longbench.load_longbench(args.longbench, args.longbench_tasks, limit=args.limit)
        if not longbench_items:
            raise InputError(f"--longbench {args.longbench}: the files of {', '.join(args.longbench_tasks)} hold no items")
    else:
        check_choices(args.tasks, TASKS, "--tasks")
        if args.split == "train" and args.seed + args.items > SEED.high + 1:
            raise InputError(f"--seed {args.seed} + --items {args.items} passes the last train seed {SEED.high}")
    use_namm = "namm" in args.methods and (args.namm is None or args.namm.lower() != "none")
    namm = load_namm_option(args.namm) if use_namm else None
    if namm is not None:
        check_namm_settings(namm, args.namm or f"the shipped NAMM ({SHIPPED_NAMM})", update_every=args.update_every)
    methods = comparison(args.methods, args.ratios, with_namm=namm is not None)
    if not methods:
        raise InputError("no method to run: --methods names only 'namm' but --namm is 'none'")
    check_output_dir(args.out, "--out", RESULTS_BYTES)
    check_not_locked(args.out)
    return namm, methods, longbench_items


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
    namm, methods, longbench_items = check_arguments(args)
    cache = cache_config_for(None if namm is None else namm.config, args.update_every)
    resolve_model(args.model)  # every check passes before the model loads
    loaded = load_model(args.model, dtype=args.dtype, device=str(args.device))

    if longbench_items is not None:
        dataset, items = "longbench", longbench_items
    else:
        dataset = f"builtin-{args.split}-L{args.length}"
        items = build_suite(args.tasks, args.split, args.items, args.length, args.depths,
                            token_counter(loaded.tokenizer), seed=args.seed)
    generator = TextGenerator(loaded.model, loaded.tokenizer, cache, args.chunk_size, args.chat_template,
                              args.max_prompt_tokens)
    out = Path(args.out)
    base_config = {
        "dataset": dataset, "model": loaded.name, "items": [i.item_id for i in items], "cache": vars(cache),
        "chunk_size": args.chunk_size, "chat_template": generator.use_chat_template, "dtype": args.dtype,
        "max_prompt_tokens": args.max_prompt_tokens,
        "namm": None if namm is None else (args.namm or f"shipped:{SHIPPED_NAMM}"),
        "namm_sha256": None if namm is None else namm_identity(namm),
    }
    folders = {}
    for method in methods:  # every identity is checked before anything is written
        folder = RunFolder(out, run_name(dataset, loaded.name, method.rule, method.budget))
        folder.start({**base_config, "method": method.label, "seed": args.seed})
        folders[method] = folder
    with RunLock(out):
        for folder in folders.values():
            folder.repair()
        rows = evaluate(folders, items, generator, namm, args.seed, str(args.device))
        (out / "summary.json").write_text(json.dumps({"dataset": dataset, "model": loaded.name, "methods": rows},
                                                     indent=2) + "\n")
        print(format_table(rows, ["method", "items", "score", "kv_retained_pct", "kv_bytes_peak", "seconds_per_item"]))
        plot_score_vs_memory(rows, out / "score_vs_kv.png", title=f"{dataset} / {loaded.name}")
        plot_retention_per_layer({r["method"]: r["kept_per_layer_pct"] for r in rows}, out / "retention_per_layer.png")
    print(f"results: {out}")
    return 0


def evaluate(folders: dict[Method, RunFolder], items: list[TextItem], generator, namm: NammWeights | None,
             seed: int, device: str) -> list[dict]:
    """Answer every unfinished item with every method (appending to its folder), then write and return each
    method's metrics."""
    namm_records: dict[str, dict] = {}
    with tqdm(total=len(folders) * len(items), desc="text eval", unit="run") as progress:  # closed before any error line
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
                policy = build_policy(method, namm, retention, seed=seed, device=device)
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
    rows = []
    for method, folder in folders.items():
        metrics = summarise(method, folder.predictions())
        folder.write_metrics(metrics)
        rows.append(metrics)
    return rows


if __name__ == "__main__":
    raise SystemExit(run_program(main, interrupted=INTERRUPTED))

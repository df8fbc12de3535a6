"""``python -m namm_transfer.text``: score and memory of a model on long-context text tasks, under the full
cache, a NAMM at one or more keep biases, and every baseline at each NAMM's matched budget and at fixed ratios.

Per item and method: the greedy answer's score, the memory held (K/V, the policy's own bytes, their total) and,
with ``--dense``, the mean per-token log-probability of the reference answer read through the same evicting
cache (teacher forcing). One results folder per method (``predictions.jsonl``, ``metrics.json``,
``config.json``); a rerun of the same command skips finished items. At the end: a table of each method (score
and answer log-probability with bootstrap 95% intervals over items, memory) and a table of paired differences
(each NAMM minus the full cache and minus each baseline at its matched budget) on stdout, ``summary.json``, a
score-vs-total-memory plot (the NAMM's keep-bias curve against the baselines, ``score_vs_memory.png``), with
``--dense`` the same curve for the answer log-probability (``logprob_vs_memory.png``), a score-vs-retained-KV plot
and a per-layer retention plot in the output folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from namm_transfer.answer_likelihood import ANSWER_TOKENS, answer_likelihood
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
from namm_transfer.text_summary import DENSE, MEMORY_FIELDS, MIB, method_table, paired_differences, paired_table, summarise

INTERRUPTED = "interrupted: every finished item is saved in the results folder; rerun the same command to resume"
ITEMS = IntRange(1, 10_000)
KEEP_BIAS = FloatRange(-1000.0, 1000.0)
"""Keep biases the program accepts (added to the NAMM's scores; its threshold is 0)."""
LONGBENCH_LIMIT = IntRange(1, 1_000_000)
MAX_PROMPT_TOKENS = IntRange(64, 1_048_576)
RESULTS_BYTES = 16 * 2**20
"""Room the results folder needs at least (predictions, metrics, two plots)."""


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m namm_transfer.text", description=__doc__.split("\n\n")[0])
    add_model_options(p)
    p.add_argument("--namm", default=None,
                   help="NAMM weights, a folder or either file (default: the shipped NAMM); 'none' to skip")
    p.add_argument("--namm-bias", type=float_list(KEEP_BIAS), default=(0.0,),
                   help=f"keep biases of the NAMM, comma-separated ({KEEP_BIAS}); each is its own method (namm, "
                        "namm@+0.5, ...) with its own matched baselines; write --namm-bias=-1,0,1 when the first "
                        "is negative")
    p.add_argument("--dense", action=argparse.BooleanOptionalAction, default=True,
                   help="also score the mean per-token log-probability of the reference answer (its first "
                        f"{ANSWER_TOKENS} tokens) under each method: one teacher-forced pass per item")
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
    if namm is None and tuple(args.namm_bias) != (0.0,):
        raise InputError("--namm-bias needs the NAMM: add 'namm' to --methods and do not pass --namm none")
    try:
        methods = comparison(args.methods, args.ratios, with_namm=namm is not None, keep_biases=args.namm_bias)
    except ValueError as error:
        raise InputError(f"--namm-bias: {error}") from None
    if not methods:
        raise InputError("no method to run: --methods names only 'namm' but --namm is 'none'")
    check_output_dir(args.out, "--out", RESULTS_BYTES)
    check_not_locked(args.out)
    return namm, methods, longbench_items


def _retention(rows: list[list[int]]) -> list[RetentionRecord]:
    """A retention log from its JSON rows ``[step, layer, slots_before, kept]``."""
    return [RetentionRecord(*row) for row in rows]


def _retention_rows(retention: list[RetentionRecord]) -> list[list[int]]:
    return [[r.step, r.layer, r.slots_before, r.kept] for r in retention]


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
        folder = RunFolder(out, run_name(dataset, loaded.name, method.rule, method.run_budget))
        folder.start({**base_config, "method": method.label, "seed": args.seed})
        folders[method] = folder
    with RunLock(out):
        for folder in folders.values():
            folder.repair()
        rows, paired = evaluate(folders, items, generator, namm, args.seed, str(args.device), args.dense)
        summary = {"dataset": dataset, "model": loaded.name, "methods": rows, "paired": paired}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        report(rows, paired, out, f"{dataset} / {loaded.name}")
    print(f"results: {out}")
    return 0


def report(rows: list[dict], paired: list[dict], out: Path, title: str) -> None:
    """Print the method table and the paired-difference table; write the plots to ``out``."""
    print(format_table(method_table(rows)))
    if paired:
        print("\npaired differences on the same items (NAMM minus the other; score in points, 0-100):")
        print(format_table(paired_table(paired)))
    curves = [{**row, "total_mib_peak": row["total_bytes_peak"] / MIB} for row in rows
              if row["total_bytes_peak"] is not None]
    for key, name, label in (("score", "score_vs_memory.png", "score (0-100, 95% CI)"),
                             (DENSE, "logprob_vs_memory.png", "reference answer log-prob per token (95% CI)")):
        points = [row for row in curves if row[key] is not None]  # the dense score is None without --dense
        if points:
            plot_score_vs_memory(points, out / name, score_key=key, memory_key="total_mib_peak", method_key="curve",
                                 label_key="method", interval_key=f"{key}_ci95", title=title,
                                 memory_label="mean peak memory per item (MiB: K/V + policy state)",
                                 score_label=label)
    plot_score_vs_memory(rows, out / "score_vs_kv.png", method_key="curve", label_key="method", title=title,
                         score_label="score (0-100)")
    plot_retention_per_layer({r["method"]: r["kept_per_layer_pct"] for r in rows}, out / "retention_per_layer.png")


def evaluate(folders: dict[Method, RunFolder], items: list[TextItem], generator: TextGenerator,
             namm: NammWeights | None, seed: int, device: str, dense: bool = True) -> tuple[list[dict], list[dict]]:
    """Answer every unfinished item with every method (appending to its folder; with ``dense`` also score the
    reference answer), then write each method's metrics; returns them and the paired differences.

    A matched baseline replays the retention of its NAMM (``method.namm_source``) on the same item: the log of
    the NAMM's answer for the answer, the log of the NAMM's teacher-forced pass for the dense score (a NAMM
    record written without the dense pass leaves its matched baselines without one)."""
    sources: dict[Method, dict[str, dict]] = {}
    with tqdm(total=len(folders) * len(items), desc="text eval", unit="run") as progress:  # closed before any error line
        for method, folder in folders.items():
            done = folder.done_ids()
            for item in items:
                progress.set_postfix_str(f"{method.label} {item.task}")
                if item.item_id in done:
                    progress.update()
                    continue
                source = method.namm_source
                if source is not None and source not in sources:
                    sources[source] = {r["item_id"]: r for r in folders[source].predictions()}
                namm_record = None if source is None else sources[source][item.item_id]
                retention = None if namm_record is None else _retention(namm_record["retention"])
                run = generator.run(item, build_policy(method, namm, retention, seed=seed, device=device))
                record = {
                    "item_id": item.item_id, "task": item.task, "prediction": run.predictions[0],
                    "answers": item.answers, "score": item.score(run.predictions[0]),
                    "kv_retained": run.kv_retained[0], "kept_per_layer": run.kept_per_layer,
                    **{key: getattr(run, key) for key in MEMORY_FIELDS},
                    "prompt_tokens": run.prompt_tokens, "seconds": run.seconds,
                }
                if method.rule == "namm":
                    record["retention"] = _retention_rows(run.retention)
                answer_log = None if namm_record is None else namm_record.get("answer_retention")
                if dense and (namm_record is None or answer_log is not None):
                    answer_retention = None if answer_log is None else _retention(answer_log)
                    scored = answer_likelihood(
                        generator, item, build_policy(method, namm, answer_retention, seed=seed, device=device))
                    record[DENSE] = scored.mean_log_prob[0]
                    record["answer_tokens"] = scored.answer_tokens
                    if method.rule == "namm":
                        record["answer_retention"] = _retention_rows(scored.retention)
                folder.append_prediction(record)
                progress.update()
    rows, records = [], {}
    for method, folder in folders.items():
        records[method] = folder.predictions()
        metrics = summarise(method, records[method])
        folder.write_metrics(metrics)
        rows.append(metrics)
    return rows, paired_differences(records)


if __name__ == "__main__":
    raise SystemExit(run_program(main, interrupted=INTERRUPTED))

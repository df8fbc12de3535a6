"""``python -m namm_transfer.video``: accuracy and KV memory of a LLaVA-NeXT-Video model on long-video questions,
under the full cache, a NAMM, and every baseline at the NAMM's matched budget and at fixed ratios.

Defaults: the embedded video model (SmolLM2 + the vision parts in ``weights/video/``) on the built-in held-out tasks,
the shipped NAMM (``weights/namm/``). ``--model DIR`` runs a local LLaVA-NeXT-Video folder (e.g. a
llava-hf/LLaVA-NeXT-Video-7B-hf snapshot), ``--dataset`` with ``--data DIR`` a benchmark in its published layout
(:mod:`namm_transfer.evals.video_qa`).

One results folder per method (``predictions.jsonl``, ``metrics.json``, ``config.json``); a rerun of the same
command skips finished items. A missing or corrupt video is recorded as a failed item with its reason. At the end:
a table on stdout (accuracy with its 95% bootstrap interval, mean and peak KV tokens and bytes, the policy's bytes and
the total K/V + policy bytes at their peak, tokens per second) and a second table, the NAMM's paired differences
against the full cache and each baseline at its matched budget (:mod:`namm_transfer.video.summary`),
``summary.json`` (also accuracy per category and per number of frames), ``accuracy_vs_kv.png`` (against retained
KV %), ``accuracy_vs_memory.png`` (against the peak total bytes held) and ``frame_retention.png`` (frames x layers
heat map per method).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from namm_transfer.cli import ArgumentParser, check_device, run_program
from namm_transfer.evals.video_qa import LOADERS, VideoQuestion, load_video_dataset
from namm_transfer.evals.video_tasks import KINDS, TaskConfig, write_split
from namm_transfer.methods import (
    MATCHED,
    RULES,
    Method,
    build_policy,
    cache_config_for,
    comparison,
    load_namm_option,
)
from namm_transfer.models import resolve_dtype
from namm_transfer.namm.budget import RetentionRecord
from namm_transfer.shipped import ShippedWeightsError, shipped_weights

SHIPPED_PARTS = "video"
"""Name of the embedded model's trained vision parts among the shipped weights (``weights/video/``)."""


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{what} needs at least one value")
    return values


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--ratios must be comma-separated numbers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m namm_transfer.video", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="local LLaVA-NeXT-Video folder (default: the embedded model)")
    p.add_argument("--parts", default=None,
                   help="trained vision parts of the embedded model (default: the shipped ones); 'none' for an "
                        "untrained tower")
    p.add_argument("--namm", default=None,
                   help="NAMM weights, a folder or either file (default: the shipped NAMM); 'none' to skip")
    p.add_argument("--dataset", default="builtin", choices=sorted(LOADERS))
    p.add_argument("--data", default=None, help="dataset folder (default for builtin: <out>/builtin-<split>)")
    p.add_argument("--split", default="heldout", choices=("train", "heldout"), help="built-in split")
    p.add_argument("--lengths", default="64", help="built-in video lengths in frames, comma-separated")
    p.add_argument("--kinds", default=",".join(KINDS), help="built-in question kinds, comma-separated")
    p.add_argument("--items-per-kind", type=int, default=4, help="built-in questions per kind and length")
    p.add_argument("--frames", type=int, default=None,
                   help="frames sampled per video (default: all frames of a built-in video, 32 for benchmarks)")
    p.add_argument("--limit", type=int, default=None, help="at most this many questions")
    p.add_argument("--methods", default=",".join(RULES), help=f"subset of {','.join(RULES)}")
    p.add_argument("--ratios", default="0.25,0.5,0.75", help="fixed budgets for the baselines ('' for none)")
    p.add_argument("--chunk-size", type=int, default=128, help="prefill chunk (namm-spec §1.3)")
    p.add_argument("--update-every", type=int, default=None, help="policy period (default: the NAMM's own)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32", "float16"),
                   help="model weights dtype (auto: float32 on CPU, where bf16 is about 5x slower here; bfloat16 on GPU)")
    p.add_argument("--device", default="cpu", type=check_device, help="cpu, cuda, cuda:N or mps")
    p.add_argument("--seed", type=int, default=0, help="seed of the random rule")
    p.add_argument("--out", default="results/video", help="results folder")
    return p


def _questions(args, out: Path) -> tuple[str, list[VideoQuestion]]:
    if args.dataset != "builtin":
        if args.data is None:
            raise ValueError(f"--dataset {args.dataset} needs --data DIR (the dataset folder)")
        return args.dataset, load_video_dataset(args.dataset, args.data, args.limit)
    lengths = _ints(args.lengths, "--lengths")
    kinds = tuple(_names(args.kinds))
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise ValueError(f"unknown kind(s) {', '.join(unknown) or '(none)'}; known: {', '.join(KINDS)}")
    folder = Path(args.data) if args.data else out / f"builtin-{args.split}"
    if args.data is None:
        write_split(folder, args.split, lengths, args.items_per_kind, kinds, TaskConfig())
    questions = load_video_dataset("builtin", folder, args.limit)
    name = f"builtin-{args.split}-F{'-'.join(map(str, lengths))}"
    return name, questions


def _parts(args) -> Path | None:
    """The embedded model's trained parts folder: ``--parts``, the shipped one by default, None for 'none' (and for
    ``--model``, which brings its own vision tower)."""
    if args.model is not None or (args.parts is not None and args.parts.lower() == "none"):
        return None
    if args.parts is not None:
        if not Path(args.parts).is_dir():
            raise FileNotFoundError(f"--parts {args.parts}: no such folder")
        return Path(args.parts)
    try:
        return shipped_weights(SHIPPED_PARTS)
    except ShippedWeightsError:
        raise FileNotFoundError(
            "no trained video parts are shipped (weights/video): train them with python -m namm_transfer.video.train "
            "--out weights/video, or pass --parts none for an untrained vision tower"
        ) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    rules = _names(args.methods)
    unknown = sorted(set(rules) - set(RULES))
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(RULES)}")
    for name, value, low in (("--items-per-kind", args.items_per_kind, 1), ("--frames", args.frames, 1),
                             ("--limit", args.limit, 1), ("--chunk-size", args.chunk_size, 1)):
        if value is not None and value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    ratios = _floats(args.ratios)
    parts = _parts(args)
    # heavy imports after the arguments are known to be good
    from namm_transfer.evals.report import RunFolder, format_table, plot_score_vs_memory, run_name
    from namm_transfer.video.evaluation import VideoEvaluator, load_video_model, mean_heat_map
    from namm_transfer.video.plots import plot_accuracy_vs_memory, plot_frame_retention
    from namm_transfer.video.summary import answered_records, paired_differences, paired_table, summarise

    use_namm = "namm" in rules and (args.namm is None or args.namm.lower() != "none")
    namm = load_namm_option(args.namm) if use_namm else None
    methods = comparison(rules, ratios, with_namm=namm is not None)
    if not methods:
        raise ValueError("no method to run: check --methods and --namm")
    cache = cache_config_for(None if namm is None else namm.config, args.update_every)
    out = Path(args.out)
    dataset, questions = _questions(args, out)
    dtype = resolve_dtype(args.dtype, str(args.device))
    loaded = load_video_model(args.model, parts, dtype, str(args.device))
    evaluator = VideoEvaluator(loaded, cache, args.chunk_size, args.frames)
    base_config = {
        "dataset": dataset, "model": loaded.name, "parts": None if args.model else parts,
        "items": [q.id for q in questions], "frames": args.frames, "cache": vars(cache),
        "chunk_size": args.chunk_size, "dtype": dtype,
        "namm": None if namm is None else str(args.namm or "shipped"),
    }
    folders = {}
    for method in methods:
        folder = RunFolder(out, run_name(dataset, loaded.name, method.rule, method.budget))
        folder.start({**base_config, "method": method.label, "seed": args.seed})
        folders[method] = folder
    namm_records: dict[str, dict] = {}
    total, finished = len(methods) * len(questions), 0
    for method, folder in folders.items():
        done = folder.done_ids()
        for question in questions:
            finished += 1
            if question.id in done:
                continue
            retention = None
            if method.budget == MATCHED:
                if not namm_records:
                    namm_records = {r["item_id"]: r for r in folders[Method("namm")].predictions()}
                source = namm_records[question.id]
                if "failed" in source:
                    folder.append_prediction({"item_id": question.id, "category": question.category,
                                              "failed": source["failed"]})
                    continue
                retention = [RetentionRecord(*row) for row in source["retention"]]
            policy = build_policy(method, namm, retention, seed=args.seed, device=str(args.device))
            record = evaluator.run(question, policy)
            if method.rule != "namm":
                record.pop("retention", None)
            folder.append_prediction(record)
            status = record.get("failed") or f"{record['parsed'] or '-'} ({'right' if record['correct'] else 'wrong'})"
            print(f"[{finished}/{total}] {method.label} {question.id}: {status}", flush=True)

    rows, heat_maps = [], {}
    records = {method: folder.predictions() for method, folder in folders.items()}
    for method, folder in folders.items():
        row = summarise(method, questions, records[method])
        folder.write_metrics(row)
        rows.append(row)
        answered = answered_records(records[method])
        if answered:
            heat_maps[method.label] = mean_heat_map(answered)
    paired = paired_differences(records)
    (out / "summary.json").write_text(json.dumps({"dataset": dataset, "model": loaded.name, "methods": rows,
                                                  "paired": paired}, indent=2) + "\n")
    columns = ["method", "answered", "failed", "accuracy", "acc_low", "acc_high", "kv_retained_pct",
               "kv_tokens_mean", "kv_tokens_peak", "kv_mb_peak", "kv_mb_peak_max", "policy_mb_peak", "total_mb_peak",
               "total_mb_peak_max", "tokens_per_s"]
    print(format_table(rows, columns))
    if paired:
        print(format_table(paired_table(paired)))
    plotted = [r for r in rows if "accuracy" in r]
    if plotted:
        plot_score_vs_memory(plotted, out / "accuracy_vs_kv.png", score_key="accuracy",
                             title=f"{dataset} / {loaded.name}")
    if any("total_mb_peak" in r for r in plotted):
        plot_accuracy_vs_memory([r for r in plotted if "total_mb_peak" in r], out / "accuracy_vs_memory.png",
                                title=f"{dataset} / {loaded.name}")
    if heat_maps:
        plot_frame_retention(heat_maps, out / "frame_retention.png", title=f"{dataset} / {loaded.name}")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_program(main))

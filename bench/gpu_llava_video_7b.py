"""GPU benchmark of a real LLaVA-NeXT-Video-7B (a local llava-hf/LLaVA-NeXT-Video-7B-hf snapshot) with the shipped
NAMM attached unchanged, as in the paper's video transfer (Cetin et al. 2025, §5): full cache vs NAMM vs H2O / L2 /
recency / random at the NAMM's matched budget, at 32 and 64 frames.

For every (frames, method) it answers the same questions through :class:`namm_transfer.video.evaluation.VideoEvaluator`
(the video program's own code: frames -> vision tower -> pooled features spliced as embeddings -> chunked prefill of
the language model with policy steps -> greedy decoding) and records, per question: wall seconds, peak GPU memory
allocated during the answer (``torch.cuda.max_memory_allocated`` after a reset; the weights included), peak K/V bytes,
peak total bytes (K/V + what the method adds: validity, arrival indices, buffered queries, the NAMM's state), retained
KV share, and whether the answer is right. Per (frames, method): accuracy with its 95% bootstrap interval (when
there are answers to score), means of the above, and each ratio against the full cache at the same frames.

Questions: ``--dataset longvideobench|mlvu|videomme --data DIR`` (the published layouts, lmms-eval's prompts and
letter parsing; :mod:`namm_transfer.evals.video_qa`) or, by default, the built-in held-out needle tasks written at
each frame count (64 px frames, upscaled by the model's own preprocessing; a timing and memory check more than an
accuracy one). ``--limit`` caps the questions per frame count.

Results go to ``$OUT/gpu_video_bench.json`` when OUT is set (else ``--out``), rewritten after every (frames, method)
so a run cut short keeps what it measured. ``--smoke`` runs the same code on the embedded video model on CPU (two
questions, 16 frames) to check the script without a GPU or the 7B weights.

Example (one H200, about 10 minutes for 20 questions at 32 and 64 frames)::

    python bench/gpu_llava_video_7b.py --model /models/LLaVA-NeXT-Video-7B-hf --dataset longvideobench \
        --data /data/LongVideoBench --limit 20 --frames 32,64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a plain checkout works without installing

import torch  # noqa: E402

from namm_transfer.evals.stats import bootstrap_mean_interval  # noqa: E402
from namm_transfer.evals.video_qa import LOADERS, load_video_dataset  # noqa: E402
from namm_transfer.evals.video_tasks import KINDS, TaskConfig, write_split  # noqa: E402
from namm_transfer.methods import MATCHED, Method, build_policy, cache_config_for, load_namm_option  # noqa: E402
from namm_transfer.namm.budget import RetentionRecord  # noqa: E402
from namm_transfer.video.evaluation import VideoEvaluator, load_video_model  # noqa: E402

METHODS = (Method("full"), Method("namm"), *(Method(rule, MATCHED) for rule in ("h2o", "l2", "recency", "random")))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="local LLaVA-NeXT-Video folder (required unless --smoke)")
    p.add_argument("--namm", default=None, help="NAMM weights (default: the shipped NAMM)")
    p.add_argument("--frames", default="32,64", help="frames sampled per video, comma-separated")
    p.add_argument("--dataset", default="builtin", choices=sorted(LOADERS))
    p.add_argument("--data", default=None, help="benchmark folder in its published layout (not for builtin)")
    p.add_argument("--limit", type=int, default=20, help="questions per frame count")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--chunk-size", type=int, default=512, help="prefill chunk in tokens")
    p.add_argument("--out", default="bench/results/gpu_video_bench.json")
    p.add_argument("--smoke", action="store_true", help="embedded video model on CPU, 2 questions, 16 frames")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.device, args.dtype, args.frames, args.limit, args.chunk_size = None, "cpu", "float32", "16", 2, 128
    elif args.model is None:
        p.error("--model DIR is required (or --smoke)")
    if args.dataset != "builtin" and args.data is None:
        p.error(f"--dataset {args.dataset} needs --data DIR")
    args.frames = [int(f) for f in args.frames.split(",") if f.strip()]
    if not args.frames or min(args.frames) < 1 or args.limit < 1:
        p.error("--frames needs positive integers and --limit must be >= 1")
    return args


def questions_for(args, frames: int, scratch: Path) -> list:
    """The benchmark's questions (first ``--limit``), or built-in held-out questions written at ``frames``."""
    if args.dataset != "builtin":
        return load_video_dataset(args.dataset, args.data, args.limit)
    per_kind = -(-args.limit // len(KINDS))
    folder = scratch / f"builtin-F{frames}"
    write_split(folder, "heldout", [frames], per_kind, KINDS, TaskConfig())
    return load_video_dataset("builtin", folder, args.limit)


def measured_run(evaluator: VideoEvaluator, question, policy, device: str) -> dict:
    """One answer with its wall time and the device's peak allocated bytes during it (CUDA only)."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    record = evaluator.run(question, policy)
    if cuda:
        torch.cuda.synchronize()
    record["wall_seconds"] = time.perf_counter() - started
    record["device_bytes_peak"] = torch.cuda.max_memory_allocated() if cuda else None
    return record


def summarise(records: list[dict]) -> dict:
    """Accuracy (%) with its 95% bootstrap interval and the means of the measured quantities."""
    answered = [r for r in records if "failed" not in r]
    row = {"questions": len(records), "failed": len(records) - len(answered)}
    if not answered:
        return row
    correct = [float(bool(r["correct"])) for r in answered]
    low, high = bootstrap_mean_interval(correct)
    mean = lambda key: sum(r[key] for r in answered) / len(answered)  # noqa: E731 - local shorthand
    row.update({
        "accuracy": 100 * sum(correct) / len(correct), "acc_low": 100 * low, "acc_high": 100 * high,
        "kv_retained_pct": 100 * mean("kv_retained"), "prompt_tokens": mean("prompt_tokens"),
        "seconds": mean("wall_seconds"), "kv_mib_peak": mean("kv_bytes_peak") / 2**20,
        "total_mib_peak": mean("total_bytes_peak") / 2**20,
    })
    if all(r["device_bytes_peak"] is not None for r in answered):
        row["device_gib_peak"] = mean("device_bytes_peak") / 2**30
    return row


def with_ratios(rows: dict[str, dict]) -> dict[str, dict]:
    """Each row's seconds, K/V, total and device peak divided by the full cache's (same frames, same questions)."""
    full = rows.get("full", {})
    for row in rows.values():
        for key in ("seconds", "kv_mib_peak", "total_mib_peak", "device_gib_peak"):
            if key in row and full.get(key):
                row[f"{key}_vs_full"] = row[key] / full[key]
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(os.environ["OUT"]) / "gpu_video_bench.json" if os.environ.get("OUT") else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    namm = load_namm_option(args.namm)
    cache = cache_config_for(namm.config)
    loaded = load_video_model(args.model, None, args.dtype, args.device)  # --smoke: embedded, untrained tower
    report = {"model": loaded.name, "dataset": args.dataset, "device": args.device, "dtype": args.dtype,
              "chunk_size": args.chunk_size, "update_every": cache.update_every,
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None, "frames": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for frames in args.frames:
            questions = questions_for(args, frames, Path(scratch))
            evaluator = VideoEvaluator(loaded, cache, args.chunk_size, frames)
            rows, namm_records = {}, {}
            for method in METHODS:
                records = []
                for question in questions:
                    retention = None
                    if method.budget == MATCHED:
                        source = namm_records[question.id]
                        if "failed" in source:
                            continue
                        retention = [RetentionRecord(*row) for row in source["retention"]]
                    policy = build_policy(method, namm, retention, device=args.device)
                    record = measured_run(evaluator, question, policy, args.device)
                    if method.rule == "namm":
                        namm_records[question.id] = record
                    records.append(record)
                    print(f"F={frames} {method.label} {question.id}: "
                          f"{record.get('failed') or ('right' if record['correct'] else 'wrong')} "
                          f"{record.get('wall_seconds', 0):.1f}s", flush=True)
                rows[method.label] = summarise(records)
                report["frames"][str(frames)] = with_ratios(rows)
                out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["frames"], indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

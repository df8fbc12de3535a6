"""What ``python -m namm_transfer.video`` reports from its per-question records: each method's accuracy with its
bootstrap interval, overall, per question category and per number of frames, its KV and policy memory and speed;
and the paired differences of the NAMM against the full cache and against each baseline at its matched budget, on
the questions both answered.

A record is one line of a method's ``predictions.jsonl`` (:meth:`~namm_transfer.video.evaluation.VideoEvaluator.run`):
``item_id``, ``category``, ``correct``, ``num_frames``, KV and policy byte counts, ``tokens_per_second``; a failed
question holds ``failed`` (its reason) instead. Intervals are percentile bootstraps over questions
(:mod:`namm_transfer.evals.stats`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Mapping, Sequence

from namm_transfer.evals.report import with_interval
from namm_transfer.evals.stats import bootstrap_mean_interval, paired_difference
from namm_transfer.evals.video_qa import VideoQuestion, dataset_score
from namm_transfer.methods import Method, paired_comparisons


def answered_records(records: Sequence[Mapping]) -> list[Mapping]:
    """The records of the questions answered (a failed question's record holds ``failed`` instead)."""
    return [r for r in records if "failed" not in r]


def _accuracy_by(answered: Sequence[Mapping], key: str) -> dict[str, float]:
    """``{value of key: accuracy %}`` over the answered records, values in sorted order."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for record in answered:
        groups[str(record[key])].append(bool(record["correct"]))
    ordered = sorted(groups, key=lambda value: (not value.isdigit(), int(value) if value.isdigit() else 0, value))
    return {value: 100 * sum(groups[value]) / len(groups[value]) for value in ordered}


def summarise(method: Method, questions: Sequence[VideoQuestion], records: Sequence[Mapping]) -> dict:
    """Accuracy (%, the dataset's rule) with its 95% bootstrap interval over answered questions, accuracy per
    category and per number of frames, failures, mean retained KV (%), mean and peak KV tokens per layer, mean and
    largest peak KV bytes, mean peak policy bytes (what the method adds to the K/V) and mean and largest peak total
    bytes (K/V + policy, summed at the same moment), tokens per second. Records written before policy bytes were
    recorded leave those columns out."""
    answered = answered_records(records)
    row = {"method": method.label, "answered": len(answered), "failed": len(records) - len(answered)}
    if not answered:
        return row
    by_id = {q.id: q for q in questions}
    correct = [bool(r["correct"]) for r in answered]
    low, high = bootstrap_mean_interval([float(c) for c in correct])
    mean = lambda key: sum(r[key] for r in answered) / len(answered)  # noqa: E731 - local shorthand
    row.update({
        "accuracy": 100 * dataset_score([by_id[r["item_id"]] for r in answered], correct),
        "acc_low": 100 * low, "acc_high": 100 * high,
        "kv_retained_pct": 100 * mean("kv_retained"), "kv_tokens_mean": mean("kv_tokens_mean"),
        "kv_tokens_peak": mean("kv_tokens_peak"), "kv_mb_peak": mean("kv_bytes_peak") / 2**20,
        "kv_mb_peak_max": max(r["kv_bytes_peak"] for r in answered) / 2**20,
        "tokens_per_s": mean("tokens_per_second"),
        "per_category": _accuracy_by(answered, "category"), "per_frames": _accuracy_by(answered, "num_frames"),
    })
    if all("total_bytes_peak" in r for r in answered):
        row.update({
            "policy_mb_peak": mean("policy_bytes_peak") / 2**20, "total_mb_peak": mean("total_bytes_peak") / 2**20,
            "total_mb_peak_max": max(r["total_bytes_peak"] for r in answered) / 2**20,
        })
    return row


def paired_differences(records: Mapping[Method, Sequence[Mapping]]) -> list[dict]:
    """``namm - full`` and ``namm - <rule>@matched`` (:func:`~namm_transfer.methods.paired_comparisons`): the mean
    difference in accuracy points (0-100) over the questions both answered, with its 95% bootstrap interval
    (``{"items", "mean", "ci95"}``, None when they share no answered question)."""
    def points(method: Method) -> dict[str, float]:
        return {r["item_id"]: 100.0 * bool(r["correct"]) for r in answered_records(records[method])}

    return [{"comparison": f"{a.label} - {b.label}", "a": a.label, "b": b.label,
             "accuracy": paired_difference(points(a), points(b))} for a, b in paired_comparisons(records)]


def paired_table(paired: Sequence[Mapping]) -> list[dict]:
    """The printed rows of :func:`paired_differences`: questions and the accuracy difference with its interval."""
    return [{
        "paired difference": row["comparison"],
        "questions": None if row["accuracy"] is None else row["accuracy"]["items"],
        "accuracy diff [95% CI]": None if row["accuracy"] is None
        else with_interval(row["accuracy"]["mean"], row["accuracy"]["ci95"]),
    } for row in paired]

"""Metrics of the text evaluation from its per-item records: each method's score with its bootstrap interval,
the dense answer log-likelihood, memory (K/V, policy state, total), and paired differences of every NAMM
against the full cache and against each baseline at that NAMM's matched budget, on the same items.

A record is one line of a method's ``predictions.jsonl`` (``python -m namm_transfer.text``): ``item_id``,
``task``, ``score`` in [0, 1], ``kv_retained``, ``kept_per_layer``, the byte counts of
:class:`~namm_transfer.text_eval.ItemRun`, ``seconds`` and, when the dense metric ran, ``answer_logprob`` (mean
per-token log-probability of the reference answer). Records written before a field existed lack it: a memory
field is then reported as None, the dense metric over the items that have it (``answer_items``).

Intervals are percentile bootstraps over items (:mod:`namm_transfer.evals.stats`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Mapping, Sequence

from namm_transfer.evals.report import with_interval
from namm_transfer.evals.stats import mean_interval, paired_difference
from namm_transfer.methods import Method, paired_comparisons

DENSE = "answer_logprob"
"""Record and summary key of the dense metric."""
MEMORY_FIELDS = ("kv_bytes_peak", "kv_bytes_final", "policy_bytes_peak", "policy_bytes_final",
                 "total_bytes_peak", "total_bytes_final")
"""Per-item byte counts, reported as means per item."""
MIB = 2**20


def _per_item(records: Sequence[Mapping], key: str, scale: float = 1.0) -> dict[str, float]:
    """``{item_id: scale * record[key]}`` over the records holding a value for ``key``."""
    return {r["item_id"]: scale * r[key] for r in records if r.get(key) is not None}


def summarise(method: Method, records: Sequence[Mapping]) -> dict:
    """Metrics of one method over its finished records: score (0-100, mean and 95% interval) overall and per
    task, the dense answer log-probability (mean and interval), mean retained KV (%), mean bytes per item
    (:data:`MEMORY_FIELDS`), per-layer retention (%) and seconds per item."""
    if not records:
        raise ValueError(f"{method.label}: no finished item to summarise")
    count = len(records)
    by_task: dict[str, list[float]] = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r["score"])
    num_layers = len(records[0]["kept_per_layer"])
    score = mean_interval(list(_per_item(records, "score", 100.0).values()))
    dense = list(_per_item(records, DENSE).values())
    dense_interval = mean_interval(dense) if dense else {"mean": None, "ci95": None}
    return {
        "method": method.label,
        "curve": method.curve,
        "keep_bias": method.keep_bias,
        "items": count,
        "score": score["mean"],
        "score_ci95": score["ci95"],
        DENSE: dense_interval["mean"],
        f"{DENSE}_ci95": dense_interval["ci95"],
        "answer_items": len(dense),
        "kv_retained_pct": 100 * sum(r["kv_retained"] for r in records) / count,
        **{key: (sum(r[key] for r in records) / count if all(key in r for r in records) else None)
           for key in MEMORY_FIELDS},
        "seconds_per_item": sum(r["seconds"] for r in records) / count,
        "per_task": {t: 100 * sum(v) / len(v) for t, v in sorted(by_task.items())},
        "kept_per_layer_pct": [100 * sum(r["kept_per_layer"][i] for r in records) / count for i in range(num_layers)],
    }


def paired_differences(records: Mapping[Method, Sequence[Mapping]]) -> list[dict]:
    """Per NAMM method A (each keep bias): ``A - full`` and ``A - <rule>@matched`` for every baseline run at A's
    matched budget, on the items both finished: score (points, 0-100) and dense answer log-probability, each
    ``{"items", "mean", "ci95"}`` or None when they share no item."""
    return [{
        "comparison": f"{a.label} - {b.label}", "a": a.label, "b": b.label,
        "score": paired_difference(_per_item(records[a], "score", 100.0), _per_item(records[b], "score", 100.0)),
        DENSE: paired_difference(_per_item(records[a], DENSE), _per_item(records[b], DENSE)),
    } for a, b in paired_comparisons(records)]


def _mib(value: float | None) -> float | None:
    return None if value is None else value / MIB


def method_table(rows: Sequence[Mapping]) -> list[dict]:
    """The printed table's rows from :func:`summarise` rows: score and answer log-probability with their 95%
    intervals, retained KV, mean peak K/V, policy and total MiB per item, seconds per item."""
    return [{
        "method": row["method"], "items": row["items"],
        "score [95% CI]": with_interval(row["score"], row["score_ci95"]),
        "answer log-prob [95% CI]": with_interval(row.get(DENSE), row.get(f"{DENSE}_ci95"), 2),
        "KV kept %": row["kv_retained_pct"],
        "KV MiB peak": _mib(row.get("kv_bytes_peak")),
        "policy MiB peak": _mib(row.get("policy_bytes_peak")),
        "total MiB peak": _mib(row.get("total_bytes_peak")),
        "s/item": row["seconds_per_item"],
    } for row in rows]


def paired_table(paired: Sequence[Mapping]) -> list[dict]:
    """The printed table of :func:`paired_differences`: items, score difference and answer log-probability
    difference, each with its 95% interval."""
    table = []
    for row in paired:
        score, dense = row["score"], row[DENSE]
        table.append({
            "paired difference": row["comparison"], "items": None if score is None else score["items"],
            "score diff [95% CI]": None if score is None else with_interval(score["mean"], score["ci95"]),
            "log-prob diff [95% CI]": None if dense is None else with_interval(dense["mean"], dense["ci95"], 2),
        })
    return table

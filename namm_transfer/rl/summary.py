"""Per-condition metrics of DT episodes: returns with intervals, normalised scores, memory, speed, and paired
differences between conditions on the same episodes.

Intervals are percentile bootstraps over episodes (:func:`namm_transfer.evals.stats.bootstrap_mean_interval`);
episodes of all seeds are pooled, and paired differences use the same env seeds under both conditions.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from namm_transfer.evals.control import ControlEnv, normalized_score
from namm_transfer.evals.stats import bootstrap_mean_interval


def condition_metrics(
    records: Sequence[Mapping],
    env: ControlEnv,
    ref_scores: tuple[float, float] | None,
    seconds: float,
) -> dict:
    """Metrics of one condition from its episode records (dicts of :class:`~namm_transfer.rl.rollout.EpisodeRecord`
    fields plus ``item_id``).

    Args:
        env: the env (D4RL references).
        ref_scores: (ref_min, ref_max) of the DT's training dataset (Minari metadata), or None.
        seconds: wall time spent on these episodes (for env steps per second).
    """
    if not records:
        raise ValueError("no finished episodes to summarise")
    returns = np.array([r["episode_return"] for r in records])
    d4rl = env.d4rl_normalized(returns)
    metrics = {
        "episodes": len(records),
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std(ddof=1)) if len(returns) > 1 else 0.0,
        "return_ci95": list(bootstrap_mean_interval(returns)),
        "d4rl_score": float(d4rl.mean()),
        "d4rl_score_ci95": list(bootstrap_mean_interval(d4rl)),
        "length_mean": float(np.mean([r["length"] for r in records])),
        "terminated_share": float(np.mean([r["terminated"] for r in records])),
        "kv_tokens_mean": float(np.mean([r["kv_tokens_mean"] for r in records])),
        "kv_tokens_peak": float(np.max([r["kv_tokens_peak"] for r in records])),
        "kv_bytes_mean": float(np.mean([r["kv_bytes_mean"] for r in records])),
        "kv_bytes_peak": float(np.max([r["kv_bytes_peak"] for r in records])),
        "policy_bytes_mean": float(np.mean([r["policy_bytes_mean"] for r in records])),
        "total_bytes_mean": float(np.mean([r["kv_bytes_mean"] + r["policy_bytes_mean"] for r in records])),
        "total_bytes_peak": float(np.max([r["kv_bytes_peak"] + r["policy_bytes_peak"] for r in records])),
        "env_steps_per_second": float(sum(r["length"] for r in records) / seconds) if seconds > 0 else None,
    }
    if ref_scores is not None:
        minari = normalized_score(returns, *ref_scores)
        metrics["minari_score"] = float(minari.mean())
        metrics["minari_score_ci95"] = list(bootstrap_mean_interval(minari))
    return metrics


def paired_difference(records_a: Sequence[Mapping], records_b: Sequence[Mapping], env: ControlEnv) -> dict | None:
    """D4RL score of A minus B on the episodes both ran (same ``item_id``): mean and bootstrap 95% interval, or
    None when they share no episode."""
    by_id = {r["item_id"]: r["episode_return"] for r in records_b}
    pairs = [(r["episode_return"], by_id[r["item_id"]]) for r in records_a if r["item_id"] in by_id]
    if not pairs:
        return None
    a, b = (np.array(x) for x in zip(*pairs))
    diff = env.d4rl_normalized(a) - env.d4rl_normalized(b)
    return {"episodes": len(pairs), "mean": float(diff.mean()), "ci95": list(bootstrap_mean_interval(diff))}

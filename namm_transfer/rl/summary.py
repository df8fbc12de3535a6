"""Per-condition metrics of DT episodes: returns with intervals, normalised scores, memory, speed, and paired
differences between conditions on the same episodes.

Intervals are percentile bootstraps over episodes (:func:`namm_transfer.evals.stats.bootstrap_mean_interval`);
episodes of all seeds are pooled, and paired differences use the same env seeds under both conditions.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from namm_transfer.evals.control import ControlEnv, normalized_score
from namm_transfer.evals import stats
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
    None when they share no episode (:func:`namm_transfer.evals.stats.paired_difference`)."""

    def scores(records: Sequence[Mapping]) -> dict:
        normalised = env.d4rl_normalized(np.array([r["episode_return"] for r in records]))
        return {r["item_id"]: float(score) for r, score in zip(records, np.atleast_1d(normalised))}

    difference = stats.paired_difference(scores(records_a), scores(records_b))
    if difference is None:
        return None
    return {"episodes": difference.pop("items"), **difference}

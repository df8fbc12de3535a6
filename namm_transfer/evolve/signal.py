"""How much signal a generation's fitness carries (issue 8; field-notes §8).

Every member is scored on the same prompts; split them into two disjoint halves and score each member on each half.
If the fitness ranks members for a reason that holds beyond the prompts drawn, the two halves agree:

* ``rank_correlation``: Spearman correlation of the members' half scores (1 = the same order on both halves,
  about 0 = the order is decided by which prompts were drawn);
* ``member_spread``: standard deviation over members of their mean score (the differences selection acts on);
* ``prompt_noise``: standard deviation over members of half the difference between their two half scores, an
  estimate of the sampling noise of one member's mean; spread well above noise means selection sees real
  differences.
"""

from __future__ import annotations

import numpy as np


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0 .. n-1 with ties given their mean rank."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values))
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def fitness_signal(half_a: np.ndarray, half_b: np.ndarray) -> dict[str, float]:
    """Signal measures of members scored on two disjoint prompt halves ((P,) each, P >= 2)."""
    half_a, half_b = np.asarray(half_a, dtype=np.float64), np.asarray(half_b, dtype=np.float64)
    if half_a.shape != half_b.shape or half_a.ndim != 1 or len(half_a) < 2:
        raise ValueError(f"half scores must be two (P,) arrays with P >= 2, got {half_a.shape} and {half_b.shape}")
    rank_a, rank_b = _ranks(half_a), _ranks(half_b)
    if rank_a.std() == 0 or rank_b.std() == 0:
        correlation = float("nan")  # every member tied on a half: no order to compare
    else:
        correlation = float(np.corrcoef(rank_a, rank_b)[0, 1])
    return {
        "rank_correlation": correlation,
        "member_spread": float(((half_a + half_b) / 2).std()),
        "prompt_noise": float(((half_a - half_b) / 2).std()),
    }

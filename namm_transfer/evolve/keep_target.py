"""What the warm start teaches the NAMM's scorer to keep at each step (issue 8).

Three targets, all computed per (layer, KV head, slot) of one recorded step:

* ``oracle``: the smallest set of tokens holding ``coverage`` of the future attention
  (:func:`~namm_transfer.evolve.oracle.oracle_keep`): what the later queries and the answer's will read.
* ``recency``: the tokens younger than ``recency_window``, with the age the NAMM's own positional feature reads
  (``r_j = p_newest - p_j``, namm-spec §2.5): a sliding window, like the recency baseline, which beats the shipped
  NAMM on the held-out keep-bias Pareto at 17% and 64% of the K/V (README "Keep-bias Pareto at 2,048 tokens").
* ``union``: both, i.e. a recent window plus the older tokens the future reads (the H2O paper's "heavy hitters
  plus recent window" split, learnt instead of fixed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from namm_transfer.evolve.oracle import oracle_keep

TARGET_KINDS = ("oracle", "recency", "union")


@dataclass(frozen=True)
class KeepTarget:
    """The label the scorer is fitted to.

    Attributes:
        kind: one of :data:`TARGET_KINDS`.
        coverage: share in (0, 1] of the future attention the oracle's set holds (``oracle`` and ``union``).
        recency_window: tokens of age below this are kept (``recency`` and ``union``); >= 1.
    """

    kind: str = "oracle"
    coverage: float = 0.9
    recency_window: int = 512

    def __post_init__(self) -> None:
        problems = []
        if self.kind not in TARGET_KINDS:
            problems.append(f"kind must be one of {', '.join(TARGET_KINDS)}, got {self.kind!r}")
        if not 0.0 < self.coverage <= 1.0:
            problems.append(f"coverage must be in (0, 1], got {self.coverage}")
        if self.recency_window < 1:
            problems.append(f"recency_window must be >= 1, got {self.recency_window}")
        if problems:
            raise ValueError("invalid KeepTarget: " + "; ".join(problems))

    def labels(self, mass: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Which slots of one step to keep.

        Args:
            mass: (H, N) future attention of each slot (:func:`~namm_transfer.evolve.oracle.future_attention`).
            positions: (H, N) int64 absolute positions, ascending along N; the last slot is the newest.

        Returns:
            (H, N) bool.
        """
        if mass.shape != positions.shape:
            raise ValueError(f"mass {tuple(mass.shape)} and positions {tuple(positions.shape)} differ")
        recent = (positions[..., -1:] - positions) < self.recency_window
        if self.kind == "recency":
            return recent
        oracle = oracle_keep(mass, self.coverage)
        return oracle if self.kind == "oracle" else oracle | recent

"""The memory methods a program compares, by name, and how each becomes an eviction policy.

A method is a rule plus, for the hand-made rules, a budget (docs/algorithm.md §6):

* ``full``: the full cache (no policy; the same runtime code path, so timings compare like with like);
* ``namm``: a NAMM from a weights file; it decides its own budget (score >= 0);
* ``h2o``, ``l2``, ``recency``, ``random`` at ``matched`` budget (the per-layer counts the NAMM kept on the
  same input) or at a fixed ratio of the tokens seen (``h2o@0.25``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from namm_transfer.namm.baselines import BASELINES, make_baseline
from namm_transfer.namm.budget import FixedRatioBudget, MatchedBudget, RetentionRecord
from namm_transfer.namm.checkpoint import NammWeights, load_namm
from namm_transfer.namm.config import NammConfig
from namm_transfer.namm.features import NormalisationStats
from namm_transfer.namm.interface import EvictionPolicy
from namm_transfer.namm.policy import NammPolicy
from namm_transfer.runtime.cache import CacheConfig
from namm_transfer.shipped import shipped_weights

SHIPPED_NAMM = "namm"
"""Name of the NAMM this project evolved and ships (:func:`namm_transfer.shipped.shipped_weights`): every
program's default."""

RULES = ("full", "namm", "h2o", "l2", "recency", "random")
MATCHED = "matched"


@dataclass(frozen=True)
class Method:
    """One entry of a comparison.

    Attributes:
        rule: one of :data:`RULES`.
        budget: None for ``full`` and ``namm``; ``"matched"`` or a ratio in (0, 1] for the baselines.
    """

    rule: str
    budget: str | float | None = None

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown method {self.rule!r}; known: {', '.join(RULES)}")
        if self.rule in ("full", "namm"):
            if self.budget is not None:
                raise ValueError(f"method {self.rule!r} takes no budget")
        elif self.budget != MATCHED and not (isinstance(self.budget, float) and 0.0 < self.budget <= 1.0):
            raise ValueError(f"method {self.rule!r} needs budget 'matched' or a ratio in (0, 1], got {self.budget!r}")

    @property
    def label(self) -> str:
        """``full``, ``namm``, ``h2o@matched``, ``l2@0.25`` ..."""
        return self.rule if self.budget is None else f"{self.rule}@{self.budget}"


def comparison(rules: Iterable[str], ratios: Sequence[float], with_namm: bool) -> list[Method]:
    """Methods in evaluation order: full, namm, then every baseline at matched budget and at each ratio.

    ``matched`` runs need the NAMM's retention on the same item, so they exist only ``with_namm``.
    """
    rules = list(rules)
    methods = [Method("full")] if "full" in rules else []
    if with_namm and "namm" in rules:
        methods.append(Method("namm"))
    for rule in rules:
        if rule in ("full", "namm"):
            continue
        if rule not in BASELINES:
            raise ValueError(f"unknown method {rule!r}; known: {', '.join(RULES)}")
        if with_namm and "namm" in rules:
            methods.append(Method(rule, MATCHED))
        methods.extend(Method(rule, float(r)) for r in ratios)
    return methods


def load_namm_option(option: str | Path | None) -> NammWeights:
    """The NAMM a program's ``--namm`` option names: a folder or either file, or the shipped NAMM when None."""
    return load_namm(shipped_weights(SHIPPED_NAMM) if option is None else option)


def namm_policy(weights: NammWeights, device: torch.device | str = "cpu") -> NammPolicy:
    """A :class:`NammPolicy` running ``weights`` (one parameter vector) on ``device``."""
    stats = NormalisationStats(weights.norm_mean.to(device), weights.norm_var.to(device))
    return NammPolicy(weights.config, weights.params.to(device), stats)


def build_policy(
    method: Method,
    namm: NammWeights | None = None,
    namm_retention: Sequence[RetentionRecord] | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> EvictionPolicy | None:
    """The policy of ``method`` (None for the full cache).

    Args:
        namm: weights for ``namm``.
        namm_retention: the NAMM's retention log on the same input, for ``matched`` budgets.
        seed: seed of the random rule.
    """
    if method.rule == "full":
        return None
    if method.rule == "namm":
        if namm is None:
            raise ValueError("method 'namm' needs NAMM weights (--namm PATH)")
        return namm_policy(namm, device)
    if method.budget == MATCHED:
        if namm_retention is None:
            raise ValueError(f"method {method.label!r} needs the NAMM's retention log on the same input")
        budget = MatchedBudget.from_retention(namm_retention)
    else:
        budget = FixedRatioBudget(float(method.budget))
    options = {"seed": seed} if method.rule == "random" else {}
    return make_baseline(method.rule, budget, **options)


def cache_config_for(namm: NammConfig | None, update_every: int | None = None) -> CacheConfig:
    """Cache settings shared by every method of a comparison: the NAMM's own period and attention numerics
    (so baselines run on the same schedule), unless ``update_every`` overrides the period."""
    if namm is None:
        return CacheConfig(update_every=update_every or 512)
    return CacheConfig(update_every=update_every or namm.update_every, attention_dtype=namm.attention_dtype)

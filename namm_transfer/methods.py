"""The memory methods a program compares, by name, and how each becomes an eviction policy.

A method is a rule plus, for the hand-made rules, a budget (docs/algorithm.md §6):

* ``full``: the full cache (no policy; the same runtime code path, so timings compare like with like);
* ``namm``: a NAMM from a weights file; it decides its own budget (score + keep bias >= 0). A keep bias other
  than 0 is the memory knob (:class:`~namm_transfer.namm.policy.NammPolicy`): ``namm@+0.5`` keeps more,
  ``namm@-1`` fewer;
* ``h2o``, ``l2``, ``recency``, ``random`` at ``matched`` budget (the per-layer counts the NAMM with the same
  keep bias kept on the same input: ``h2o@matched``, ``h2o@matched+0.5``) or at a fixed ratio of the tokens
  seen (``h2o@0.25``).
"""

from __future__ import annotations

import math
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
        keep_bias: the NAMM's keep bias (finite): of ``namm`` itself, or of the NAMM whose budget a ``matched``
            baseline replays; 0 for every other method.
    """

    rule: str
    budget: str | float | None = None
    keep_bias: float = 0.0

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown method {self.rule!r}; known: {', '.join(RULES)}")
        if self.rule in ("full", "namm"):
            if self.budget is not None:
                raise ValueError(f"method {self.rule!r} takes no budget")
        elif self.budget != MATCHED and not (isinstance(self.budget, float) and 0.0 < self.budget <= 1.0):
            raise ValueError(f"method {self.rule!r} needs budget 'matched' or a ratio in (0, 1], got {self.budget!r}")
        if not math.isfinite(self.keep_bias):
            raise ValueError(f"keep_bias must be finite, got {self.keep_bias}")
        if self.keep_bias and self.rule != "namm" and self.budget != MATCHED:
            raise ValueError(f"method {self.label!r}: only 'namm' and matched budgets take a keep bias")
        object.__setattr__(self, "keep_bias", float(self.keep_bias) + 0.0)  # -0.0 is 0.0

    @property
    def label(self) -> str:
        """``full``, ``namm``, ``namm@+0.5``, ``h2o@matched``, ``h2o@matched+0.5``, ``l2@0.25`` ..."""
        if self.rule == "namm":
            return "namm" if not self.keep_bias else f"namm@{bias_tag(self.keep_bias)}"
        if self.budget == MATCHED and self.keep_bias:
            return f"{self.rule}@{MATCHED}{bias_tag(self.keep_bias)}"
        return self.rule if self.budget is None else f"{self.rule}@{self.budget}"

    @property
    def run_budget(self) -> str | float | None:
        """The budget part of the method's results folder (:func:`namm_transfer.evals.report.run_name`): the
        budget itself, with a sign-safe bias tag (``bias_p0.5``, ``matched_m1``) when the keep bias is not 0."""
        if not self.keep_bias:
            return self.budget
        tag = ("p" if self.keep_bias > 0 else "m") + format(abs(self.keep_bias), "g").replace("+", "")
        return f"{self.budget or 'bias'}_{tag}"

    @property
    def curve(self) -> str:
        """The curve of a score-vs-memory plot this method is a point of: ``full``, ``namm`` (over its keep
        biases), ``h2o@matched`` (over the NAMM's keep biases), ``h2o@ratio`` (over the fixed ratios)."""
        if self.budget is None:
            return self.rule
        return f"{self.rule}@{MATCHED if self.budget == MATCHED else 'ratio'}"

    @property
    def namm_source(self) -> Method | None:
        """The NAMM method whose retention a ``matched`` baseline replays (None for other methods)."""
        return Method("namm", keep_bias=self.keep_bias) if self.budget == MATCHED else None


def bias_tag(keep_bias: float) -> str:
    """A keep bias as it appears in method labels: signed, shortest form (``+0.5``, ``-1``, ``+0.125``)."""
    return format(keep_bias, "+g")


def paired_comparisons(methods: Iterable[Method]) -> list[tuple[Method, Method]]:
    """The paired comparisons the programs report, ``A - B`` on the same items: A each NAMM method (every keep
    bias), B the full cache and every baseline run at A's matched budget, in ``methods``' order."""
    methods = list(methods)
    return [(a, b) for a in methods if a.rule == "namm" for b in methods if b.rule == "full" or b.namm_source == a]


def comparison(
    rules: Iterable[str], ratios: Sequence[float], with_namm: bool, keep_biases: Sequence[float] = (0.0,)
) -> list[Method]:
    """Methods in evaluation order: full, the NAMM at each keep bias, then every baseline at the matched budget
    of each of those NAMMs and at each ratio.

    ``matched`` runs need the NAMM's retention on the same item, so they exist only ``with_namm``. Keep biases
    must be distinct and give distinct labels (:func:`bias_tag`), else ValueError.
    """
    rules = list(rules)
    biases = [float(b) + 0.0 for b in keep_biases]
    if not biases or len({bias_tag(b) for b in biases}) != len(biases):
        raise ValueError(f"keep biases must be one or more distinct numbers (as labelled: "
                         f"{', '.join(bias_tag(b) for b in biases) or 'none'})")
    namm = with_namm and "namm" in rules
    methods = [Method("full")] if "full" in rules else []
    if namm:
        methods.extend(Method("namm", keep_bias=b) for b in biases)
    for rule in rules:
        if rule in ("full", "namm"):
            continue
        if rule not in BASELINES:
            raise ValueError(f"unknown method {rule!r}; known: {', '.join(RULES)}")
        if namm:
            methods.extend(Method(rule, MATCHED, keep_bias=b) for b in biases)
        methods.extend(Method(rule, float(r)) for r in ratios)
    return methods


def load_namm_option(option: str | Path | None) -> NammWeights:
    """The NAMM a program's ``--namm`` option names: a folder or either file, or the shipped NAMM when None."""
    return load_namm(shipped_weights(SHIPPED_NAMM) if option is None else option)


def namm_policy(weights: NammWeights, device: torch.device | str = "cpu", keep_bias: float = 0.0) -> NammPolicy:
    """A :class:`NammPolicy` running ``weights`` (one parameter vector) on ``device`` with ``keep_bias``."""
    stats = NormalisationStats(weights.norm_mean.to(device), weights.norm_var.to(device))
    return NammPolicy(weights.config, weights.params.to(device), stats, keep_bias=keep_bias)


def build_policy(
    method: Method,
    namm: NammWeights | None = None,
    namm_retention: Sequence[RetentionRecord] | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> EvictionPolicy | None:
    """The policy of ``method`` (None for the full cache).

    Args:
        namm: weights for ``namm`` (run with ``method.keep_bias``).
        namm_retention: the retention log of ``method.namm_source`` on the same input, for ``matched`` budgets.
        seed: seed of the random rule.
    """
    if method.rule == "full":
        return None
    if method.rule == "namm":
        if namm is None:
            raise ValueError("method 'namm' needs NAMM weights (--namm PATH)")
        return namm_policy(namm, device, method.keep_bias)
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

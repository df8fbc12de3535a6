"""How many cache slots a hand-made eviction rule keeps per layer at a policy step.

A NAMM decides its own budget (score >= 0, namm-spec.md §4). The baselines of
:mod:`namm_transfer.namm.baselines` need one (ARCHITECTURE.md, "Budgets and fair comparisons"):

* :class:`FixedRatioBudget`: a fixed fraction of the tokens seen so far (the 25/50/75% Pareto runs);
* :class:`MatchedBudget`: the per-(step, layer) counts a NAMM kept on the same input, replayed from the
  runtime's retention log (:class:`RetentionRecord`); past the NAMM's last step of a layer (a baseline whose answer
  runs longer) it keeps that step's share of the tokens seen and counts the steps it extended.

Every budget returns a count clamped to ``[1, N]`` (N = ``view.num_slots``): a layer never keeps more slots
than it holds, and always keeps at least the newest token.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Iterable, Protocol, runtime_checkable

from namm_transfer.namm.interface import LayerView


@runtime_checkable
class Budget(Protocol):
    """Number of slots a layer keeps at one policy step."""

    def tokens(self, view: LayerView) -> int:
        """Slots to keep for every (row, KV head) of ``view.layer`` at ``view.step``, within [1, N]."""
        ...


def _clamp(count: int, view: LayerView) -> int:
    """``count`` limited to [1, N] where N = ``view.num_slots``."""
    return max(1, min(int(count), view.num_slots))


@dataclass(frozen=True)
class RetentionRecord:
    """One entry of the runtime's retention log: what a policy kept for one layer at one step.

    Attributes:
        step: policy step of the sequence (``LayerView.step``), >= 0.
        layer: layer index (``LayerView.layer``), >= 0.
        slots_before: N, the slots the layer held at the step (kept earlier + newly arrived), >= 1.
        kept: K, the slots kept for every row and head (``KeepDecision.kept``), in [1, slots_before].
        tokens_seen: tokens the sequence had fed at the step (>= slots_before), or None when not recorded.
    """

    step: int
    layer: int
    slots_before: int
    kept: int
    tokens_seen: int | None = None

    def __post_init__(self) -> None:
        if self.step < 0 or self.layer < 0:
            raise ValueError(f"RetentionRecord step and layer must be >= 0, got step {self.step}, layer {self.layer}")
        if self.slots_before < 1:
            raise ValueError(f"RetentionRecord slots_before must be >= 1, got {self.slots_before}")
        if not 1 <= self.kept <= self.slots_before:
            raise ValueError(
                f"RetentionRecord kept must be in [1, slots_before={self.slots_before}], got {self.kept}"
            )
        if self.tokens_seen is not None and self.tokens_seen < self.slots_before:
            raise ValueError(
                f"RetentionRecord tokens_seen must be >= slots_before={self.slots_before}, got {self.tokens_seen}"
            )


@dataclass(frozen=True)
class FixedRatioBudget:
    """Keep ``ceil(ratio * seen)`` slots, where seen = ``max(view.arrival) + 1`` is the number of tokens
    the sequence has fed so far (evicted ones and left padding included).

    The product is rounded to 9 decimals before the ceiling so that, e.g., 0.35 * 20 gives 7, not 8.
    The result is clamped to [1, N]: once a layer holds fewer slots than the ratio allows, it keeps them all.

    Attributes:
        ratio: fraction of the tokens seen, in (0, 1].
    """

    ratio: float

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:  # also rejects NaN
            raise ValueError(f"FixedRatioBudget ratio must be in (0, 1], got {self.ratio}")

    def tokens(self, view: LayerView) -> int:
        return _clamp(_share(self.ratio, _seen(view)), view)


def _seen(view: LayerView) -> int:
    """Tokens the sequence has fed so far: one past the newest slot's arrival index."""
    return int(view.arrival.max().item()) + 1


def _share(ratio: float, seen: int) -> int:
    """``ceil(ratio * seen)``, the product rounded to 9 decimals first (0.35 * 20 gives 7, not 8)."""
    return math.ceil(round(ratio * seen, 9))


@dataclass(frozen=True)
class MatchedBudget:
    """Replay the slot counts a NAMM kept on the same input, per (step, layer).

    A baseline may run more steps than the NAMM did (its answer runs longer). Past a layer's last recorded step
    it keeps that step's share of the tokens seen, ``ceil(kept / tokens_seen * seen_now)`` (the share the NAMM
    held when it stopped, as :class:`FixedRatioBudget` would), and adds ``(step, layer)`` to ``extended``, which
    a program reports (:attr:`extended_steps`).

    Attributes:
        counts: ``{(step, layer): kept}`` with step, layer >= 0 and kept >= 1. The count is clamped to [1, N].
        last_shares: ``{layer: kept / tokens_seen}`` at the layer's last recorded step, in (0, 1]; a layer
            without one raises ValueError past its recorded steps, as does a missing step before them (the
            runs did not see the same input or schedule).
        extended: the (step, layer) pairs answered from ``last_shares`` so far.
    """

    counts: dict[tuple[int, int], int] = field(default_factory=dict)
    last_shares: dict[int, float] = field(default_factory=dict)
    extended: set[tuple[int, int]] = field(default_factory=set, compare=False)

    def __post_init__(self) -> None:
        if not self.counts:
            raise ValueError("MatchedBudget needs at least one (step, layer) count")
        normalised: dict[tuple[int, int], int] = {}
        for key, count in self.counts.items():
            try:
                step, layer = (operator.index(v) for v in key)
                count = operator.index(count)
            except (TypeError, ValueError):
                raise ValueError(
                    f"MatchedBudget entries must map (step, layer) int pairs to int counts, got {key!r}: {count!r}"
                ) from None
            if step < 0 or layer < 0 or count < 1:
                raise ValueError(
                    f"MatchedBudget needs step, layer >= 0 and count >= 1, got ({step}, {layer}): {count}"
                )
            normalised[(step, layer)] = count
        object.__setattr__(self, "counts", normalised)
        for layer, share in self.last_shares.items():
            if not 0.0 < share <= 1.0:
                raise ValueError(f"MatchedBudget share of layer {layer} must be in (0, 1], got {share}")
        object.__setattr__(self, "_last_step", {})
        for step, layer in normalised:
            self._last_step[layer] = max(step, self._last_step.get(layer, step))

    @property
    def extended_steps(self) -> int:
        """How many (step, layer) counts were extended past the recorded steps so far."""
        return len(self.extended)

    @classmethod
    def from_retention(cls, records: Iterable[RetentionRecord]) -> "MatchedBudget":
        """Build from a retention log (:class:`RetentionRecord`). Repeated (step, layer) entries must agree; a
        conflict raises ValueError. Each layer's share at its last step comes from records with ``tokens_seen``."""
        counts: dict[tuple[int, int], int] = {}
        shares: dict[int, tuple[int, float]] = {}
        for record in records:
            key = (record.step, record.layer)
            if key in counts and counts[key] != record.kept:
                raise ValueError(
                    f"retention log has conflicting counts for step {key[0]}, layer {key[1]}: "
                    f"{counts[key]} and {record.kept}"
                )
            counts[key] = record.kept
            if record.tokens_seen is not None and record.step >= shares.get(record.layer, (-1, 0.0))[0]:
                shares[record.layer] = (record.step, record.kept / record.tokens_seen)
        return cls(counts, {layer: share for layer, (_, share) in shares.items()})

    def tokens(self, view: LayerView) -> int:
        key = (view.step, view.layer)
        if key in self.counts:
            return _clamp(self.counts[key], view)
        if view.step <= self._last_step.get(view.layer, -1) or view.layer not in self.last_shares:
            raise ValueError(f"MatchedBudget has no recorded count for step {view.step}, layer {view.layer}")
        self.extended.add(key)
        return _clamp(_share(self.last_shares[view.layer], _seen(view)), view)

"""Hand-made KV-cache eviction rules behind the same :class:`EvictionPolicy` interface as the NAMM.

ARCHITECTURE.md ("Budgets and fair comparisons") compares the NAMM against these rules given the same
per-layer memory. Each rule keeps exactly ``budget.tokens(view)`` slots for every (row, KV head) of a layer
(the same K everywhere, as the runtime's dense cache needs, namm-spec.md §1.4), returns indices in
ascending (chronological) order, always keeps the newest slot (as NAMM does, namm-spec.md §4) and picks
padding slots (``view.attendable`` False) only when the real tokens do not fill the budget.

* :class:`H2OPolicy`: accumulated attention + a recent window (Zhang et al., 2023, "H2O: Heavy-Hitter
  Oracle for Efficient Generative Inference of Large Language Models", arXiv:2306.14048).
* :class:`L2NormPolicy`: lowest key L2 norm (Devoto et al., 2024, "A Simple and Effective L2 Norm-Based
  Strategy for KV Cache Compression", arXiv:2406.11430).
* :class:`RecencyPolicy`: attention sinks + most recent tokens (Xiao et al., 2024, "Efficient Streaming
  Language Models with Attention Sinks", StreamingLLM, arXiv:2309.17453).
* :class:`RandomPolicy`: uniform random slots, seeded.
* :class:`FullCachePolicy`: keeps everything (the full-cache reference as a policy).

All rules share one selection routine, :func:`namm_transfer.namm.selection.keep_top`. Only H2O reads attention;
the others declare so (``requirements``), and the runtime buffers no queries for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from namm_transfer.namm.budget import Budget
from namm_transfer.namm.interface import EvictionPolicy, KeepDecision, LayerView, StepRequirements
from namm_transfer.namm.selection import keep_top


def _recent_window(n: int, count: int, like: torch.Tensor) -> torch.Tensor:
    """(B, H, N) bool, True on the last ``count`` slots (the most recent tokens); ``like`` gives B, H, device."""
    window = torch.arange(n, device=like.device) >= n - count
    return window.expand(*like.shape[:2], n)


@dataclass
class H2OPolicy:
    """Heavy hitters + recent window (H2O, Zhang et al. 2023, §4 "Heavy-Hitter Oracle").

    Each cached token accumulates the attention every query paid to it: at each step the ``n_new`` recent
    queries' attention (``view.attention()``, (B, H, Q, N)) is summed over Q and added to the total carried
    from earlier steps; new tokens start at 0. The totals, (B, H, N) float32 per layer, are gathered with the
    kept indices, so they follow the surviving tokens. Each step keeps the newest slot, the
    ``floor(recent_fraction * K)`` most recent slots, and fills the rest of the budget K with the largest
    totals. As in the paper (equal heavy-hitter and recent ratios), the default splits the budget in half:
    recent = K // 2, heavy hitters = K - K // 2.

    Attributes:
        budget: slots kept per layer and step.
        recent_fraction: share of the budget reserved for the most recent slots, in [0, 1].
    """

    budget: Budget
    recent_fraction: float = 0.5
    name: ClassVar[str] = "h2o"
    _totals: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.recent_fraction <= 1.0:
            raise ValueError(f"H2OPolicy recent_fraction must be in [0, 1], got {self.recent_fraction}")

    def begin(self, batch_size: int, num_layers: int) -> None:
        """Drop the accumulated attention of the previous sequences."""
        self._totals.clear()

    def state_bytes(self) -> int:
        """Exact bytes of the accumulated attention carried for every layer now."""
        return sum(t.numel() * t.element_size() for t in self._totals.values())

    def step(self, view: LayerView) -> KeepDecision:
        b, h, n = view.arrival.shape
        attention = view.attention()
        if attention.dim() != 4 or attention.shape[:2] != (b, h) or attention.shape[-1] != n:
            raise ValueError(f"H2O needs attention of shape ({b}, {h}, Q, {n}), got {tuple(attention.shape)}")
        n_old = n - view.n_new
        if view.step == 0:
            carried = torch.zeros(b, h, n_old, dtype=torch.float32, device=attention.device)
        else:
            carried = self._totals.get(view.layer)
            if carried is None:
                raise ValueError(
                    f"H2O has no accumulated attention for layer {view.layer} at step {view.step}; "
                    "call begin() before the first step of a sequence"
                )
            if carried.shape != (b, h, n_old):
                raise ValueError(
                    f"H2O state of layer {view.layer} has shape {tuple(carried.shape)}, "
                    f"but the view holds {(b, h, n_old)} old slots"
                )
        new = torch.zeros(b, h, view.n_new, dtype=torch.float32, device=attention.device)
        totals = torch.cat([carried, new], dim=-1) + attention.float().sum(dim=2)
        k = self.budget.tokens(view)
        recent = _recent_window(n, int(self.recent_fraction * k), totals)
        decision = keep_top(totals, k, view.attendable, forced=recent)
        self._totals[view.layer] = totals.gather(-1, decision.indices)
        return decision


@dataclass
class L2NormPolicy:
    """Keep the tokens whose keys have the LOWEST L2 norm (Devoto et al. 2024: low-norm keys draw high
    attention). Stateless; reads ``view.keys`` (B, H, N, D) only, never the attention.

    Attributes:
        budget: slots kept per layer and step.
    """

    budget: Budget
    name: ClassVar[str] = "l2"
    requirements: ClassVar[StepRequirements] = StepRequirements(reads_attention=False)

    def begin(self, batch_size: int, num_layers: int) -> None:
        """Stateless: nothing to reset."""

    def step(self, view: LayerView) -> KeepDecision:
        if view.keys.dim() != 4 or view.keys.shape[:3] != view.arrival.shape:
            raise ValueError(
                f"L2 needs keys of shape {tuple(view.arrival.shape)} + (D,), got {tuple(view.keys.shape)}"
            )
        scores = -torch.linalg.vector_norm(view.keys.float(), dim=-1)
        return keep_top(scores, self.budget.tokens(view), view.attendable)


@dataclass
class RecencyPolicy:
    """StreamingLLM (Xiao et al. 2024, §3.2 "Rolling KV cache with attention sinks"): keep the first
    ``sink`` real tokens of the sequence plus the most recent ones.

    Sinks are the first ``sink`` valid slots of the cache (left padding skipped). They are never evicted while
    the budget exceeds ``sink``, so they stay the first tokens of the sequence. With a budget of ``sink`` or
    less, the newest token and then the earliest sinks are kept.

    Attributes:
        budget: slots kept per layer and step.
        sink: number of attention-sink tokens, >= 0 (4 in the paper).
    """

    budget: Budget
    sink: int = 4
    name: ClassVar[str] = "recency"
    requirements: ClassVar[StepRequirements] = StepRequirements(reads_attention=False)

    def __post_init__(self) -> None:
        if self.sink < 0:
            raise ValueError(f"RecencyPolicy sink must be >= 0, got {self.sink}")

    def begin(self, batch_size: int, num_layers: int) -> None:
        """Stateless: nothing to reset."""

    def step(self, view: LayerView) -> KeepDecision:
        sinks = view.attendable & (torch.cumsum(view.attendable.long(), dim=-1) <= self.sink)
        order = view.arrival.double()
        scores = torch.where(sinks, -order, order)
        return keep_top(scores, self.budget.tokens(view), view.attendable, forced=sinks)


@dataclass
class RandomPolicy:
    """Keep uniformly random slots (plus the newest). The draw for a view depends only on
    (``seed``, ``view.step``, ``view.layer``), mixed with ``numpy.random.SeedSequence``, so a run is
    reproducible whatever order the runtime visits the layers in, and different seeds give different sets.

    Attributes:
        budget: slots kept per layer and step.
        seed: non-negative integer seed.
    """

    budget: Budget
    seed: int = 0
    name: ClassVar[str] = "random"
    requirements: ClassVar[StepRequirements] = StepRequirements(reads_attention=False)

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"RandomPolicy seed must be >= 0, got {self.seed}")

    def begin(self, batch_size: int, num_layers: int) -> None:
        """Stateless: the draws depend on (seed, step, layer) only."""

    def step(self, view: LayerView) -> KeepDecision:
        mixed = np.random.SeedSequence([self.seed, view.step, view.layer]).generate_state(1, dtype=np.uint64)[0]
        generator = torch.Generator().manual_seed(int(mixed))
        scores = torch.rand(view.arrival.shape, generator=generator).to(view.arrival.device)
        return keep_top(scores, self.budget.tokens(view), view.attendable)


@dataclass
class FullCachePolicy:
    """Keep every slot: the full-cache reference behind the policy interface."""

    name: ClassVar[str] = "full"
    requirements: ClassVar[StepRequirements] = StepRequirements(reads_attention=False)

    def begin(self, batch_size: int, num_layers: int) -> None:
        """Stateless: nothing to reset."""

    def step(self, view: LayerView) -> KeepDecision:
        b, h, n = view.arrival.shape
        indices = torch.arange(n, device=view.arrival.device).expand(b, h, n)
        return KeepDecision(indices=indices.contiguous())


BASELINES: dict[str, type] = {
    cls.name: cls for cls in (H2OPolicy, L2NormPolicy, RecencyPolicy, RandomPolicy, FullCachePolicy)
}


def make_baseline(name: str, budget: Budget | None = None, **options) -> EvictionPolicy:
    """Build a baseline by its ``name`` ("h2o", "l2", "recency", "random", "full").

    ``options`` go to the dataclass (``sink`` for recency, ``seed`` for random, ``recent_fraction`` for h2o).
    "full" takes no budget; every other rule requires one.
    """
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(sorted(BASELINES))}")
    if name == "full":
        if budget is not None or options:
            raise ValueError("baseline 'full' keeps every slot and takes no budget or options")
        return FullCachePolicy()
    if budget is None:
        raise ValueError(f"baseline {name!r} needs a budget")
    try:
        return BASELINES[name](budget, **options)
    except TypeError as error:
        raise ValueError(f"baseline {name!r}: {error}") from None

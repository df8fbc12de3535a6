"""Fitting the NAMM's scorer by gradient to a keep target (issue 8, the warm start).

The same 4,172 BAM parameters and the same features as the evolved NAMM (namm-spec §2-§3); only the objective
differs: a weighted binary cross-entropy between the BAM score (the keep rule is score >= 0, so the score is a
logit) and a keep target (:mod:`namm_transfer.evolve.keep_target`: the oracle of future attention, a recency
window, or both). Slots the NAMM never decides (padding, protected sinks and prompt tail, the newest slot) are left
out of the loss. CMA-ES then refines the result on the task fitness.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from namm_transfer.evolve.feature_recorder import StepRecord, recorded_features
from namm_transfer.evolve.keep_target import KeepTarget
from namm_transfer.namm.config import NammConfig
from namm_transfer.namm.features import NormalisationStats
from namm_transfer.namm.scorer import bam_scores
from namm_transfer.namm.selection import protected_slots


@dataclass
class Example:
    """One (sequence, step, layer) of training data.

    Attributes:
        features: (H, N, D) fp32 token features.
        valid: (H, N) bool, attendable slots.
        target: (H, N) bool, the keep target's set.
        trained: (H, N) bool, slots the loss covers (valid, not protected, not the newest).
    """

    features: torch.Tensor
    valid: torch.Tensor
    target: torch.Tensor
    trained: torch.Tensor


@dataclass(frozen=True)
class FitConfig:
    """Settings of the gradient fit.

    Attributes:
        epochs: passes over the examples.
        learning_rate: Adam's step size.
        positive_weight: loss weight of a slot the target keeps (> 1: losing a needed token costs more than
            keeping a spare one).
        batch_examples: examples of one shape per optimiser step.
        init_sigma: standard deviation of the random initial parameters (the read-out bias starts at 0).
        seed: seed of the initial parameters and of the example order.
    """

    epochs: int = 20
    learning_rate: float = 3e-3
    positive_weight: float = 2.0
    batch_examples: int = 32
    init_sigma: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1, got {self.epochs}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            problems.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if not (math.isfinite(self.positive_weight) and self.positive_weight > 0):
            problems.append(f"positive_weight must be > 0, got {self.positive_weight}")
        if self.batch_examples < 1:
            problems.append(f"batch_examples must be >= 1, got {self.batch_examples}")
        if not (math.isfinite(self.init_sigma) and self.init_sigma >= 0):
            problems.append(f"init_sigma must be >= 0, got {self.init_sigma}")
        if problems:
            raise ValueError("invalid FitConfig: " + "; ".join(problems))


def make_examples(
    records: list[StepRecord],
    masses: dict[tuple[int, int], torch.Tensor],
    stats: NormalisationStats,
    config: NammConfig,
    prompt_length: int,
    target: KeepTarget,
) -> list[Example]:
    """Examples of one sequence: every record whose step has a future mass (``masses[(layer, tokens_seen)]``,
    :func:`~namm_transfer.evolve.oracle.future_attention`); records without one (a step after the last query)
    are skipped."""
    examples = []
    for record in records:
        mass = masses.get((record.layer, record.tokens_seen))
        if mass is None:
            continue
        if mass.shape != record.arrival.shape:
            raise ValueError(f"future mass {tuple(mass.shape)} does not match the record {tuple(record.arrival.shape)}")
        valid = record.attendable
        protected = protected_slots(record.arrival[None], valid[None], torch.tensor([prompt_length]),
                                    config.protect_sink, config.protect_prompt_tail)
        trained = valid.clone()
        trained[:, -1] = False
        if protected is not None:
            trained &= ~protected[0]
        examples.append(Example(recorded_features(record, stats, config), valid, target.labels(mass, record.arrival),
                                trained))
    return examples


def initial_params(config: NammConfig, fit: FitConfig) -> torch.Tensor:
    """(num_params,) seeded N(0, init_sigma^2) parameters with a zero read-out bias."""
    params = fit.init_sigma * torch.randn(config.num_params, generator=torch.Generator().manual_seed(fit.seed))
    params[-1] = 0.0
    return params


def _batches(examples: list[Example], size: int, generator: torch.Generator | None) -> list[list[Example]]:
    """Examples grouped by shape (they stack), in chunks of ``size``; shuffled when ``generator`` is given."""
    groups = defaultdict(list)
    for example in examples:
        groups[tuple(example.features.shape)].append(example)
    batches = []
    for group in groups.values():
        order = torch.randperm(len(group), generator=generator).tolist() if generator else range(len(group))
        ordered = [group[i] for i in order]
        batches.extend(ordered[i:i + size] for i in range(0, len(ordered), size))
    if generator is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def _scores(params: torch.Tensor, batch: list[Example], config: NammConfig) -> torch.Tensor:
    features = torch.stack([e.features for e in batch])
    valid = torch.stack([e.valid for e in batch])
    member = torch.zeros(len(batch), dtype=torch.int64)
    return bam_scores(features, params, member, config, valid)


def _loss(scores: torch.Tensor, batch: list[Example], positive_weight: float) -> tuple[torch.Tensor, int]:
    """Sum of the weighted BCE over the batch's trained slots, and their count."""
    target = torch.stack([e.target for e in batch])
    trained = torch.stack([e.trained for e in batch])
    weight = torch.where(target, positive_weight, 1.0) * trained
    loss = F.binary_cross_entropy_with_logits(scores, target.float(), weight=weight, reduction="sum")
    return loss, int(trained.sum())


def evaluate(params: torch.Tensor, examples: list[Example], config: NammConfig, fit: FitConfig) -> dict[str, float]:
    """How well ``params`` reproduce the target on ``examples``: the mean loss per trained slot, and the keep rule
    (score >= 0) against the target over trained slots: precision, recall, and the kept shares of both."""
    loss_sum, count, agree = 0.0, 0, torch.zeros(4)  # kept&needed, kept, needed, trained
    with torch.no_grad():
        for batch in _batches(examples, fit.batch_examples, None):
            scores = _scores(params, batch, config)
            loss, slots = _loss(scores, batch, fit.positive_weight)
            loss_sum, count = loss_sum + float(loss), count + slots
            trained = torch.stack([e.trained for e in batch])
            target = torch.stack([e.target for e in batch]) & trained
            kept = (scores >= 0) & trained
            agree += torch.tensor([(kept & target).sum(), kept.sum(), target.sum(), trained.sum()], dtype=torch.float)
    both, kept, needed, trained = agree.tolist()
    return {
        "loss": loss_sum / max(count, 1),
        "precision": both / kept if kept else float("nan"),
        "recall": both / needed if needed else float("nan"),
        "kept_share": kept / max(trained, 1),
        "target_share": needed / max(trained, 1),
    }


def fit_scorer(
    examples: list[Example],
    config: NammConfig,
    fit: FitConfig,
    init: torch.Tensor | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """Adam on the flat BAM parameters against the keep target.

    Args:
        examples: training data (:func:`make_examples`).
        init: (num_params,) starting point; default :func:`initial_params`.

    Returns:
        The fitted (num_params,) fp32 parameters and one record per epoch (``epoch``, ``train_loss``).
    """
    if not examples:
        raise ValueError("fit_scorer needs at least one example")
    params = (initial_params(config, fit) if init is None else init.detach().float().clone()).requires_grad_(True)
    optimiser = torch.optim.Adam([params], lr=fit.learning_rate)
    generator = torch.Generator().manual_seed(fit.seed)
    history = []
    for epoch in tqdm(range(fit.epochs), desc="fit", unit="epoch", disable=not progress):
        total, count = 0.0, 0
        for batch in _batches(examples, fit.batch_examples, generator):
            loss, slots = _loss(_scores(params, batch, config), batch, fit.positive_weight)
            optimiser.zero_grad()
            (loss / max(slots, 1)).backward()
            optimiser.step()
            total, count = total + loss.item(), count + slots
        history.append({"epoch": epoch, "train_loss": total / max(count, 1)})
    return params.detach(), history

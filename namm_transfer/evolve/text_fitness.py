"""The fitness of NAMM population members on the built-in long-context text tasks (docs/algorithm.md §5.2).

Every generation, ``prompts_per_task`` train items per task of the stage are drawn from a fixed pool
(deterministically from the generation number, so every rank and every resume draws the same prompts), and
every member answers the same prompts. Two scores (``TextFitnessConfig.score``):

* ``answer`` (the paper's): the member's greedy answer scored by the task metric; per task, the mean over the
  prompts divided by the full-cache mean of the same prompts (computed once per item, cached in the run folder's
  ``references.jsonl``, which survives a cut last line), so 1.0 means full-cache parity. The pool then holds only
  items the base model answers with the full cache: with the handful of prompts a CPU run affords, a task whose
  drawn prompts all have reference 0 would divide by 1e-7 and hand a lucky member a huge fitness.
* ``likelihood`` (dense, issue 8; field-notes §8): the reference answer's mean log-probability per token under the
  member minus under the full cache (:mod:`namm_transfer.answer_likelihood`), one teacher-forced pass per prompt,
  0 meaning no loss; no 0/1 luck, so every pool item counts.

Fitness is the mean over tasks of the mean over prompts, minus ``memory_weight`` x max(0, retained KV share -
``memory_target``): memory as a target, penalised only above the share you choose (target 0 gives the linear term
the official code has but does not use, §7 "Auxiliary losses"). Each member's score on two disjoint halves of the
prompts is logged as ``half_a``/``half_b`` for the signal measure (:mod:`namm_transfer.evolve.signal`).

Members run batched: one forward holds ``members_per_batch`` rows of the same prompt, each row scored by its
own parameter vector (§5.5), with per-row eviction counts (padding slots masked).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from namm_transfer.answer_likelihood import ANSWER_TOKENS, answer_likelihood
from namm_transfer.evals.text_tasks import TASKS, TextItem, make_item, token_counter
from namm_transfer.evolve.loop import FitnessResult, Stage
from namm_transfer.jsonl import JsonlFile
from namm_transfer.namm.config import NammConfig
from namm_transfer.namm.features import NormalisationStats, StatsAccumulator
from namm_transfer.namm.policy import NammPolicy
from namm_transfer.text_eval import TextGenerator

_REFERENCE_EPSILON = 1e-7  # docs/algorithm.md §5.2
_MAX_CANDIDATES = 4  # train items tried per pool slot
SCORES = ("answer", "likelihood")
REFERENCES_NAME = "references.jsonl"


@dataclass(frozen=True)
class TextFitnessConfig:
    """Prompts a generation draws and how members are batched.

    Attributes:
        prompts_per_task: prompts per task and generation (64 in the paper; small on CPU).
        pool_size: train items per task to draw from (seeds 0 .. pool_size-1).
        length: prompt length in tokens.
        depths: needle depths the pool cycles through.
        members_per_batch: population members answering one prompt in one forward.
        memory_weight: weight of the retained-KV penalty (0 = the paper's fitness).
        memory_target: retained KV share below which memory costs nothing.
        score: "answer" (task metric of the greedy answer) or "likelihood" (dense; see the module docstring).
        answer_tokens: reference answer tokens the likelihood scores.
        seed: seed of the per-generation prompt draw.
    """

    prompts_per_task: int = 4
    pool_size: int = 32
    length: int = 1024
    depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    members_per_batch: int = 8
    memory_weight: float = 0.0
    memory_target: float = 0.0
    score: str = "answer"
    answer_tokens: int = ANSWER_TOKENS
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.prompts_per_task <= self.pool_size:
            problems.append(f"prompts_per_task must be in [1, pool_size={self.pool_size}], got {self.prompts_per_task}")
        if self.length < 64:
            problems.append(f"length must be >= 64 tokens, got {self.length}")
        if not self.depths or not all(0.0 <= d <= 1.0 for d in self.depths):
            problems.append(f"depths must be a non-empty list in [0, 1], got {self.depths}")
        if self.members_per_batch < 1:
            problems.append(f"members_per_batch must be >= 1, got {self.members_per_batch}")
        if self.memory_weight < 0:
            problems.append(f"memory_weight must be >= 0, got {self.memory_weight}")
        if not 0.0 <= self.memory_target <= 1.0:
            problems.append(f"memory_target must be in [0, 1], got {self.memory_target}")
        if self.score not in SCORES:
            problems.append(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.answer_tokens < 1:
            problems.append(f"answer_tokens must be >= 1, got {self.answer_tokens}")
        if problems:
            raise ValueError("invalid TextFitnessConfig: " + "; ".join(problems))


def frozen_stats(statistics: dict[str, np.ndarray], device: torch.device | str = "cpu") -> NormalisationStats:
    """The run's frozen statistics (``{"norm_mean": (17,), "norm_var": (17,)}``) as fp32 tensors on ``device``."""
    return NormalisationStats(torch.as_tensor(statistics["norm_mean"], dtype=torch.float32, device=device),
                              torch.as_tensor(statistics["norm_var"], dtype=torch.float32, device=device))


class TextFitness:
    """Callable fitness for :func:`namm_transfer.evolve.loop.evolve`.

    Args:
        generator: answers prompts with the base model (its cache config sets the NAMM period).
        namm_config: the NAMM's feature/selection settings.
        config: prompt sampling and batching.
        cache_dir: where the full-cache references are stored (``references.jsonl``), or None.
    """

    def __init__(
        self, generator: TextGenerator, namm_config: NammConfig, config: TextFitnessConfig, cache_dir: Path | None
    ) -> None:
        self.generator = generator
        self.namm_config = namm_config
        self.config = config
        self._count = token_counter(generator.tokenizer)
        self._pool: dict[str, list[TextItem]] = {}
        self._references_file = None if cache_dir is None else JsonlFile(Path(cache_dir) / REFERENCES_NAME, "item_id")
        self._references: dict[str, float] = {}
        if self._references_file is not None:
            for record in self._references_file.records():
                if not isinstance(record.get("score"), (int, float)):
                    raise ValueError(f"{self._references_file.path}: the record of {record['item_id']!r} has no numeric score")
                self._references[record["item_id"]] = record["score"]

    def pool(self, task: str) -> list[TextItem]:
        """The first ``pool_size`` train items of ``task`` (seeds 0, 1, ...); with the ``answer`` score only those the
        full cache answers. Built once. Raises ValueError if fewer than ``pool_size`` of ``_MAX_CANDIDATES x
        pool_size`` qualify."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
        if task not in self._pool:
            c = self.config
            pool, candidates = [], c.pool_size * _MAX_CANDIDATES
            for seed in range(candidates):
                item = make_item(task, seed, c.length, c.depths[seed % len(c.depths)], self._count, "train")
                if self.config.score == "likelihood" or self.reference(item) > 0:
                    pool.append(item)
                    if len(pool) == c.pool_size:
                        break
            if len(pool) < c.pool_size:
                raise ValueError(
                    f"task {task!r}: the base model answers only {len(pool)} of {candidates} train items at "
                    f"{c.length} tokens with the full cache; drop the task or lower --pool-size"
                )
            self._pool[task] = pool
        return self._pool[task]

    def prompts(self, task: str, generation: int) -> list[TextItem]:
        """The prompts of ``task`` at ``generation``: drawn without replacement, the same on every rank."""
        rng = np.random.default_rng([self.config.seed, generation, TASKS.index(task)])
        chosen = rng.choice(self.config.pool_size, size=self.config.prompts_per_task, replace=False)
        pool = self.pool(task)
        return [pool[i] for i in sorted(chosen)]

    def reference(self, item: TextItem) -> float:
        """Full-cache score of ``item`` (task metric, or mean answer log-probability for the ``likelihood``
        score), computed once, then read from the cache file."""
        if item.item_id not in self._references:
            if self.config.score == "likelihood":
                score = answer_likelihood(self.generator, item, None, max_tokens=self.config.answer_tokens).mean_log_prob[0]
            else:
                score = item.score(self.generator.run(item, None).predictions[0])
            self._references[item.item_id] = score
            if self._references_file is not None:
                self._references_file.append({"item_id": item.item_id, "score": score})
        return self._references[item.item_id]

    def estimate_statistics(self, tasks: Sequence[str]) -> dict[str, np.ndarray]:
        """Normalisation statistics of the spectrogram features with no eviction (docs/algorithm.md §2.4, §5.6),
        over the generation-0 prompts of ``tasks``: ``{"norm_mean": (17,), "norm_var": (17,)}``."""
        accumulator = StatsAccumulator(self.namm_config.spectrogram_bins)
        policy = NammPolicy(self.namm_config, accumulator=accumulator)
        for task in tasks:
            for item in self.prompts(task, 0):
                self.generator.run(item, policy)
        stats = accumulator.freeze()
        return {"norm_mean": stats.mean.cpu().numpy(), "norm_var": stats.var.cpu().numpy()}

    def _member_scores(self, item: TextItem, policy: NammPolicy, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(K,) raw scores of the members on ``item`` and (K,) retained KV shares, members batched."""
        device = self.generator.device
        scores, retained = np.zeros(count), np.zeros(count)
        for start in range(0, count, self.config.members_per_batch):
            stop = min(start + self.config.members_per_batch, count)
            policy.set_members(torch.arange(start, stop, device=device))
            if self.config.score == "likelihood":
                run = answer_likelihood(self.generator, item, policy, rows=stop - start,
                                        max_tokens=self.config.answer_tokens)
                scores[start:stop] = np.asarray(run.mean_log_prob) - self.reference(item)
            else:
                run = self.generator.run(item, policy, rows=stop - start)
                scores[start:stop] = [item.score(p) for p in run.predictions]
            retained[start:stop] = run.kv_retained
        return scores, retained

    def __call__(
        self, members: np.ndarray, generation: int, stage: Stage, statistics: dict[str, np.ndarray] | None
    ) -> FitnessResult:
        """Fitness of ``members`` (K, num_params) on the stage's tasks at ``generation``."""
        if statistics is None:
            raise ValueError("the text fitness needs frozen normalisation statistics")
        device = self.generator.device
        stats = frozen_stats(statistics, device)
        params = torch.as_tensor(members, dtype=torch.float32, device=device)
        policy = NammPolicy(self.namm_config, params, stats)
        count = members.shape[0]
        per_task, raw, per_prompt, retained = [], [], [], []
        for task in stage.tasks:
            items = self.prompts(task, generation)
            scale = 1.0
            if self.config.score == "answer":  # the task's full-cache mean: 1.0 = parity (docs/algorithm.md §5.2)
                scale = 1.0 / (np.mean([self.reference(item) for item in items]) + _REFERENCE_EPSILON)
            task_scores = []
            for item in items:
                scores, kept = self._member_scores(item, policy, count)
                raw.append(scores)
                task_scores.append(scale * scores)
                retained.append(kept)
            per_prompt.extend(task_scores)
            per_task.append(np.mean(task_scores, axis=0))
        kv_retained = np.mean(retained, axis=0)
        penalty = self.config.memory_weight * np.maximum(0.0, kv_retained - self.config.memory_target)
        fitness = np.mean(per_task, axis=0) - penalty
        extra = {"kv_retained": kv_retained, "score": np.mean(raw, axis=0)}
        if len(per_prompt) >= 2:  # prompts alternate between the halves, task by task
            extra["half_a"] = np.mean(per_prompt[0::2], axis=0)
            extra["half_b"] = np.mean(per_prompt[1::2], axis=0)
        return FitnessResult(fitness=fitness, extra=extra)

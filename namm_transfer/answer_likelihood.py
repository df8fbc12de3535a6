"""The dense score of an eviction policy on one text item: how likely the reference answer stays under eviction.

One teacher-forced pass (:meth:`~namm_transfer.runtime.runner.EvictingRunner.score_continuation`) of the prompt
followed by the first ``max_tokens`` tokens of the reference answer gives the mean log-probability per answer token.
Unlike the 0/1 answer score it has no threshold luck, so a handful of prompts already ranks policies (field-notes §8;
issue 8): the evolution's ``likelihood`` fitness and the text evaluation's dense column both read it, as the
difference from the full cache on the same item.

The answer is tokenised as the continuation of the prompt the model sees (after the chat template's assistant
header when the tokenizer has one), without special tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from namm_transfer.evals.text_tasks import TextItem
from namm_transfer.namm.budget import RetentionRecord
from namm_transfer.namm.interface import EvictionPolicy
from namm_transfer.runtime.runner import EvictingRunner
from namm_transfer.text_eval import TextGenerator, kept_share

ANSWER_TOKENS = 24
"""Reference answer tokens scored by default (field-notes §8 scored the first 24)."""


@dataclass
class AnswerLikelihood:
    """The reference answer's likelihood under one policy, for B rows answering the same item.

    Attributes:
        mean_log_prob: (B,) mean log-probability per scored answer token (<= 0; 0 = certain).
        answer_tokens: how many answer tokens were scored (T).
        kv_retained: (B,) visible KV slots at the end / (managed layers x tokens seen) per row.
        total_bytes_peak: largest K/V + policy bytes held at any time (all rows).
        retention: the runtime's retention log (step, layer, slots before, kept), for matched budgets.
    """

    mean_log_prob: list[float]
    answer_tokens: int
    kv_retained: list[float]
    total_bytes_peak: int
    retention: list[RetentionRecord]


def answer_ids(generator: TextGenerator, item: TextItem, max_tokens: int = ANSWER_TOKENS) -> torch.Tensor:
    """(T,) int64 ids of the first ``max_tokens`` tokens of ``item.answers[0]`` (T >= 1)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    ids = generator.tokenizer(item.answers[0], add_special_tokens=False)["input_ids"][:max_tokens]
    if not ids:
        raise ValueError(f"item {item.item_id!r}: its reference answer {item.answers[0]!r} has no tokens")
    return torch.tensor(ids, dtype=torch.long)


def answer_likelihood(
    generator: TextGenerator,
    item: TextItem,
    policy: EvictionPolicy | None,
    rows: int = 1,
    max_tokens: int = ANSWER_TOKENS,
) -> AnswerLikelihood:
    """Teacher-forced likelihood of ``item``'s reference answer for ``rows`` identical rows under ``policy``
    (None = full cache); several rows serve a NAMM population, one member per row (docs/algorithm.md §5.5)."""
    prompt = generator.encode(item.prompt).expand(rows, -1).contiguous()
    continuation = answer_ids(generator, item, max_tokens)
    runner = EvictingRunner(generator.adapter, generator.model, policy, generator.runner_config)
    scored = runner.score_continuation(prompt, continuation)
    return AnswerLikelihood(
        mean_log_prob=scored.log_probs.mean(dim=1).tolist(),
        answer_tokens=continuation.numel(),
        kv_retained=kept_share(scored.visible_per_layer, runner.geometry.managed_layers, scored.tokens_seen),
        total_bytes_peak=scored.total_bytes_peak,
        retention=scored.retention,
    )

"""Validation of a NAMM on items it was never trained on: the dense score and the KV it keeps (issue 8).

The score of an item is the difference between the reference answer's mean log-probability per token under the
NAMM and under the full cache (:mod:`namm_transfer.answer_likelihood`): 0 means no loss, negative means the
eviction made the answer less likely. Validation items are train-split items with seeds from
:data:`VALIDATION_SEED` on, so they share no seed with an evolution pool or a warm-start set (which draw from 0)
nor with the held-out suite (a separate split). Full-cache references are computed once per item and kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from namm_transfer.answer_likelihood import ANSWER_TOKENS, answer_likelihood
from namm_transfer.evals.text_tasks import TextItem, make_item, token_counter
from namm_transfer.namm.config import NammConfig
from namm_transfer.namm.features import NormalisationStats
from namm_transfer.namm.policy import NammPolicy
from namm_transfer.text_eval import TextGenerator

VALIDATION_SEED = 500_000
"""First train-split seed of the validation items."""


def validation_items(generator: TextGenerator, tasks, per_task: int, length: int, depths) -> list[TextItem]:
    """``per_task`` validation items per task, depths cycling through ``depths``."""
    count = token_counter(generator.tokenizer)
    return [make_item(task, VALIDATION_SEED + i, length, depths[i % len(depths)], count, "train")
            for task in tasks for i in range(per_task)]


@dataclass
class Validator:
    """Scores parameter vectors on fixed validation items.

    Attributes:
        generator: the base model.
        items: the validation items.
        answer_tokens: answer tokens scored per item.
        references: item id -> the full cache's mean log-probability (filled on first use).
    """

    generator: TextGenerator
    items: list[TextItem]
    answer_tokens: int = ANSWER_TOKENS
    references: dict[str, float] = field(default_factory=dict)

    def reference(self, item: TextItem) -> float:
        if item.item_id not in self.references:
            full = answer_likelihood(self.generator, item, None, max_tokens=self.answer_tokens)
            self.references[item.item_id] = full.mean_log_prob[0]
        return self.references[item.item_id]

    def __call__(self, params: np.ndarray | torch.Tensor, stats: NormalisationStats, config: NammConfig,
                 keep_bias: float = 0.0) -> dict:
        """``{"dense": mean difference from the full cache, "kv_retained": mean share kept, "per_item": [...]}``
        for one parameter vector (num_params,)."""
        params = torch.as_tensor(np.asarray(params), dtype=torch.float32)
        policy = NammPolicy(config, params, stats, keep_bias=keep_bias)
        per_item = []
        for item in self.items:
            run = answer_likelihood(self.generator, item, policy, max_tokens=self.answer_tokens)
            per_item.append({"item_id": item.item_id, "dense": run.mean_log_prob[0] - self.reference(item),
                             "kv_retained": run.kv_retained[0]})
        return {"dense": float(np.mean([r["dense"] for r in per_item])),
                "kv_retained": float(np.mean([r["kv_retained"] for r in per_item])), "per_item": per_item}

"""How much answer likelihood an eviction policy can keep at all on SmolLM2 at 1,024 tokens: a future-attention
oracle against recency and H2O at the same per-layer budget, on the 20 validation items of the NAMM screenings
(train-split seeds 500,000+, 4 per task, depths 0.1-0.9; `sweep_baselines.py`).

The oracle is issue 8's warm-start target (:mod:`namm_transfer.evolve.oracle`) used as a policy: at each step it
keeps, per layer and KV head, the budget's tokens with the most future attention, read from one eager full-cache pass
of prompt + reference answer, so it sees the question and the answer before they arrive. ``answer_weight`` 1 weighs
the later prompt queries and the answer's queries equally (what the warm start imitated); 1000 is the answer's
queries alone. Dense score = the reference answer's mean log-probability per token (first 24 tokens) minus the full
cache's, per item; means with bootstrap 95% intervals, and each oracle paired with recency on the same items.
Run from the repository root (about 35 min on one thread):
``OMP_NUM_THREADS=1 python docs/results/text-namm-training/oracle_ceiling.py >
docs/results/text-namm-training/oracle_ceiling.json`` (the first argument, when given, limits the run to the first
N items).
"""

import json
import sys
from dataclasses import dataclass
from typing import ClassVar

import torch

from namm_transfer.answer_likelihood import answer_ids, answer_likelihood
from namm_transfer.evals.stats import mean_interval, paired_difference
from namm_transfer.evolve.oracle import future_attention
from namm_transfer.evolve.validation import validation_items
from namm_transfer.models import load_model
from namm_transfer.namm.baselines import make_baseline
from namm_transfer.namm.budget import Budget, FixedRatioBudget
from namm_transfer.namm.interface import KeepDecision, LayerView, StepRequirements
from namm_transfer.namm.selection import keep_top
from namm_transfer.runtime.cache import CacheConfig
from namm_transfer.text_eval import TextGenerator

TASKS = ("passkey", "multikey_needle", "kv_retrieval", "variable_tracking", "two_hop")
RATIOS, ANSWER_WEIGHTS = (0.2, 0.5), (1.0, 1000.0)


@dataclass
class FutureAttentionPolicy:
    """Keep the budget's tokens with the most future attention (``masses``: ``{(layer, tokens seen): (H_kv, seen)}``
    from :func:`future_attention`); a step the masses do not cover raises KeyError (another schedule)."""

    masses: dict
    budget: Budget
    name: ClassVar[str] = "oracle"
    requirements: ClassVar[StepRequirements] = StepRequirements(reads_attention=False)

    def begin(self, batch_size: int, num_layers: int) -> None:
        """The masses belong to one item: nothing to reset."""

    def step(self, view: LayerView) -> KeepDecision:
        mass = self.masses[(view.layer, int(view.arrival.max()) + 1)]  # (H, seen)
        scores = mass[None].gather(-1, view.arrival.long())  # (1, H, N)
        return keep_top(scores, self.budget.tokens(view), view.attendable)


def main(first_items: int | None = None) -> dict:
    """The report over the 20 items, or over the first ``first_items`` of them (a quick check)."""
    torch.set_num_threads(1)
    loaded = load_model("smollm2")
    generator = TextGenerator(loaded.model, loaded.tokenizer, CacheConfig(update_every=256))
    items = validation_items(generator, TASKS, 4, 1024, (0.1, 0.3, 0.5, 0.7, 0.9))[:first_items]
    dense, kept = {}, {}
    for number, item in enumerate(items):
        reference = answer_likelihood(generator, item, make_baseline("full"))  # = the full cache; logs the steps
        full = reference.mean_log_prob[0]
        ends = sorted({r.tokens_seen for r in reference.retention})
        layers = sorted({r.layer for r in reference.retention})
        prompt = generator.encode(item.prompt).to(generator.device)
        sequence = torch.cat([prompt, answer_ids(generator, item)[None].to(generator.device)], dim=1)
        masses = {weight: future_attention(generator.model, sequence, prompt.shape[1], ends, layers, weight)
                  for weight in ANSWER_WEIGHTS}
        for ratio in RATIOS:
            runs = {f"{rule}@{ratio}": make_baseline(rule, FixedRatioBudget(ratio)) for rule in ("recency", "h2o")}
            for weight in ANSWER_WEIGHTS:
                runs[f"oracle(w={weight:g})@{ratio}"] = FutureAttentionPolicy(masses[weight], FixedRatioBudget(ratio))
            for label, policy in runs.items():
                result = answer_likelihood(generator, item, policy)
                dense.setdefault(label, {})[item.item_id] = result.mean_log_prob[0] - full
                kept.setdefault(label, []).append(result.kv_retained[0])
        print(f"{number + 1}/{len(items)} {item.item_id}", file=sys.stderr, flush=True)
    report = {"items": len(items), "methods": {}}
    for label, by_item in dense.items():
        entry = {"dense_minus_full": mean_interval(list(by_item.values())),
                 "kv_retained": sum(kept[label]) / len(kept[label])}
        if label.startswith("oracle"):
            ratio = label.rsplit("@", 1)[1]
            entry["minus_recency"] = paired_difference(by_item, dense[f"recency@{ratio}"])
        report["methods"][label] = entry
    return report


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else None), indent=1))

"""Each given NAMM against recency at exactly its budget, on the 20 validation items of the NAMM screenings
(train-split seeds 500,000+, 4 per task over the five tasks, 1,024 tokens, depths 0.1-0.9; `sweep_baselines.py`).

Recency replays the per-(step, layer) counts the NAMM kept on the same item (the text program's ``matched`` budget,
:class:`~namm_transfer.namm.budget.MatchedBudget`). Dense score = the reference answer's mean log-probability per
token (first 24 tokens) minus the full cache's, per item; means with bootstrap 95% intervals, NAMM minus recency
paired on the same items. Run from the repository root (about 2 min per NAMM with two threads):
``python docs/results/text-namm-training/namm_vs_matched_recency.py NAMM [NAMM...] > OUT.json``.
"""

import json
import sys

from namm_transfer.answer_likelihood import answer_likelihood
from namm_transfer.evals.stats import mean_interval, paired_difference
from namm_transfer.evolve.validation import validation_items
from namm_transfer.methods import cache_config_for, load_namm_option, namm_policy
from namm_transfer.models import load_model
from namm_transfer.namm.baselines import make_baseline
from namm_transfer.namm.budget import MatchedBudget
from namm_transfer.text_eval import TextGenerator

TASKS = ("passkey", "multikey_needle", "kv_retrieval", "variable_tracking", "two_hop")


def main(namm_paths: list[str]) -> dict:
    loaded = load_model("smollm2")
    report = {"items": None, "namms": {}}
    full_cache = {}  # (cache config, item id) -> the full cache's log-prob, shared by NAMMs on the same schedule
    for path in namm_paths:
        weights = load_namm_option(path)
        generator = TextGenerator(loaded.model, loaded.tokenizer, cache_config_for(weights.config))
        items = validation_items(generator, TASKS, 4, 1024, (0.1, 0.3, 0.5, 0.7, 0.9))
        report["items"] = [item.item_id for item in items]
        dense = {"namm": {}, "recency": {}}
        kept = {"namm": [], "recency": []}
        for number, item in enumerate(items):
            key = (generator.runner_config.cache, item.item_id)
            if key not in full_cache:
                full_cache[key] = answer_likelihood(generator, item, None).mean_log_prob[0]
            full = full_cache[key]
            namm = answer_likelihood(generator, item, namm_policy(weights))
            recency = answer_likelihood(generator, item,
                                        make_baseline("recency", MatchedBudget.from_retention(namm.retention)))
            for label, result in (("namm", namm), ("recency", recency)):
                dense[label][item.item_id] = result.mean_log_prob[0] - full
                kept[label].append(result.kv_retained[0])
            print(f"{path} {number + 1}/{len(items)} {item.item_id}", file=sys.stderr, flush=True)
        report["namms"][path] = {
            **{label: {"dense_minus_full": mean_interval(list(by_item.values())),
                       "kv_retained": sum(kept[label]) / len(kept[label])} for label, by_item in dense.items()},
            "namm_minus_recency": paired_difference(dense["namm"], dense["recency"]),
        }
    return report


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: namm_vs_matched_recency.py NAMM [NAMM...]")
    print(json.dumps(main(sys.argv[1:]), indent=1))

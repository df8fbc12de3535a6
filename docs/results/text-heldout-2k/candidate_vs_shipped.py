"""A candidate NAMM against the shipped one on the held-out 2k prompts they share (issue 8, Build 7's choice).

The candidate's run (``python -m namm_transfer.text ... --namm CANDIDATE --methods namm,recency --out CAND_DIR``)
holds the candidate and recency at its matched budget; the keep-bias Pareto run (README "Keep-bias Pareto at 2,048
tokens", ``SHIPPED_DIR``) holds the full cache, the shipped NAMM at keep biases -0.5, 0 and +0.25 and recency at
the shipped NAMM's budgets (+0.25 and -0.5; the bias-0 recency items were lost with a machine change). Every method
is restricted to the items all of them finished. Reported: score (0-100) and the reference answer's log-probability
per token, mean with bootstrap 95% interval, KV kept and memory, as the text program summarises a method
(:func:`~namm_transfer.text_summary.summarise`), plus the mean peak total memory (K/V + policy state) against the
full cache's; and the candidate minus each other method, paired on items.

Run: python docs/results/text-heldout-2k/candidate_vs_shipped.py CAND_DIR SHIPPED_DIR > OUT.json
"""

import json
import sys
from pathlib import Path

from namm_transfer.evals.stats import paired_difference
from namm_transfer.jsonl import JsonlFile
from namm_transfer.methods import MATCHED, Method
from namm_transfer.text_summary import DENSE, summarise

PREFIX = "builtin-heldout-L2048__smollm2__"
SHIPPED_RUNS = {"full": ("full__full", Method("full")),
                "shipped namm@-0.5": ("namm__bias_m0.5", Method("namm", keep_bias=-0.5)),
                "shipped namm": ("namm__full", Method("namm")),
                "shipped namm@+0.25": ("namm__bias_p0.25", Method("namm", keep_bias=0.25)),
                "recency@matched-0.5": ("recency__matched_m0.5", Method("recency", MATCHED, -0.5)),
                "recency@matched+0.25": ("recency__matched_p0.25", Method("recency", MATCHED, 0.25))}
CANDIDATE_RUNS = {"candidate namm": ("namm__full", Method("namm")),
                  "recency@matched to the candidate": ("recency__matched", Method("recency", MATCHED))}


def records(folder: Path) -> dict[str, dict]:
    """``{item_id: record}`` of a run folder's ``predictions.jsonl``."""
    return {r["item_id"]: r for r in JsonlFile(folder / "predictions.jsonl").records()}


def main(candidate_dir: Path, shipped_dir: Path) -> dict:
    runs = {label: (records(candidate_dir / (PREFIX + name)), method)
            for label, (name, method) in CANDIDATE_RUNS.items()}
    runs |= {label: (records(shipped_dir / (PREFIX + name)), method)
             for label, (name, method) in SHIPPED_RUNS.items()}
    items = sorted(set.intersection(*(set(by_item) for by_item, _ in runs.values())))
    if not items:
        raise SystemExit("the runs share no finished item")
    methods = {label: summarise(method, [by_item[i] for i in items]) for label, (by_item, method) in runs.items()}
    for row in methods.values():
        row["total_memory_vs_full"] = row["total_bytes_peak"] / methods["full"]["total_bytes_peak"]
    score = {label: {i: 100 * by_item[i]["score"] for i in items} for label, (by_item, _) in runs.items()}
    logprob = {label: {i: by_item[i][DENSE] for i in items} for label, (by_item, _) in runs.items()}
    candidate = "candidate namm"
    paired = {f"{candidate} - {label}": {"score": paired_difference(score[candidate], score[label]),
                                         DENSE: paired_difference(logprob[candidate], logprob[label])}
              for label in runs if label != candidate}
    return {"items": items, "methods": methods, "paired": paired}


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: candidate_vs_shipped.py CAND_DIR SHIPPED_DIR")
    print(json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2])), indent=1))

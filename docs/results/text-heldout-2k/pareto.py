"""The text keep-bias Pareto from several summaries of `python -m namm_transfer.text` on the same 100 held-out
prompts: one summary per keep bias (each with the NAMM at that bias and its matched baselines), merged into one
table, one paired-difference table and the Pareto plots (score and answer log-probability against total memory),
drawn by the program's own report.

Why merge: the bias-0 baselines were measured by the first 2k run (`summary.json`, whose per-item results were lost
with a machine change; its full cache, NAMM and H2O were rerun and reproduce it), the others by the keep-bias run,
one summary per bias. A method that appears in several summaries must agree on items, score and KV kept to 0.01
points (runs with 1 and 2 threads differ in the last float digits), else this script stops; its first row is used.

Run: python docs/results/text-heldout-2k/pareto.py OUT_DIR SUMMARY.json [SUMMARY.json ...]
(writes OUT_DIR/summary_pareto.json, score_vs_memory.png, logprob_vs_memory.png, score_vs_kv.png,
retention_per_layer.png)
"""

import json
import sys
from pathlib import Path

from namm_transfer.text import report


def merge(summaries: list[dict]) -> tuple[list[dict], list[dict]]:
    """Method rows and paired rows of every summary, each method and comparison once, in first-seen order."""
    rows: dict[str, dict] = {}
    paired: dict[str, dict] = {}
    for summary in summaries:
        for row in summary["methods"]:
            seen = rows.setdefault(row["method"], row)
            for key in ("items", "score", "kv_retained_pct"):
                if abs(seen[key] - row[key]) > 0.01:
                    sys.exit(f"error: {row['method']} differs between summaries in {key}: {seen[key]} vs {row[key]}")
        for pair in summary["paired"]:
            paired.setdefault(pair["comparison"], pair)
    return list(rows.values()), list(paired.values())


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit("usage: pareto.py OUT_DIR SUMMARY.json [SUMMARY.json ...]")
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    summaries = [json.loads(Path(name).read_text()) for name in sys.argv[2:]]
    rows, paired = merge(summaries)
    dataset, model = summaries[0]["dataset"], summaries[0]["model"]
    (out / "summary_pareto.json").write_text(
        json.dumps({"dataset": dataset, "model": model, "methods": rows, "paired": paired,
                    "merged_from": sys.argv[2:]}, indent=2) + "\n")
    report(rows, paired, out, f"{dataset} / {model}")


if __name__ == "__main__":
    main()

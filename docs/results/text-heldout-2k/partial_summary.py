"""Summary of a text-evaluation results folder that is still running, with the program's own metrics and paired
differences (namm_transfer.text_summary), in two blocks that each stay paired: ``finished`` (the methods that have
finished as many items as the method with the most, over those items) and ``common`` (every method present, over
the items all of them have finished).

    python docs/results/text-heldout-2k/partial_summary.py results/text-heldout-2k > partial_summary.json
"""

import json
import sys
from pathlib import Path

from namm_transfer.methods import MATCHED, Method
from namm_transfer.text_summary import paired_differences, summarise


def method_of(label: str) -> Method:
    """``full``, ``namm``, ``h2o@matched`` or ``h2o@0.25`` (keep bias 0) as a Method."""
    rule, _, budget = label.partition("@")
    if not budget:
        return Method(rule)
    return Method(rule, MATCHED if budget == MATCHED else float(budget))


def main(folder: str) -> None:
    records = {}
    for run in sorted(Path(folder).iterdir()):
        if (run / "predictions.jsonl").is_file():
            label = json.loads((run / "config.json").read_text())["method"]
            lines = (run / "predictions.jsonl").read_text().splitlines()
            records[method_of(label)] = [json.loads(line) for line in lines if line.strip()]
    most = max(len(rs) for rs in records.values())
    finished = {m: rs for m, rs in records.items() if len(rs) == most}
    print(json.dumps({"finished": block(finished), "common": block(records)}, indent=2))


def block(records: dict) -> dict:
    """Metrics and paired differences of ``records``' methods over the items all of them have."""
    common = set.intersection(*({r["item_id"] for r in rs} for rs in records.values()))
    kept = {m: [r for r in rs if r["item_id"] in common] for m, rs in records.items()}
    return {"items": len(common), "methods": [summarise(m, rs) for m, rs in kept.items()],
            "paired": paired_differences(kept)}


if __name__ == "__main__":
    main(sys.argv[1])

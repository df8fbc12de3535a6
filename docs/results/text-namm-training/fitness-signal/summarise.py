"""Signal of the shipped NAMM's fitness (the 0/1 answer score, `--score answer`) against the dense score
(`--score likelihood`): one generation from the shipped mean per seed, the same 8 members and the same 12 prompts
for both scores (generation 0 is drawn before any fitness is seen). Reads the runs' log.jsonl files in this folder
(`<score>-s<seed>/log.jsonl`) and prints, per run, the rank correlation of the members' scores between the two
halves of the prompts, the member spread and the prompt noise (namm_transfer.evolve.signal), and writes
signal.json. Run: python docs/results/text-namm-training/fitness-signal/summarise.py
"""

import json
from pathlib import Path

HERE = Path(__file__).parent
rows = []
for log in sorted(HERE.glob("*-s*/log.jsonl")):
    record = json.loads(log.read_text().splitlines()[0])
    score, seed = log.parent.name.rsplit("-s", 1)
    rows.append({"score": score, "seed": int(seed), **record["signal"],
                 "kv_retained_mean": record["extra"]["kv_retained"]["mean"],
                 "kv_retained_min": record["extra"]["kv_retained"]["min"],
                 "kv_retained_max": record["extra"]["kv_retained"]["max"]})
for score in sorted({r["score"] for r in rows}):
    mine = [r for r in rows if r["score"] == score]
    print(f"{score:10s} rank correlation " + ", ".join(f"{r['rank_correlation']:+.2f}" for r in mine)
          + f" (mean {sum(r['rank_correlation'] for r in mine) / len(mine):+.2f});  member spread / prompt noise "
          + ", ".join(f"{r['member_spread']:.3f}/{r['prompt_noise']:.3f}" for r in mine))
(HERE / "signal.json").write_text(json.dumps(rows, indent=2) + "\n")

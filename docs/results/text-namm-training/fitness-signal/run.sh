#!/usr/bin/env bash
# The signal of the shipped NAMM's fitness (0/1 answer score) against the dense score, on the same members and
# prompts: one generation from the shipped mean per seed and score. Run folders go to runs/signal/ (git-ignored);
# their log.jsonl, run_config.json and learning_curve.png were copied here, beside summarise.py.
set -u
cd "$(dirname "$0")/../../../.." && source .venv/bin/activate
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
for seed in 1 2 3; do
  for score in answer likelihood; do
    nice python -m namm_transfer.evolve --run-dir runs/signal/$score-s$seed --init-from weights/namm \
      --score $score --attention-dtype bfloat16 --stage passkey,variable_tracking,multikey_needle:1 \
      --population 8 --sigma0 0.065 --seed $seed --prompts-per-task 4 --pool-size 12 --length 768 \
      --update-every 256 --members-per-batch 8 --memory-weight 1 --protect-sink 4 --protect-prompt-tail 64 \
      --validation-items 0 --quiet || exit $?
  done
done

#!/usr/bin/env bash
# Set up (idempotent) and run the main job on shipped defaults: the text-trained NAMM attached, unchanged, to the
# shipped Decision Transformer on Hopper (python -m namm_transfer.rl --env hopper). Extra arguments pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m namm_transfer.rl --env hopper "$@"

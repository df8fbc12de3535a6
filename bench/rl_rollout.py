"""Speed of a Decision Transformer's episodes per condition: env steps per second, and the NAMM's per-step overhead
over the full cache, on the same episodes in the same process.

    OMP_NUM_THREADS=1 python bench/rl_rollout.py --env hopper --episodes 20 --repeats 2 --out bench/results/rl_cpu.json

Each condition runs ``--episodes`` episodes together (one lockstep batch, as ``python -m namm_transfer.rl`` does),
``--repeats`` times after one warm-up; the median wall time is reported. Per-step cost = wall time / batch
timesteps (the lockstep loop runs until its longest episode ends), so conditions whose episodes differ in length
compare per timestep of the loop, not per episode. Memory is each episode's mean visible KV (keys + values).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from namm_transfer.evals.control import control_env
from namm_transfer.namm.checkpoint import load_namm
from namm_transfer.rl.checkpoint import load_dt
from namm_transfer.rl.conditions import Condition, run_condition
from namm_transfer.rl.rollout import RolloutSettings
from namm_transfer.runtime.cache import CacheConfig
from namm_transfer.shipped import shipped_weights


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="hopper")
    parser.add_argument("--model", default=None, help="DT folder (default: the shipped weights/dt/<env>-medium)")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--update-every", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = control_env(args.env)
    model, info = load_dt(args.model or shipped_weights(f"dt/{env.name}-medium"))
    namm = load_namm(shipped_weights("namm"))
    settings = RolloutSettings(env.gym_id, info.state_mean, info.state_std, info.target_returns[0],
                               info.return_scale, info.context)
    config = CacheConfig(update_every=args.update_every)
    seeds = list(range(args.episodes))
    namm_budget = run_condition(Condition("namm"), model, seeds, settings, config, namm=namm,
                                namm_visible_by_step=None, seed=0).visible_by_step

    def run(label: str):
        return run_condition(Condition.parse(label), model, seeds, settings, config, namm=namm,
                             namm_visible_by_step=namm_budget, seed=0)

    labels = ["window", "full", "namm", "h2o@matched", "recency@matched"]
    rows = {}
    for label in labels:
        run(label)  # warm-up
        times, result = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = run(label)
            times.append(time.perf_counter() - start)
        loop_steps = max(e.length for e in result.episodes)
        seconds = statistics.median(times)
        rows[label] = {
            "seconds": seconds, "loop_timesteps": loop_steps, "ms_per_loop_timestep": 1000 * seconds / loop_steps,
            "env_steps_per_second": result.env_steps / seconds,
            "kv_kib_mean": statistics.mean(e.kv_bytes_mean for e in result.episodes) / 1024,
        }
        print(f"{label:16s} {rows[label]['ms_per_loop_timestep']:7.2f} ms/timestep  "
              f"{rows[label]['env_steps_per_second']:8.0f} env steps/s  {rows[label]['kv_kib_mean']:8.1f} KiB KV",
              file=sys.stderr)
    overhead = rows["namm"]["ms_per_loop_timestep"] / rows["full"]["ms_per_loop_timestep"]
    report = {"env": env.name, "episodes": args.episodes, "repeats": args.repeats, "threads": args.threads,
              "update_every": args.update_every, "conditions": rows, "namm_time_per_timestep_over_full": overhead}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m namm_transfer.rl.data``: a behaviour policy trained with stable-baselines3, rolled out into a
local Minari dataset.

Steps: (1) train PPO on the env (or reuse its cache folder), saving checkpoints along the way
(:mod:`namm_transfer.rl.behaviour`); (2) measure every checkpoint's mean return over a few episodes and take the
best as the expert and the one closest to ``--medium-fraction`` of the expert's return as the medium policy (as
D4RL's and Minari's medium sets: about a third of the expert); (3) measure the reference returns over
``--ref-episodes`` episodes: a uniformly random policy (``ref_min_score``) and the expert (``ref_max_score``);
(4) roll the chosen policy out for at least ``--steps`` env steps (whole episodes, stochastic actions, one seed
per episode) and write them with ``minari.create_dataset_from_buffers`` (no jax) under ``MINARI_DATASETS_PATH``
as ``namm-transfer/<env>/<quality>-v0``. The dataset's metadata carries the references, the env spec, the
behaviour checkpoint and its return, and the commands. Checkpoint returns and references are cached in the
behaviour folder, so the second quality of an env costs only its rollout.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from namm_transfer.cli import ArgumentParser, run_program
from namm_transfer.evals.control import QUALITIES, ControlEnv, control_env

MEASURES_FILE = "returns.json"
"""Cache of measured returns in a behaviour folder: per checkpoint, and the references."""

SELECT_SEEDS = 500_000
REFERENCE_SEEDS = 700_000
"""Offsets (added to ``seed * 1_000_000``) of the env seeds that measure returns; dataset episodes start at 0."""


def default_cache() -> Path:
    """``$XDG_CACHE_HOME/namm-transfer/behaviour`` (``~/.cache`` when unset)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "namm-transfer" / "behaviour"


def parser() -> ArgumentParser:
    from namm_transfer.evals.control import ENVS

    p = ArgumentParser(prog="python -m namm_transfer.rl.data", description=__doc__.split("\n\n")[0])
    p.add_argument("--env", required=True, help=f"control env ({', '.join(ENVS)})")
    p.add_argument("--quality", default="medium", choices=QUALITIES, help="behaviour policy (default medium)")
    p.add_argument("--seed", type=int, default=0, help="seeds PPO, the rollouts and the env resets")
    p.add_argument("--ppo-steps", type=int, default=300_000, help="PPO training env steps (default 300000)")
    p.add_argument("--checkpoint-every", type=int, default=25_000, help="env steps between PPO checkpoints")
    p.add_argument("--steps", type=int, default=200_000, help="dataset size: at least this many env steps, "
                                                                "whole episodes (default 200000)")
    p.add_argument("--eval-episodes", type=int, default=10, help="episodes measuring each checkpoint (default 10)")
    p.add_argument("--ref-episodes", type=int, default=100,
                   help="episodes measuring the random and expert reference returns (default 100)")
    p.add_argument("--medium-fraction", type=float, default=1 / 3,
                   help="medium policy's return as a fraction of the expert's (default 1/3)")
    p.add_argument("--batch", type=int, default=10, help="envs stepped in lockstep during rollouts")
    p.add_argument("--cache", type=Path, default=None,
                   help="behaviour policy cache (default $XDG_CACHE_HOME/namm-transfer/behaviour)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset of the same id")
    return p


def _measures(folder: Path, run_record: dict) -> dict:
    path = folder / MEASURES_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("run") == run_record:
            return saved
    return {"run": run_record, "checkpoints": {}, "reference": None}


def _save_measures(folder: Path, measures: dict) -> None:
    (folder / MEASURES_FILE).write_text(json.dumps(measures, indent=1) + "\n")


def measure_checkpoints(folder: Path, env: ControlEnv, seed: int, episodes: int, batch: int,
                        up_to: int) -> dict[int, dict]:
    """Mean and std return over ``episodes`` stochastic episodes of every checkpoint of at most ``up_to`` steps
    (cached in the folder): steps -> {mean, std, mean_length}."""
    from namm_transfer.rl.behaviour import CONFIG_FILE, checkpoint_steps, load_policy
    from namm_transfer.rl.episodes import mean_return, run_episodes

    record = json.loads((folder / CONFIG_FILE).read_text())["run"]
    measures = _measures(folder, record)
    key = f"{episodes} episodes"
    chosen = checkpoint_steps(folder, up_to)
    for steps in chosen:
        entry = measures["checkpoints"].setdefault(str(steps), {})
        if key not in entry:
            torch.manual_seed(seed + SELECT_SEEDS)
            played = run_episodes(env.gym_id, load_policy(folder, steps, env.gym_id),
                                  seed * 1_000_000 + SELECT_SEEDS, episodes=episodes, batch=batch)
            mean, std = mean_return(played)
            entry[key] = {"mean": mean, "std": std, "mean_length": float(np.mean([len(e) for e in played]))}
            _save_measures(folder, measures)
        print(f"  checkpoint {steps:>8} steps: return {entry[key]['mean']:8.1f} +- {entry[key]['std']:6.1f} "
              f"(length {entry[key]['mean_length']:.0f})")
    return {steps: measures["checkpoints"][str(steps)][key] for steps in chosen}


def choose(returns: dict[int, dict], quality: str, medium_fraction: float) -> tuple[int, int]:
    """(expert checkpoint, chosen checkpoint): the best mean return, and for ``medium`` the checkpoint whose mean
    is closest to ``medium_fraction`` of the best (the earlier one on ties)."""
    expert = max(returns, key=lambda s: (returns[s]["mean"], -s))
    if quality == "expert":
        return expert, expert
    target = medium_fraction * returns[expert]["mean"]
    return expert, min(returns, key=lambda s: (abs(returns[s]["mean"] - target), s))


def reference_returns(folder: Path, env: ControlEnv, expert: int, seed: int, episodes: int, batch: int) -> dict:
    """Random-policy and expert mean returns over ``episodes`` episodes (cached in the behaviour folder)."""
    import gymnasium as gym

    from namm_transfer.rl.behaviour import CONFIG_FILE, load_policy, random_policy
    from namm_transfer.rl.episodes import mean_return, run_episodes

    record = json.loads((folder / CONFIG_FILE).read_text())["run"]
    measures = _measures(folder, record)
    wanted = {"expert_steps": expert, "episodes": episodes}
    reference = measures.get("reference")
    if reference and all(reference.get(k) == v for k, v in wanted.items()):
        return reference
    first = seed * 1_000_000 + REFERENCE_SEEDS
    probe = gym.make(env.gym_id)
    space = probe.action_space
    probe.close()
    random_mean, random_std = mean_return(run_episodes(env.gym_id, random_policy(space, seed + REFERENCE_SEEDS),
                                                       first, episodes=episodes, batch=batch, progress="random"))
    torch.manual_seed(seed + REFERENCE_SEEDS)
    expert_mean, expert_std = mean_return(run_episodes(env.gym_id, load_policy(folder, expert, env.gym_id), first,
                                                       episodes=episodes, batch=batch, progress="expert"))
    measures["reference"] = {**wanted, "random_mean": random_mean, "random_std": random_std,
                             "expert_mean": expert_mean, "expert_std": expert_std}
    _save_measures(folder, measures)
    return measures["reference"]


def write_dataset(dataset_id: str, env: ControlEnv, episodes: list, reference: dict, description: str,
                  extra: dict, algorithm: str):
    """Write ``episodes`` (:class:`namm_transfer.rl.episodes.Episode`) as a local Minari dataset and return it."""
    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    buffers = [
        EpisodeBuffer(id=i, seed=e.seed, observations=e.observations, actions=e.actions,
                      rewards=e.rewards.tolist(), terminations=[False] * (len(e) - 1) + [e.terminated],
                      truncations=[False] * (len(e) - 1) + [e.truncated])
        for i, e in enumerate(episodes)
    ]
    spec = gym.spec(env.gym_id)
    with warnings.catch_warnings():  # code_permalink / author_email: the metadata records the commands instead
        warnings.filterwarnings("ignore", message=r"`(code_permalink|author_email)` is set to None")
        dataset = minari.create_dataset_from_buffers(
            dataset_id, buffers, env=spec, eval_env=spec, algorithm_name=algorithm, author={"namm-transfer"},
            ref_min_score=reference["random_mean"], ref_max_score=reference["expert_mean"],
            num_episodes_average_score=reference["episodes"], description=description,
            requirements=["mujoco>=3", "gymnasium>=1.0"],
        )
    dataset.storage.update_metadata(extra)
    return dataset


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    env = control_env(args.env)
    if not 0 < args.medium_fraction < 1:
        raise ValueError(f"--medium-fraction must be in (0, 1), got {args.medium_fraction}")
    for name in ("steps", "eval_episodes", "ref_episodes", "batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    import minari

    from namm_transfer.rl.behaviour import CONFIG_FILE, PPO_CONFIGS, BehaviourRun, train_behaviour
    from namm_transfer.rl.dataset import datasets_path
    from namm_transfer.rl.episodes import mean_return, run_episodes

    dataset_id = env.dataset_id(args.quality)
    root = datasets_path()
    if dataset_id in minari.list_local_datasets() and not args.overwrite:
        raise ValueError(f"dataset {dataset_id} already exists in {root}; pass --overwrite to replace it")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    start = time.perf_counter()
    run = BehaviourRun(env, args.ppo_steps, args.checkpoint_every, args.seed, PPO_CONFIGS[env.name])
    train_args = ["--env", env.name, "--seed", str(args.seed), "--ppo-steps", str(args.ppo_steps),
                  "--checkpoint-every", str(args.checkpoint_every)]
    training_command = "python -m namm_transfer.rl.data " + shlex.join(train_args)
    folder = train_behaviour(run, args.cache or default_cache(), training_command)
    print(f"behaviour policy: PPO in {folder}")
    returns = measure_checkpoints(folder, env, args.seed, args.eval_episodes, args.batch, args.ppo_steps)
    expert, chosen = choose(returns, args.quality, args.medium_fraction)
    print(f"expert: checkpoint {expert} ({returns[expert]['mean']:.1f}); {args.quality}: checkpoint {chosen} "
          f"({returns[chosen]['mean']:.1f})")
    reference = reference_returns(folder, env, expert, args.seed, args.ref_episodes, args.batch)
    print(f"references over {args.ref_episodes} episodes: random {reference['random_mean']:.1f}, "
          f"expert {reference['expert_mean']:.1f}")

    from namm_transfer.rl.behaviour import load_policy

    torch.manual_seed(args.seed)
    episodes = run_episodes(env.gym_id, load_policy(folder, chosen, env.gym_id), args.seed * 1_000_000,
                            min_steps=args.steps, batch=args.batch, progress="dataset")
    data_mean, data_std = mean_return(episodes)
    if dataset_id in minari.list_local_datasets():
        minari.delete_dataset(dataset_id)
    command = "python -m namm_transfer.rl.data " + shlex.join(argv)
    behaviour = json.loads((folder / CONFIG_FILE).read_text())
    description = (
        f"{env.gym_id} {args.quality} data: {len(episodes)} episodes of a stable-baselines3 PPO policy "
        f"(checkpoint at {chosen} of {args.ppo_steps} training steps, seed {args.seed}; stochastic actions), "
        f"whose measured mean return is {data_mean:.1f}; the expert (checkpoint {expert}) returns "
        f"{reference['expert_mean']:.1f} and a uniformly random policy {reference['random_mean']:.1f} over "
        f"{args.ref_episodes} episodes. Made by `{command}`; the policy was trained by `{training_command}`."
    )
    extra = {  # read back by namm_transfer.rl.dataset.provenance
        "namm_transfer": {
            "command": command, "behaviour_training_command": training_command,
            "behaviour_training_sessions": behaviour["sessions"],
            "behaviour_run": {**run.record(), "total_steps": run.total_steps},
            "ppo_config": asdict(run.ppo), "checkpoint_steps": chosen, "expert_checkpoint_steps": expert,
            "checkpoint_returns": {str(s): r for s, r in sorted(returns.items())},
            "reference": reference, "dataset_return_mean": data_mean, "dataset_return_std": data_std,
            "terminated_episodes": sum(e.terminated for e in episodes),
            "truncated_episodes": sum(e.truncated for e in episodes),
        }
    }
    import stable_baselines3

    dataset = write_dataset(dataset_id, env, episodes, reference, description, extra,
                            f"PPO (stable-baselines3 {stable_baselines3.__version__}, rl-zoo3 hyperparameters)")
    print(f"wrote {dataset_id} to {root}: {dataset.total_episodes} episodes, {dataset.total_steps} steps, "
          f"return {data_mean:.1f} +- {data_std:.1f} ({sum(e.terminated for e in episodes)} terminated, "
          f"{sum(e.truncated for e in episodes)} truncated) in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_program(main))

"""Whole episodes of a batched policy in a Gymnasium env, recorded step by step (for datasets and returns).

``B`` envs step in lockstep and the policy acts on all of them at once; when an env's episode ends (terminated:
the robot fell; truncated: the time limit) it is recorded and the env restarts with the next episode's seed,
until enough episodes or env steps are collected. Episode ``i`` is reset with seed ``first_seed + i`` and the
episodes come back in the order of ``i``, so a run is reproducible from its seeds (and from torch's seed for a
stochastic policy).
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

from namm_transfer.rl.behaviour import Act


@dataclass
class Episode:
    """One recorded episode of T steps.

    Attributes:
        seed: the env's reset seed.
        observations: (T + 1, obs_dim) float64, the reset observation then one per step (Minari's layout).
        actions: (T, act_dim) float32, as passed to ``env.step`` (inside the action space).
        rewards: (T,) float64.
        terminated: the last step ended the episode from inside the MDP (a fall).
        truncated: the last step hit the time limit.
    """

    seed: int
    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminated: bool
    truncated: bool

    @property
    def episode_return(self) -> float:
        return float(self.rewards.sum())

    def __len__(self) -> int:
        return len(self.rewards)


def run_episodes(gym_id: str, act: Act, first_seed: int, episodes: int | None = None, min_steps: int | None = None,
                 batch: int = 10, progress: str | None = None, max_episode_steps: int | None = None) -> list[Episode]:
    """Run ``act`` until ``episodes`` episodes are done, or until the finished ones hold ``min_steps`` steps.

    Exactly one of ``episodes`` / ``min_steps`` is given. With ``min_steps`` the episodes already started when
    the target is reached are finished too, but only the first episodes (in seed order) whose steps reach the
    target are kept. A stochastic policy draws its noise for the whole batch at once, so a rollout is
    reproducible for the same seeds, torch seed and ``batch``. ``progress`` names a tqdm bar;
    ``max_episode_steps`` replaces the env's registered time limit.
    """
    if (episodes is None) == (min_steps is None):
        raise ValueError("give exactly one of episodes and min_steps")
    if (episodes is not None and episodes < 1) or (min_steps is not None and min_steps < 1) or batch < 1:
        raise ValueError("episodes, min_steps and batch must be >= 1")
    envs = [gym.make(gym_id, max_episode_steps=max_episode_steps) for _ in range(batch if episodes is None else min(batch, episodes))]
    space = envs[0].action_space
    finished: dict[int, Episode] = {}
    started = 0
    rows: list[dict] = []
    bar = tqdm(total=episodes or min_steps, desc=progress, unit="episode" if episodes else "step",
               disable=progress is None, mininterval=2.0)

    def enough() -> bool:
        if episodes is not None:
            return started >= episodes
        steps, index = 0, 0
        while index in finished:  # the steps of the leading run of finished episodes
            steps += len(finished[index])
            index += 1
        return steps >= min_steps

    def start(env: gym.Env) -> dict:
        nonlocal started
        seed = first_seed + started
        observation, _ = env.reset(seed=seed)
        row = {"index": started, "seed": seed, "env": env, "obs": [observation], "act": [], "rew": []}
        started += 1
        return row

    rows = [start(env) for env in envs]
    try:
        while rows:
            actions = np.clip(act(np.stack([row["obs"][-1] for row in rows]).astype(np.float32)),
                              space.low, space.high)
            next_rows = []
            for row, action in zip(rows, actions):
                observation, reward, terminated, truncated, _ = row["env"].step(action)
                row["obs"].append(observation)
                row["act"].append(action)
                row["rew"].append(reward)
                if not (terminated or truncated):
                    next_rows.append(row)
                    continue
                finished[row["index"]] = Episode(
                    row["seed"], np.asarray(row["obs"], dtype=np.float64), np.asarray(row["act"], dtype=np.float32),
                    np.asarray(row["rew"], dtype=np.float64), bool(terminated), bool(truncated) and not terminated)
                bar.update(1 if episodes else min(len(row["rew"]), max(0, bar.total - bar.n)))
                if not enough():
                    next_rows.append(start(row["env"]))
            rows = next_rows
    finally:
        bar.close()
        for env in envs:
            env.close()
    ordered = [finished[i] for i in range(len(finished))]
    if min_steps is not None:
        total, keep = 0, 0
        while total < min_steps:
            total += len(ordered[keep])
            keep += 1
        ordered = ordered[:keep]
    return ordered


def mean_return(episodes: list[Episode]) -> tuple[float, float]:
    """Mean and standard deviation of the episodes' returns."""
    returns = np.array([e.episode_return for e in episodes])
    return float(returns.mean()), float(returns.std())

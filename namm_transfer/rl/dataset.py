"""Offline RL data for Decision Transformer training: a local Minari dataset as per-episode arrays.

Loads any local Minari dataset of a supported MuJoCo env by id: the ones ``python -m namm_transfer.rl.data``
writes (``namm-transfer/hopper/medium-v0``) and Minari's own (``mujoco/hopper/medium-v0``) when the user has
them in ``MINARI_DATASETS_PATH``. Nothing is downloaded. States are normalised with the dataset's mean and
standard deviation (+1e-6, as the original DT code, Chen et al. 2021).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from namm_transfer.evals.control import ENVS, QUALITIES, ControlEnv

STD_EPSILON = 1e-6


@dataclass
class Trajectories:
    """The episodes of one dataset.

    Attributes:
        dataset_id: the Minari id.
        env: the control env the data comes from (from the dataset's env spec).
        states: per episode, (T_i, state_dim) float32 observations before each action.
        actions: per episode, (T_i, act_dim) float32.
        rewards: per episode, (T_i,) float32.
        terminated: per episode, whether it ended in a terminal state (else the time limit or the data's end).
        state_mean, state_std: (state_dim,) float32 over all states of the dataset (std + 1e-6).
        ref_min_score, ref_max_score: the dataset's reference returns (its metadata), None when absent.
    """

    dataset_id: str
    env: ControlEnv
    states: list[np.ndarray]
    actions: list[np.ndarray]
    rewards: list[np.ndarray]
    terminated: list[bool]
    state_mean: np.ndarray
    state_std: np.ndarray
    ref_min_score: float | None
    ref_max_score: float | None

    @property
    def lengths(self) -> np.ndarray:
        """(N,) episode lengths."""
        return np.array([len(r) for r in self.rewards])

    @property
    def returns(self) -> np.ndarray:
        """(N,) undiscounted episode returns."""
        return np.array([float(r.sum()) for r in self.rewards])

    def returns_to_go(self, episode: int) -> np.ndarray:
        """(T_i,) undiscounted return from each step to the episode's end."""
        return np.cumsum(self.rewards[episode][::-1])[::-1].astype(np.float32)

    def summary(self) -> dict:
        """Episodes, steps, return mean/std/min/max, terminated count: JSON-ready."""
        returns = self.returns
        return {"episodes": len(self.rewards), "steps": int(self.lengths.sum()), "return_mean": float(returns.mean()),
                "return_std": float(returns.std()), "return_min": float(returns.min()),
                "return_max": float(returns.max()), "terminated": int(sum(self.terminated))}


def make_command(dataset_id: str) -> str | None:
    """The command that makes ``dataset_id`` when it is one of this suite's ids, else None."""
    parts = dataset_id.split("/")
    if len(parts) == 3 and parts[0] == "namm-transfer" and parts[1] in ENVS and parts[2].endswith("-v0"):
        quality = parts[2][: -len("-v0")]
        if quality in QUALITIES:
            return f"python -m namm_transfer.rl.data --env {parts[1]} --quality {quality}"
    return None


def env_of(gym_id: str) -> ControlEnv:
    """The supported env whose Gymnasium id has the same name as ``gym_id`` (any version: Hopper-v2 ... v5)."""
    name = gym_id.split("-v")[0].lower()
    for env in ENVS.values():
        if env.gym_id.split("-v")[0].lower() == name:
            return env
    raise ValueError(f"the dataset's env {gym_id} is not supported; supported: "
                     f"{', '.join(e.gym_id for e in ENVS.values())}")


def datasets_path() -> Path:
    """Where Minari keeps local datasets (``MINARI_DATASETS_PATH``, else ``~/.minari/datasets``)."""
    return Path(os.environ.get("MINARI_DATASETS_PATH", Path.home() / ".minari" / "datasets"))


def load_trajectories(dataset_id: str) -> Trajectories:
    """Read a local Minari dataset; a missing one raises FileNotFoundError saying how to make it."""
    import minari

    if dataset_id not in minari.list_local_datasets():
        how = make_command(dataset_id)
        hint = f"make it with `{how}`" if how else "put it there (this suite downloads nothing)"
        raise FileNotFoundError(f"no local Minari dataset {dataset_id!r} in {datasets_path()}; {hint}")
    dataset = minari.load_dataset(dataset_id)
    env = env_of(dataset.env_spec.id)
    states, actions, rewards, terminated = [], [], [], []
    for episode in dataset.iterate_episodes():
        states.append(np.asarray(episode.observations[:-1], dtype=np.float32))
        actions.append(np.asarray(episode.actions, dtype=np.float32))
        rewards.append(np.asarray(episode.rewards, dtype=np.float32))
        terminated.append(bool(episode.terminations[-1]))
    if not states:
        raise ValueError(f"dataset {dataset_id} has no episodes")
    stacked = np.concatenate(states)
    metadata = dataset.storage.metadata
    return Trajectories(
        dataset_id, env, states, actions, rewards, terminated,
        state_mean=stacked.mean(axis=0), state_std=stacked.std(axis=0) + STD_EPSILON,
        ref_min_score=_float_or_none(metadata.get("ref_min_score")),
        ref_max_score=_float_or_none(metadata.get("ref_max_score")),
    )


def provenance(dataset_id: str) -> dict:
    """What ``python -m namm_transfer.rl.data`` recorded in the dataset's metadata (empty for other datasets)."""
    import minari

    return dict(minari.load_dataset(dataset_id).storage.metadata.get("namm_transfer") or {})


def _float_or_none(value) -> float | None:
    return None if value is None else float(value)

"""Behaviour policies for the offline datasets: stable-baselines3 PPO on the Gymnasium MuJoCo envs.

Hyperparameters are rl-zoo3's (``hyperparams/ppo.yml``, DLR-RM/rl-baselines3-zoo): for Hopper and Walker2d the
zoo's MuJoCo defaults (``normalize: true`` with SB3's PPO defaults), for HalfCheetah its tuned ``HalfCheetah-v4``
entry. The tuned ``Walker2d-v4`` entry (20 epochs of minibatches of 32) costs about four times as much CPU per
sample, and the tuned ``Hopper-v4`` one learned to stand still on Hopper-v5 (see :data:`PPO_CONFIGS`). All use ``VecNormalize`` (observations and rewards, discounted with the PPO gamma) as the
zoo does. One change for the 2-core CPU: the zoo collects with one env; here ``n_envs`` envs collect
``n_steps`` each, the same number of samples per update (``n_envs * n_steps``), because SB3 runs its policy
batched over the envs and a single env spends most of its time in per-step policy overhead (measured:
about 1.2 ms per step with one env on this CPU).

A training run saves a checkpoint (``ppo_<steps>_steps.zip`` + ``ppo_vecnormalize_<steps>_steps.pkl``) every
``checkpoint_every`` env steps into a cache folder keyed by env and seed (and checked against the settings), so that the dataset program
can pick its expert and medium policies among them by measured return and reuse them later.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import gymnasium as gym
import numpy as np
import torch
from tqdm.auto import tqdm

from namm_transfer.evals.control import ControlEnv

CONFIG_FILE = "behaviour.json"
"""Written into a cache folder when its training run finished: the config, the command and the wall time."""

_CHECKPOINT = re.compile(r"ppo_(\d+)_steps\.zip$")


@dataclass(frozen=True)
class PPOConfig:
    """PPO and VecNormalize settings of one env (rl-zoo3 names; see the module docstring for their source).

    Attributes:
        n_envs: envs collecting in parallel (in one process); ``n_envs * n_steps`` samples per update.
        n_steps, batch_size, n_epochs, gamma, gae_lambda, learning_rate, ent_coef, clip_range, max_grad_norm,
            vf_coef: ``stable_baselines3.PPO`` arguments.
        log_std_init, ortho_init, net_arch: policy settings (``None``: SB3's defaults, 64x64 tanh).
        activation: ``relu`` or ``tanh``.
    """

    n_envs: int = 4
    n_steps: int = 512
    batch_size: int = 64
    n_epochs: int = 10
    gamma: float = 0.99
    gae_lambda: float = 0.95
    learning_rate: float = 3e-4
    ent_coef: float = 0.0
    clip_range: float = 0.2
    max_grad_norm: float = 0.5
    vf_coef: float = 0.5
    log_std_init: float = 0.0
    ortho_init: bool = True
    net_arch: tuple[int, ...] = (64, 64)
    activation: str = "tanh"

    def __post_init__(self) -> None:
        problems = []
        if min(self.n_envs, self.n_steps, self.batch_size, self.n_epochs) < 1:
            problems.append("n_envs, n_steps, batch_size and n_epochs must be >= 1")
        if (self.n_envs * self.n_steps) % self.batch_size:
            problems.append(f"batch_size {self.batch_size} must divide n_envs * n_steps = {self.n_envs * self.n_steps}")
        if not (0 < self.gamma <= 1 and 0 < self.gae_lambda <= 1):
            problems.append("gamma and gae_lambda must be in (0, 1]")
        if self.learning_rate <= 0 or self.clip_range <= 0 or self.max_grad_norm <= 0:
            problems.append("learning_rate, clip_range and max_grad_norm must be > 0")
        if self.activation not in ("relu", "tanh"):
            problems.append(f"activation must be relu or tanh, got {self.activation!r}")
        if problems:
            raise ValueError("invalid PPOConfig: " + "; ".join(problems))

    @property
    def samples_per_update(self) -> int:
        return self.n_envs * self.n_steps

    def ppo_kwargs(self) -> dict:
        """Keyword arguments of ``stable_baselines3.PPO`` (without policy, env and seed)."""
        activation = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}[self.activation]
        arch = list(self.net_arch)
        return dict(
            n_steps=self.n_steps, batch_size=self.batch_size, n_epochs=self.n_epochs, gamma=self.gamma,
            gae_lambda=self.gae_lambda, learning_rate=self.learning_rate, ent_coef=self.ent_coef,
            clip_range=self.clip_range, max_grad_norm=self.max_grad_norm, vf_coef=self.vf_coef,
            policy_kwargs=dict(log_std_init=self.log_std_init, ortho_init=self.ortho_init, activation_fn=activation,
                               net_arch=dict(pi=arch, vf=arch)),
        )


PPO_CONFIGS: dict[str, PPOConfig] = {
    # rl-zoo3 MuJoCo defaults: VecNormalize + SB3 PPO defaults (1 env x 2048 steps there). The tuned Hopper-v4
    # entry (log_std_init -2, gamma 0.999) stood still here: 300k steps of it on Hopper-v5 ended at a return of
    # about 1000 (the healthy bonus over 1000 steps without moving), every checkpoint either standing or falling.
    "hopper": PPOConfig(n_envs=4, n_steps=512),
    # rl-zoo3 MuJoCo defaults: VecNormalize + SB3 PPO defaults (1 env x 2048 steps there).
    "walker2d": PPOConfig(n_envs=4, n_steps=512),
    # rl-zoo3 tuned HalfCheetah-v4 (1 env x 512 steps there).
    "halfcheetah": PPOConfig(n_envs=4, n_steps=128, batch_size=64, n_epochs=20, gamma=0.98, gae_lambda=0.92,
                             learning_rate=2.0633e-05, ent_coef=0.000401762, clip_range=0.1, max_grad_norm=0.8,
                             vf_coef=0.58096, log_std_init=-2.0, ortho_init=False, net_arch=(256, 256),
                             activation="relu"),
}
"""PPO settings per env short name (:data:`namm_transfer.evals.control.ENVS`)."""


@dataclass(frozen=True)
class BehaviourRun:
    """One PPO training run.

    Attributes:
        env: the control env.
        total_steps: env steps of training (not part of the run's identity: a longer run extends a shorter one).
        checkpoint_every: env steps between checkpoints (rounded up to whole updates by SB3's callback).
        seed: seeds PPO, its envs and torch.
        ppo: the PPO settings.
    """

    env: ControlEnv
    total_steps: int
    checkpoint_every: int
    seed: int = 0
    ppo: PPOConfig = field(default_factory=PPOConfig)

    def __post_init__(self) -> None:
        if self.total_steps < self.ppo.samples_per_update:
            raise ValueError(f"total_steps ({self.total_steps}) must be >= one PPO update "
                             f"({self.ppo.samples_per_update} env steps)")
        if not 0 < self.checkpoint_every <= self.total_steps:
            raise ValueError(f"checkpoint_every must be in [1, total_steps], got {self.checkpoint_every}")

    def folder(self, cache: Path) -> Path:
        """The run's cache folder: ``<cache>/<env>-ppo-seed<seed>``."""
        return Path(cache) / f"{self.env.name}-ppo-seed{self.seed}"

    def record(self) -> dict:
        """JSON-ready identity of the run (compared on reuse; without ``total_steps``)."""
        return {"env": self.env.name, "gym_id": self.env.gym_id,
                "checkpoint_every": self.checkpoint_every, "seed": self.seed, "ppo": asdict(self.ppo)}


class _Progress:
    """An SB3 callback (built lazily, SB3 is an optional dependency) that moves a tqdm bar with the env steps."""

    @staticmethod
    def make(total: int, label: str):
        from stable_baselines3.common.callbacks import BaseCallback

        class Progress(BaseCallback):
            def _on_training_start(self) -> None:
                self.bar = tqdm(total=total, desc=label, unit="step", mininterval=2.0)

            def _on_step(self) -> bool:
                self.bar.update(self.training_env.num_envs)
                return True

            def _on_training_end(self) -> None:
                self.bar.close()

        return Progress()


def train_behaviour(run: BehaviourRun, cache: Path, command: str) -> Path:
    """Train PPO for ``run`` into its cache folder, resuming or reusing what is there; returns the folder.

    The folder (:meth:`BehaviourRun.folder`) holds the checkpoints and :data:`CONFIG_FILE`, which records the run,
    the env steps trained, the commands and wall times of the training sessions. A folder trained to at least
    ``run.total_steps`` is reused as it is; otherwise training continues from its latest checkpoint up to
    ``run.total_steps`` (an interrupted run too). A run trained in one session is deterministic from its seed; a
    resumed one restarts its envs and rollout buffer, so it is not bit-identical, and records where it resumed.
    A folder of another run (other settings) raises ValueError.
    """
    import time

    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import CallbackList, CheckpointCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    folder = run.folder(cache)
    record = json.loads(json.dumps(run.record()))
    done = folder / CONFIG_FILE
    saved = json.loads(done.read_text()) if done.exists() else {"run": record, "trained_steps": 0, "sessions": []}
    if saved["run"] != record:
        raise ValueError(f"{folder} holds a behaviour run with other settings; use another --cache or delete it")
    if saved["trained_steps"] >= run.total_steps:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    resume = max((s for s in checkpoint_steps(folder) if s <= run.total_steps), default=0)
    venv = make_vec_env(run.env.gym_id, n_envs=run.ppo.n_envs, seed=run.seed + resume)
    if resume:
        venv = VecNormalize.load(str(folder / f"ppo_vecnormalize_{resume}_steps.pkl"), venv)
        model = PPO.load(folder / f"ppo_{resume}_steps.zip", env=venv, device="cpu")
    else:
        torch.manual_seed(run.seed)
        venv = VecNormalize(venv, norm_obs=True, norm_reward=True, gamma=run.ppo.gamma)
        model = PPO("MlpPolicy", venv, seed=run.seed, device="cpu", verbose=0, **run.ppo.ppo_kwargs())
    checkpoints = CheckpointCallback(save_freq=max(1, run.checkpoint_every // run.ppo.n_envs), save_path=str(folder),
                                     name_prefix="ppo", save_vecnormalize=True)
    start = time.perf_counter()
    model.learn(run.total_steps - resume, callback=CallbackList([checkpoints, _Progress.make(run.total_steps - resume,
                                                                                            "PPO")]),
                reset_num_timesteps=not resume)
    model.save(folder / f"ppo_{model.num_timesteps}_steps.zip")
    venv.save(str(folder / f"ppo_vecnormalize_{model.num_timesteps}_steps.pkl"))
    venv.close()
    saved["trained_steps"] = int(model.num_timesteps)
    saved["sessions"].append({"command": command, "from_steps": resume, "to_steps": int(model.num_timesteps),
                              "seconds": round(time.perf_counter() - start, 1)})
    done.write_text(json.dumps(saved, indent=1) + "\n")
    return folder


def checkpoint_steps(folder: Path, up_to: int | None = None) -> list[int]:
    """Env steps of the checkpoints saved in a run folder (those <= ``up_to`` when given), ascending."""
    steps = (int(m.group(1)) for p in Path(folder).iterdir() if (m := _CHECKPOINT.search(p.name)))
    return sorted(s for s in steps if up_to is None or s <= up_to)


Act = Callable[[np.ndarray], np.ndarray]
"""A batched policy: observations (B, obs_dim) float -> actions (B, act_dim) float32."""


def load_policy(folder: Path, steps: int, gym_id: str, deterministic: bool = False) -> Act:
    """The checkpoint at ``steps`` as a batched policy on raw observations (its VecNormalize statistics frozen).

    Stochastic by default (actions sampled from the Gaussian policy with torch's global generator, so seed
    torch for a reproducible rollout), as the behaviour data of D4RL and Minari.
    """
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    model = PPO.load(Path(folder) / f"ppo_{steps}_steps.zip", device="cpu")
    normaliser = VecNormalize.load(str(Path(folder) / f"ppo_vecnormalize_{steps}_steps.pkl"),
                                   DummyVecEnv([lambda: gym.make(gym_id)]))
    normaliser.training = False

    def act(observations: np.ndarray) -> np.ndarray:
        actions, _ = model.predict(normaliser.normalize_obs(observations), deterministic=deterministic)
        return np.asarray(actions, dtype=np.float32)

    return act


def random_policy(action_space: gym.spaces.Box, seed: int) -> Act:
    """Uniform random actions from ``action_space`` (the reference minimum of normalised scores), seeded."""
    rng = np.random.default_rng(seed)

    def act(observations: np.ndarray) -> np.ndarray:
        shape = (len(observations), *action_space.shape)
        return rng.uniform(action_space.low, action_space.high, size=shape).astype(np.float32)

    return act

"""Control environments of the RL transfer, their reference scores, and episode statistics.

The Decision Transformer conventions (Chen et al. 2021; CORL; Beeching & Simonini's Hugging Face DTs): context
K = 20 timesteps, returns-to-go scaled by 1000, evaluation target returns per env, episodes of at most 1000 steps.
D4RL normalised score = 100 (R - min) / (max - min) with D4RL's random / expert reference returns (Fu et al. 2020);
a Minari dataset carries its own ``ref_min_score`` / ``ref_max_score`` in its metadata, and its normalised score is
the same formula with those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class ControlEnv:
    """One MuJoCo locomotion task.

    Attributes:
        name: short name used on the command line (``hopper``).
        gym_id: Gymnasium id (``Hopper-v5``).
        d4rl_min, d4rl_max: D4RL reference returns (random policy, expert policy).
        target_returns: DT evaluation targets (high, low); the high one is the default.
        max_episode_steps: episode length limit (time-limit truncation).
    """

    name: str
    gym_id: str
    d4rl_min: float
    d4rl_max: float
    target_returns: tuple[float, float]
    max_episode_steps: int = 1000

    def __post_init__(self) -> None:
        if not self.d4rl_max > self.d4rl_min:
            raise ValueError(f"{self.name}: d4rl_max must exceed d4rl_min")
        if self.max_episode_steps < 1:
            raise ValueError(f"{self.name}: max_episode_steps must be >= 1")

    def dataset_id(self, quality: str, namespace: str = "namm-transfer") -> str:
        """Minari id of this env's dataset of ``quality`` (``namm-transfer/hopper/medium-v0``; Minari's own sets
        use the namespace ``mujoco``)."""
        return f"{namespace}/{self.name}/{quality}-v0"

    def d4rl_normalized(self, returns: Sequence[float] | np.ndarray) -> np.ndarray:
        """100 (R - min) / (max - min) with D4RL's references, elementwise."""
        return normalized_score(returns, self.d4rl_min, self.d4rl_max)


ENVS: dict[str, ControlEnv] = {
    env.name: env
    for env in (
        ControlEnv("hopper", "Hopper-v5", -20.272305, 3234.3, (3600.0, 1800.0)),
        ControlEnv("walker2d", "Walker2d-v5", 1.629008, 4592.3, (5000.0, 2500.0)),
        ControlEnv("halfcheetah", "HalfCheetah-v5", -280.178953, 12135.0, (12000.0, 6000.0)),
    )
}
"""The supported envs by short name (D4RL references and DT targets from field-notes.md §5)."""

QUALITIES = ("medium", "expert")


def control_env(name: str) -> ControlEnv:
    """The env called ``name``; an unknown name raises ValueError listing the known ones."""
    if name not in ENVS:
        raise ValueError(f"unknown env {name!r}; known: {', '.join(ENVS)}")
    return ENVS[name]


def normalized_score(returns: Sequence[float] | np.ndarray, ref_min: float, ref_max: float) -> np.ndarray:
    """100 (R - ref_min) / (ref_max - ref_min), elementwise (float64)."""
    if not ref_max > ref_min:
        raise ValueError(f"reference max ({ref_max}) must exceed reference min ({ref_min})")
    return 100.0 * (np.asarray(returns, dtype=np.float64) - ref_min) / (ref_max - ref_min)

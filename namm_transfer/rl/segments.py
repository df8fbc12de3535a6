"""Training batches of a Decision Transformer: random K-step segments of the dataset's episodes.

The recipe of the original DT gym code (Chen et al. 2021, ``experiment.py: get_batch``) and of Hugging Face's
``DecisionTransformerGymDataCollator``: an episode is drawn with probability proportional to its length, a start
``t0`` uniformly among its steps, and the segment ``t0 .. t0 + K - 1`` (shorter at the episode's end) is
left-padded to K with a zero attention mask. States are normalised with the dataset's mean/std, returns-to-go
(undiscounted, from each step to the episode's end) divided by the return scale, timesteps clipped to
``max_ep_len - 1``.
"""

from __future__ import annotations

import numpy as np
import torch

from namm_transfer.rl.dataset import Trajectories


class SegmentSampler:
    """Draws batches of K-step segments from ``trajectories`` with its own seeded generator."""

    def __init__(self, trajectories: Trajectories, context: int, max_ep_len: int, return_scale: float, seed: int):
        if context < 1 or max_ep_len < 1 or not return_scale > 0:
            raise ValueError("context and max_ep_len must be >= 1 and return_scale > 0")
        self.context, self.max_ep_len = context, max_ep_len
        self.states = [(s - trajectories.state_mean) / trajectories.state_std for s in trajectories.states]
        self.actions = trajectories.actions
        self.returns_to_go = [trajectories.returns_to_go(i) / return_scale for i in range(len(self.states))]
        lengths = trajectories.lengths
        self.probabilities = lengths / lengths.sum()
        self.rng = np.random.default_rng(seed)

    def sample(self, batch: int) -> dict[str, torch.Tensor]:
        """A batch of segments as ``DecisionTransformerModel.forward`` keywords.

        Returns:
            states (B, K, state_dim) float32, actions (B, K, act_dim) float32 (also the targets),
            returns_to_go (B, K, 1) float32, timesteps (B, K) int64, attention_mask (B, K) int64 (0 = padding).
        """
        k = self.context
        state_dim, act_dim = self.states[0].shape[1], self.actions[0].shape[1]
        states = np.zeros((batch, k, state_dim), dtype=np.float32)
        actions = np.zeros((batch, k, act_dim), dtype=np.float32)
        returns_to_go = np.zeros((batch, k, 1), dtype=np.float32)
        timesteps = np.zeros((batch, k), dtype=np.int64)
        mask = np.zeros((batch, k), dtype=np.int64)
        for row, episode in enumerate(self.rng.choice(len(self.states), size=batch, p=self.probabilities)):
            start = int(self.rng.integers(len(self.actions[episode])))
            end = min(start + k, len(self.actions[episode]))
            pad = k - (end - start)
            states[row, pad:] = self.states[episode][start:end]
            actions[row, pad:] = self.actions[episode][start:end]
            returns_to_go[row, pad:, 0] = self.returns_to_go[episode][start:end]
            timesteps[row, pad:] = np.minimum(np.arange(start, end), self.max_ep_len - 1)
            mask[row, pad:] = 1
        return {name: torch.from_numpy(value) for name, value in (
            ("states", states), ("actions", actions), ("returns_to_go", returns_to_go), ("timesteps", timesteps),
            ("attention_mask", mask))}

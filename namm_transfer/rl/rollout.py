"""Episodes of a Decision Transformer in Gymnasium MuJoCo envs, run in lockstep batches.

Two ways to act (Chen et al. 2021, §4 and the original evaluation code):

* :func:`window_rollout`: the standard DT evaluation loop. At every timestep the model recomputes its forward
  over the last K timesteps (return-to-go, state, action; left-padded with a zero attention mask while t < K);
  no cache. This is what the DT was trained for.
* :func:`cached_rollout`: incremental inference over the whole episode through an
  :class:`~namm_transfer.runtime.cache.EvictingCache` on the GPT-2 backbone. Each timestep feeds the previous
  action, the new return-to-go and the new state (three tokens), cut at multiples of ``update_every`` so a policy
  step always sees exactly ``update_every`` new queries (the runner's prefill schedule); the action is read at the
  state token. ``policy=None`` keeps the whole episode (up to 3 x 1000 tokens); a NAMM or a baseline evicts.

Both run B episodes at once (one env per row, seeded), stepping until every row is done; a finished row keeps
feeding its last inputs, which never touch other rows (rows are independent in attention and in every policy),
and nothing it does after its end is counted.

Memory per episode is what each row can attend to (visible slots, mean over KV heads) after every forward,
per layer: its mean and peak over the episode, in tokens per layer and in bytes over all layers
(keys + values). For the window loop it is the context it attends (at most 3K - 1 tokens).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from namm_transfer.adapters.decision_transformer import (
    TOKEN_TYPES,
    DecisionTransformerAdapter,
    token_timestep,
    token_type,
)
from namm_transfer.namm.interface import EvictionPolicy
from namm_transfer.rl.checkpoint import check_sizes
from namm_transfer.runtime.cache import CacheConfig, EvictingCache
from namm_transfer.runtime.runner import prefill_chunks

AGE_BUCKET = 25
"""Width (timesteps) of the age buckets of the retention-by-age record."""


@dataclass(frozen=True)
class RolloutSettings:
    """How a DT is driven in an env.

    Attributes:
        gym_id: Gymnasium env id (``Hopper-v5``).
        state_mean, state_std: (state_dim,) normalisation of observations (the training dataset's).
        target_return: return-to-go at the first timestep, unscaled (DT convention: hopper 3600).
        return_scale: returns-to-go are divided by it before embedding (1000).
        context: K, timesteps in the window loop's context (20).
        max_episode_steps: episode length limit (1000); also bounds the timestep embedding.
    """

    gym_id: str
    state_mean: tuple[float, ...]
    state_std: tuple[float, ...]
    target_return: float
    return_scale: float = 1000.0
    context: int = 20
    max_episode_steps: int = 1000

    def __post_init__(self) -> None:
        problems = []
        if len(self.state_mean) != len(self.state_std) or not self.state_mean:
            problems.append("state_mean and state_std must be non-empty and of the same length")
        if any(s <= 0 for s in self.state_std):
            problems.append("state_std must be positive")
        if self.return_scale <= 0:
            problems.append(f"return_scale must be > 0, got {self.return_scale}")
        if self.context < 1:
            problems.append(f"context must be >= 1, got {self.context}")
        if self.max_episode_steps < 1:
            problems.append(f"max_episode_steps must be >= 1, got {self.max_episode_steps}")
        if problems:
            raise ValueError("invalid RolloutSettings: " + "; ".join(problems))


@dataclass
class EpisodeRecord:
    """One finished episode.

    Attributes:
        seed: env seed of the episode.
        episode_return: undiscounted return.
        length: timesteps played.
        terminated: ended by the env (a fall) rather than by the time limit.
        kv_tokens_mean, kv_tokens_peak: visible tokens per layer (mean over layers and KV heads), mean and peak
            over the episode's timesteps.
        kv_bytes_mean, kv_bytes_peak: the same as bytes of keys + values over all layers.
        policy_bytes_mean, policy_bytes_peak: bytes the method adds to them (validity, arrival indices, buffered
            queries, the policy's per-token state: ``EvictingCache.policy_bytes``), the row's share by its slots.
        kept_by_type: at the episode's end, visible slots by token type (summed over layers and KV heads).
        kept_by_type_age: per token type, visible slots by age (current timestep - the token's) in buckets of
            :data:`AGE_BUCKET` timesteps, summed over layers and KV heads.
        cache_curve: visible tokens per layer after every 10th timestep.
    """

    seed: int
    episode_return: float
    length: int
    terminated: bool
    kv_tokens_mean: float
    kv_tokens_peak: float
    kv_bytes_mean: float
    kv_bytes_peak: float
    policy_bytes_mean: float = 0.0
    policy_bytes_peak: float = 0.0
    kept_by_type: dict[str, int] = field(default_factory=dict)
    kept_by_type_age: dict[str, list[int]] = field(default_factory=dict)
    cache_curve: list[float] = field(default_factory=list)


@dataclass
class BatchResult:
    """What a rollout of one batch returns.

    Attributes:
        episodes: one record per seed, in the order of the seeds.
        seconds: wall time of the batch.
        env_steps: timesteps played by all rows (before their ends).
        visible_by_step: for cached rollouts, ``{(policy step, layer): mean visible slots over the rows still
            playing at that step}``, the NAMM's budget that matched baselines replay; empty otherwise.
    """

    episodes: list[EpisodeRecord]
    seconds: float
    env_steps: int
    visible_by_step: dict[tuple[int, int], float] = field(default_factory=dict)


class _EnvBatch:
    """B seeded envs stepped in lockstep; rows that ended stop counting."""

    def __init__(self, gym_id: str, seeds: list[int], max_episode_steps: int):
        self.envs = [gym.make(gym_id, max_episode_steps=max_episode_steps) for _ in seeds]
        self.seeds = seeds
        observations = [env.reset(seed=seed)[0] for env, seed in zip(self.envs, seeds)]
        self.observation = np.stack(observations).astype(np.float32)
        self.returns = np.zeros(len(seeds))
        self.lengths = np.zeros(len(seeds), dtype=np.int64)
        self.done = np.zeros(len(seeds), dtype=bool)
        self.terminated = np.zeros(len(seeds), dtype=bool)
        space = self.envs[0].action_space
        self.action_low, self.action_high = space.low, space.high

    def step(self, actions: np.ndarray) -> np.ndarray:
        """Step every live row with its action (B, act_dim); returns the rewards (B,) (0 for ended rows)."""
        rewards = np.zeros(len(self.envs))
        actions = np.clip(actions, self.action_low, self.action_high)
        for row, env in enumerate(self.envs):
            if self.done[row]:
                continue
            observation, reward, terminated, truncated, _ = env.step(actions[row])
            self.observation[row] = observation
            rewards[row] = reward
            self.returns[row] += reward
            self.lengths[row] += 1
            if terminated or truncated:
                self.done[row] = True
                self.terminated[row] = bool(terminated)
        return rewards

    def close(self) -> None:
        for env in self.envs:
            env.close()


def _normalise(observation: np.ndarray, settings: RolloutSettings, device: torch.device) -> torch.Tensor:
    mean = np.asarray(settings.state_mean, dtype=np.float32)
    std = np.asarray(settings.state_std, dtype=np.float32)
    return torch.from_numpy((observation - mean) / std).to(device)


def _bytes_per_token_layer(model: nn.Module) -> int:
    """Bytes of keys + values of one token in one layer (all heads)."""
    dtype_size = next(model.parameters()).element_size()
    return 2 * model.config.hidden_size * dtype_size


@torch.no_grad()
def window_rollout(model: nn.Module, seeds: list[int], settings: RolloutSettings) -> BatchResult:
    """The standard DT evaluation loop over ``len(seeds)`` episodes at once (see the module docstring)."""
    device = next(model.parameters()).device
    batch = _EnvBatch(settings.gym_id, seeds, settings.max_episode_steps)
    check_sizes(model.config, settings.gym_id, len(settings.state_mean), settings.max_episode_steps)
    rows, k = len(seeds), settings.context
    state_dim, act_dim = batch.observation.shape[1], batch.action_low.shape[0]
    states = torch.zeros(rows, 0, state_dim, device=device)
    actions = torch.zeros(rows, 0, act_dim, device=device)
    returns_to_go = torch.zeros(rows, 0, 1, device=device)
    remaining = torch.full((rows,), settings.target_return / settings.return_scale, device=device)
    tokens_per_step = []
    start = time.perf_counter()
    for t in range(settings.max_episode_steps):
        states = torch.cat([states, _normalise(batch.observation, settings, device)[:, None]], dim=1)[:, -k:]
        returns_to_go = torch.cat([returns_to_go, remaining[:, None, None]], dim=1)[:, -k:]
        actions = torch.cat([actions, actions.new_zeros(rows, 1, act_dim)], dim=1)[:, -k:]
        length = states.shape[1]
        timesteps = torch.arange(t - length + 1, t + 1, device=device).expand(rows, length)
        pad = k - length
        mask = torch.cat([torch.zeros(rows, pad, device=device), torch.ones(rows, length, device=device)], dim=1)
        predicted = model(
            states=torch.cat([states.new_zeros(rows, pad, state_dim), states], dim=1),
            actions=torch.cat([actions.new_zeros(rows, pad, act_dim), actions], dim=1),
            returns_to_go=torch.cat([returns_to_go.new_zeros(rows, pad, 1), returns_to_go], dim=1),
            timesteps=torch.cat([timesteps.new_zeros(rows, pad), timesteps], dim=1),
            attention_mask=mask.long(),
            return_dict=True,
        ).action_preds[:, -1]
        actions[:, -1] = predicted
        tokens_per_step.append(3 * length - 1)
        rewards = batch.step(predicted.cpu().numpy())
        remaining = remaining - torch.from_numpy(rewards).float().to(device) / settings.return_scale
        if batch.done.all():
            break
    seconds = time.perf_counter() - start
    batch.close()
    per_token = _bytes_per_token_layer(model) * model.config.n_layer
    episodes = []
    for row, seed in enumerate(seeds):
        span = np.asarray(tokens_per_step[: batch.lengths[row]], dtype=np.float64)
        episodes.append(
            EpisodeRecord(
                seed=seed, episode_return=float(batch.returns[row]), length=int(batch.lengths[row]),
                terminated=bool(batch.terminated[row]), kv_tokens_mean=float(span.mean()),
                kv_tokens_peak=float(span.max()), kv_bytes_mean=float(span.mean() * per_token),
                kv_bytes_peak=float(span.max() * per_token), cache_curve=span[::10].tolist(),
            )
        )
    return BatchResult(episodes, seconds, int(batch.lengths.sum()))


def retention_by_type(cache: EvictingCache, row: int, timestep: int) -> tuple[dict[str, int], dict[str, list[int]]]:
    """Visible slots of ``row`` by token type, and by type and age bucket (:data:`AGE_BUCKET` timesteps, age =
    ``timestep`` - the token's timestep), summed over layers and KV heads."""
    buckets = timestep // AGE_BUCKET + 1
    by_type = {name: 0 for name in TOKEN_TYPES}
    by_age = {name: [0] * buckets for name in TOKEN_TYPES}
    for layer in cache.layers:
        arrival = layer.arrival[row][layer.attendable[row]]
        kinds = token_type(arrival)
        ages = torch.div(timestep - token_timestep(arrival), AGE_BUCKET, rounding_mode="floor")
        for code, name in enumerate(TOKEN_TYPES):
            of_kind = ages[kinds == code]
            by_type[name] += int(of_kind.numel())
            counts = torch.bincount(of_kind, minlength=buckets).tolist()
            by_age[name] = [a + b for a, b in zip(by_age[name], counts)]
    return by_type, by_age


def _policy_bytes_per_row(cache: EvictingCache, visible: torch.Tensor) -> torch.Tensor:
    """(B,) float64: ``cache.policy_bytes()`` of the batch shared among its rows by their visible slots (all
    layers), i.e. what each episode would hold alone. ``visible`` is (B, L) from ``visible_per_layer``."""
    slots = visible.double().sum(dim=1)
    return cache.policy_bytes() * slots / slots.sum().clamp(min=1.0)


class CachedActor:
    """Acts with a DT over a whole episode by incremental inference through an evicting cache.

    Each :meth:`act` feeds the previous action (after the first timestep), then the return-to-go and the state of
    the new timestep, cut at multiples of ``update_every`` so a policy step always sees exactly ``update_every``
    new queries, and reads the action at the state token. With ``policy=None`` (a full cache) the actions equal
    ``DecisionTransformerModel.forward`` over the whole episode so far.

    Use as a context manager: entering routes the backbone's attention through the evicting cache, leaving
    restores it.

    Args:
        model: the DT (eval mode).
        rows: episodes acted on together (B).
        policy: eviction policy, or None for the full cache.
        cache_config: the period (``update_every``, else the policy's own) must be a multiple of 3, so every policy
            step starts at a return token.

    Attributes:
        cache: the evicting cache of the B episodes.
        visible_by_step: ``{(policy step, layer): [visible slots kept by each live row]}`` (mean over KV heads),
            filled when :meth:`act` gets the ``live`` rows.
    """

    def __init__(self, model: nn.Module, rows: int, policy: EvictionPolicy | None, cache_config: CacheConfig):
        self.model = model
        self.adapter = DecisionTransformerAdapter()
        geometry = self.adapter.geometry(model)
        self.cache = EvictingCache(policy, geometry.num_layers, geometry.managed_layers, cache_config)
        self.update_every = self.cache.update_every  # the config's, else the policy's declared period
        if self.update_every % 3:
            raise ValueError(f"update_every must be a multiple of 3 for a DT, got {self.update_every}")
        self.cache.begin(prompt_length=0)  # an episode has no prompt to protect
        self.device = next(model.parameters()).device
        self.rows = rows
        self.fed = 0
        self.previous_action: torch.Tensor | None = None
        self.visible_by_step: dict[tuple[int, int], list[float]] = {}
        self._restore = None

    def __enter__(self) -> "CachedActor":
        self._restore = self.adapter.attach(self.model)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    @torch.no_grad()
    def act(
        self, returns_to_go: torch.Tensor, states: torch.Tensor, timestep: int, live: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Actions (B, act_dim) for timestep ``timestep`` from returns-to-go (B, 1) (scaled) and states
        (B, state_dim) (normalised); ``live`` (B,) bool marks the rows whose kept slots count for the budget."""
        steps = torch.full((self.rows,), timestep, dtype=torch.long, device=self.device)
        tokens = [self.adapter.embed(self.model, 0, returns_to_go, steps),
                  self.adapter.embed(self.model, 1, states, steps)]
        if self.previous_action is not None:
            tokens.insert(0, self.adapter.embed(self.model, 2, self.previous_action, steps - 1))
        embeds = torch.cat(tokens, dim=1)
        count = embeds.shape[1]
        for a, b in prefill_chunks(self.fed, self.fed + count, count, self.update_every):
            steps_before = len(self.cache.retention)
            hidden = self.adapter.forward_chunk(
                self.model, self.cache, inputs_embeds=embeds[:, a - self.fed : b - self.fed],
                position_ids=torch.zeros(self.rows, b - a, dtype=torch.long, device=self.device), last_only=True,
            )
            if live is not None and len(self.cache.retention) > steps_before:
                self._record_budget(self.cache.retention[steps_before:], live, b - a)
        self.fed += count
        self.previous_action = self.model.predict_action(hidden[:, -1])
        return self.previous_action

    def _record_budget(self, records, live: torch.Tensor, appended: int) -> None:
        """Append the visible slots each live row kept at the policy steps ``records`` (mean over KV heads); the
        forward that ran the steps has since appended ``appended`` tokens, not counted."""
        if not live.any():
            return
        for record in records:
            layer = self.cache.layers[record.layer]
            visible = layer.attendable.sum(dim=-1).float().mean(dim=-1).cpu()[live] - appended  # (live rows,)
            self.visible_by_step.setdefault((record.step, record.layer), []).extend(visible.tolist())


@torch.no_grad()
def cached_rollout(
    model: nn.Module,
    seeds: list[int],
    settings: RolloutSettings,
    policy: EvictionPolicy | None,
    cache_config: CacheConfig,
) -> BatchResult:
    """Whole episodes acted by a :class:`CachedActor` (see the module docstring)."""
    device = next(model.parameters()).device
    batch = _EnvBatch(settings.gym_id, seeds, settings.max_episode_steps)
    check_sizes(model.config, settings.gym_id, len(settings.state_mean), settings.max_episode_steps)
    rows = len(seeds)
    remaining = torch.full((rows, 1), settings.target_return / settings.return_scale, device=device)
    visible_history: list[torch.Tensor] = []  # per timestep (B, L)
    policy_history: list[torch.Tensor] = []  # per timestep (B,)
    retention: dict[int, tuple[dict, dict]] = {}
    start = time.perf_counter()
    with CachedActor(model, rows, policy, cache_config) as actor:
        for t in range(settings.max_episode_steps):
            live = ~torch.from_numpy(batch.done)
            action = actor.act(remaining, _normalise(batch.observation, settings, device), t, live)
            visible_history.append(actor.cache.visible_per_layer())
            policy_history.append(_policy_bytes_per_row(actor.cache, visible_history[-1]))
            rewards = batch.step(action.cpu().numpy())
            remaining = remaining - torch.from_numpy(rewards).float().to(device)[:, None] / settings.return_scale
            for row in np.flatnonzero(batch.done & (batch.lengths == t + 1)):
                retention[int(row)] = retention_by_type(actor.cache, int(row), t)
            if batch.done.all():
                break
    seconds = time.perf_counter() - start
    batch.close()
    per_token_layer = _bytes_per_token_layer(model)
    history = torch.stack(visible_history)  # (T, B, L)
    episodes = []
    for row, seed in enumerate(seeds):
        length = int(batch.lengths[row])
        per_layer = history[:length, row].double()  # (length, L)
        tokens = per_layer.mean(dim=1)
        total_bytes = per_layer.sum(dim=1) * per_token_layer
        by_type, by_age = retention[row]
        policy_bytes = torch.stack(policy_history)[:length, row]
        episodes.append(
            EpisodeRecord(
                seed=seed, episode_return=float(batch.returns[row]), length=length,
                terminated=bool(batch.terminated[row]), kv_tokens_mean=float(tokens.mean()),
                kv_tokens_peak=float(tokens.max()), kv_bytes_mean=float(total_bytes.mean()),
                kv_bytes_peak=float(total_bytes.max()), policy_bytes_mean=float(policy_bytes.mean()),
                policy_bytes_peak=float(policy_bytes.max()), kept_by_type=by_type, kept_by_type_age=by_age,
                cache_curve=tokens[::10].tolist(),
            )
        )
    budget = {key: float(np.mean(values)) for key, values in actor.visible_by_step.items()}
    return BatchResult(episodes, seconds, int(batch.lengths.sum()), budget)

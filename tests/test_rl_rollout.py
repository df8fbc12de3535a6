"""Decision Transformer with an evicting cache: cached incremental actions equal full recomputation, the window
loop equals the reference DT evaluation loop, a keep-everything NAMM equals the full cache, retention by token type
sums to the kept slots, and matched / window budgets hit their counts. Tiny random DTs, CPU."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from transformers import DecisionTransformerConfig, DecisionTransformerModel

from namm_transfer.adapters.base import adapter_for
from namm_transfer.adapters.decision_transformer import TOKEN_TYPES, DecisionTransformerAdapter, token_timestep, token_type
from namm_transfer.namm.baselines import make_baseline
from namm_transfer.namm.budget import FixedRatioBudget
from namm_transfer.namm.config import NammConfig
from namm_transfer.namm.features import NormalisationStats
from namm_transfer.namm.policy import NammPolicy
from namm_transfer.rl.conditions import Condition, baseline_policy, matched_budget, policy_steps
from namm_transfer.rl.rollout import CachedActor, RolloutSettings, cached_rollout, retention_by_type, window_rollout
from namm_transfer.runtime.cache import CacheConfig

STATE, ACT = 17, 6  # HalfCheetah-v5: never terminates, so episodes last as long as asked


@pytest.fixture(scope="module")
def tiny_dt():
    torch.manual_seed(0)
    config = DecisionTransformerConfig(state_dim=STATE, act_dim=ACT, hidden_size=32, n_layer=2, n_head=2,
                                       max_ep_len=1000, action_tanh=True, n_positions=64)
    return DecisionTransformerModel(config).eval()


def settings(steps: int) -> RolloutSettings:
    return RolloutSettings("HalfCheetah-v5", (0.1,) * STATE, (2.0,) * STATE, 6000.0, max_episode_steps=steps)


def test_adapter_is_registered_and_reads_token_types(tiny_dt):
    assert isinstance(adapter_for(tiny_dt), DecisionTransformerAdapter)
    geometry = DecisionTransformerAdapter().geometry(tiny_dt)
    assert (geometry.num_layers, geometry.num_q_heads, geometry.head_dim) == (2, 2, 16)
    arrival = torch.arange(9)
    assert [TOKEN_TYPES[i] for i in token_type(arrival)] == ["return", "state", "action"] * 3
    assert token_timestep(arrival).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def _random_episode(steps: int, rows: int = 2):
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(rows, steps, 1, generator=generator), torch.randn(rows, steps, STATE, generator=generator),
            torch.rand(rows, steps, ACT, generator=generator) * 2 - 1)


@torch.no_grad()
def test_cached_actions_equal_full_recomputation_over_210_steps(tiny_dt):
    steps = 210
    returns, states, forced_actions = _random_episode(steps)
    actor_actions = []
    with CachedActor(tiny_dt, 2, None, CacheConfig(update_every=48)) as actor:
        for t in range(steps):
            actor_actions.append(actor.act(returns[:, t], states[:, t], t))
            actor.previous_action = forced_actions[:, t]  # feed the same actions as the reference
    full = tiny_dt(states=states, actions=forced_actions, returns_to_go=returns,
                   timesteps=torch.arange(steps).expand(2, steps), return_dict=True).action_preds
    assert torch.allclose(torch.stack(actor_actions, dim=1), full, atol=1e-5)
    assert actor.cache.get_seq_length() == 3 * steps - 1


def _keep_everything_namm() -> NammPolicy:
    config = NammConfig()
    stats = NormalisationStats(torch.zeros(config.spectrogram_bins), torch.ones(config.spectrogram_bins))
    return NammPolicy(config, torch.zeros(config.num_params), stats)


@torch.no_grad()
def test_keep_everything_namm_gives_exactly_the_full_actions(tiny_dt):
    steps = 120
    returns, states, _ = _random_episode(steps)
    runs = []
    for policy in (None, _keep_everything_namm()):
        with CachedActor(tiny_dt, 2, policy, CacheConfig(update_every=48)) as actor:
            runs.append(torch.stack([actor.act(returns[:, t], states[:, t], t) for t in range(steps)], dim=1))
        if policy is not None:  # 359 tokens: steps at 48, 96, ..., 336 in both layers, none evicting
            assert len(actor.cache.retention) == 2 * 7
            assert actor.cache.kept_per_layer() == [3 * steps - 1] * 2
    assert torch.equal(runs[0], runs[1])


def _reference_window_return(model, seed: int, s: RolloutSettings) -> float:
    """The DT evaluation loop of the original code (and of the Hugging Face example): one env, recompute over the
    last K timesteps, left-padded with a zero attention mask."""
    env = gym.make(s.gym_id, max_episode_steps=s.max_episode_steps)
    observation, _ = env.reset(seed=seed)
    mean, std = np.asarray(s.state_mean, np.float32), np.asarray(s.state_std, np.float32)
    states = torch.from_numpy(((observation - mean) / std).astype(np.float32))[None]
    actions = torch.zeros(0, ACT)
    rtg = torch.tensor([[s.target_return / s.return_scale]])
    timesteps = torch.zeros(1, dtype=torch.long)
    total = 0.0
    for t in range(s.max_episode_steps):
        actions = torch.cat([actions, torch.zeros(1, ACT)])
        k = s.context
        st, ac, rt, ts = states[-k:], actions[-k:], rtg[-k:], timesteps[-k:]
        pad = k - st.shape[0]
        with torch.no_grad():
            action = model(
                states=torch.cat([torch.zeros(pad, STATE), st])[None],
                actions=torch.cat([torch.zeros(pad, ACT), ac])[None],
                returns_to_go=torch.cat([torch.zeros(pad, 1), rt])[None],
                timesteps=torch.cat([torch.zeros(pad, dtype=torch.long), ts])[None],
                attention_mask=torch.cat([torch.zeros(pad), torch.ones(st.shape[0])]).long()[None],
                return_dict=True,
            ).action_preds[0, -1]
        actions[-1] = action
        observation, reward, terminated, truncated, _ = env.step(np.clip(action.numpy(), -1, 1))
        total += reward
        if terminated or truncated:
            break
        states = torch.cat([states, torch.from_numpy(((observation - mean) / std).astype(np.float32))[None]])
        rtg = torch.cat([rtg, rtg[-1:] - reward / s.return_scale])
        timesteps = torch.cat([timesteps, torch.tensor([t + 1])])
    env.close()
    return total


def test_window_rollout_equals_the_reference_loop(tiny_dt):
    s = settings(45)
    result = window_rollout(tiny_dt, [3, 4], s)
    for seed, episode in zip([3, 4], result.episodes):
        assert episode.length == 45 and not episode.terminated
        assert episode.episode_return == pytest.approx(_reference_window_return(tiny_dt, seed, s), rel=1e-5, abs=1e-5)
        assert episode.kv_tokens_peak == 3 * s.context - 1


def test_retention_by_type_sums_to_the_kept_slots(tiny_dt):
    steps = 70
    returns, states, _ = _random_episode(steps)
    policy = make_baseline("h2o", FixedRatioBudget(0.4))
    with CachedActor(tiny_dt, 2, policy, CacheConfig(update_every=48)) as actor:
        for t in range(steps):
            actor.act(returns[:, t], states[:, t], t)
    assert actor.cache.retention, "the policy must have evicted"
    heads = tiny_dt.config.n_head
    for row in range(2):
        by_type, by_age = retention_by_type(actor.cache, row, steps - 1)
        visible = float(actor.cache.visible_per_layer()[row].sum()) * heads
        assert sum(by_type.values()) == pytest.approx(visible)
        assert {name: sum(counts) for name, counts in by_age.items()} == by_type
        assert visible < 2 * heads * (3 * steps - 1)  # something was evicted


def test_cached_rollout_namm_and_matched_baseline_hold_the_same_memory(tiny_dt):
    s = settings(80)
    config = CacheConfig(update_every=48)
    namm_run = cached_rollout(tiny_dt, [0, 1], s, make_baseline("l2", FixedRatioBudget(0.5)), config)
    assert namm_run.visible_by_step and all(step >= 0 for step, _ in namm_run.visible_by_step)
    policy = baseline_policy(Condition("recency", "matched"), num_steps=policy_steps(80, 48), update_every=48,
                             layers=[0, 1], context=20, namm_visible_by_step=namm_run.visible_by_step, seed=0)
    matched = cached_rollout(tiny_dt, [0, 1], s, policy, config)
    for a, b in zip(namm_run.episodes, matched.episodes):
        assert a.kv_tokens_mean == pytest.approx(b.kv_tokens_mean, abs=0.5)
    full = cached_rollout(tiny_dt, [0, 1], s, None, config)
    assert full.episodes[0].kv_tokens_peak == 3 * 80 - 1
    assert namm_run.episodes[0].kv_tokens_peak < full.episodes[0].kv_tokens_peak


def test_matched_budget_extends_with_the_last_share():
    budget = matched_budget({(0, 0): 30.4, (1, 0): 40.0}, update_every=48, layers=[0])
    assert budget.counts == {(0, 0): 30, (1, 0): 40}
    assert budget.last_shares[0] == pytest.approx(40 / 96)
    with pytest.raises(ValueError, match="layer 1"):
        matched_budget({(0, 0): 3.0}, update_every=48, layers=[0, 1])


def test_window_budget_keeps_three_k_tokens(tiny_dt):
    s = settings(100)
    policy = baseline_policy(Condition("recency", "window"), num_steps=policy_steps(100, 48), update_every=48,
                             layers=[0, 1], context=20, namm_visible_by_step=None, seed=0)
    run = cached_rollout(tiny_dt, [0], s, policy, CacheConfig(update_every=48))
    # after a step the cache holds 60 tokens, then grows by up to 48 before the next step
    assert run.episodes[0].kv_tokens_peak <= 60 + 48
    assert min(run.episodes[0].cache_curve[5:]) >= 60


@pytest.mark.parametrize("text", ["nonsense", "h2o", "namm@matched", "h2o@0.5"])
def test_bad_condition_names(text):
    with pytest.raises(ValueError):
        Condition.parse(text)


def test_update_every_must_be_a_multiple_of_three(tiny_dt):
    with pytest.raises(ValueError, match="multiple of 3"):
        CachedActor(tiny_dt, 1, None, CacheConfig(update_every=64))

"""NammPolicy: state carried and gathered with the kept indices, members, protection, statistics mode."""

import numpy as np
import pytest
import torch

from namm_transfer.namm.config import NammConfig
from namm_transfer.namm.features import (
    NormalisationStats,
    StatsAccumulator,
    ema_frame_weights,
    spectral_ema_step,
    spectrogram,
)
from namm_transfer.namm.interface import EvictionPolicy, LayerView
from namm_transfer.namm.policy import EMA_STATE_DTYPE, NammPolicy

CFG = NammConfig()
UNIT_STATS = NormalisationStats(torch.zeros(17), torch.ones(17))
GAMMA = CFG.ema_coeff


def readout_params(bin_weight: float = 0.0, bias: float = 0.0, spectral_bin: int = 0) -> torch.Tensor:
    """BAM with zero attention weights: score = bin_weight * normalised E[bin] + bias (H = X when Z = 0)."""
    theta = torch.zeros(4172)
    theta[4146 + 8 + spectral_bin] = bin_weight
    theta[4171] = bias
    return theta


def causal_attention(batch, heads, n_old, n_new, seed=0):
    """(B, H, n_new, n_old + n_new) non-negative rows, zero where the query precedes the key."""
    gen = torch.Generator().manual_seed(seed)
    slots = n_old + n_new
    attn = torch.rand(batch, heads, n_new, slots, generator=gen)
    query_pos = torch.arange(n_new).view(-1, 1) + n_old
    attn = attn * (torch.arange(slots) <= query_pos)
    return attn / attn.sum(-1, keepdim=True)


def make_view(attention, step, token_index=None, valid=None, prompt_length=None, layer=0):
    batch, heads, n_new, slots = attention.shape
    if token_index is None:
        token_index = torch.arange(slots).expand(batch, heads, slots)
    if valid is None:
        valid = torch.ones(batch, heads, slots, dtype=torch.bool)
    return LayerView(
        layer=layer,
        step=step,
        arrival=token_index,
        attendable=valid,
        n_new=n_new,
        keys=torch.zeros(batch, heads, slots, 1),
        attention_fn=lambda: attention,
        prompt_length=prompt_length,
    )


def test_is_an_eviction_policy():
    policy = NammPolicy(CFG, torch.zeros(4172), UNIT_STATS)
    assert isinstance(policy, EvictionPolicy) and policy.name == "namm"


def test_zero_params_keep_everything():
    policy = NammPolicy(CFG, torch.zeros(4172), UNIT_STATS)
    policy.begin(2, 1)
    decision = policy.step(make_view(causal_attention(2, 3, 0, 64), step=0))
    assert torch.equal(decision.indices, torch.arange(64).expand(2, 3, 64))


def test_state_is_gathered_with_the_kept_indices():
    attention = causal_attention(1, 1, 0, 64, seed=3).expand(1, 2, 64, 64)  # identical heads
    full = spectral_ema_step(attention, None, CFG)
    threshold = float(full.ema[0, 0, :, 0].median())
    policy = NammPolicy(CFG, readout_params(bin_weight=1.0, bias=-threshold), UNIT_STATS)
    policy.begin(1, 1)
    decision = policy.step(make_view(attention, step=0))

    expected = (full.ema[0, 0, :, 0] >= threshold).nonzero().flatten().tolist()
    if 63 not in expected:
        expected.append(63)
    assert decision.indices[0, 0].tolist() == expected
    assert 8 <= len(expected) < 64  # a real eviction happened
    state = policy.layer_state(0)
    assert state.ema.shape == (1, 2, len(expected), 17) and state.tail.shape == (1, 2, len(expected), 16)
    # carried narrow: the EMA in bf16 (the golden steps still match), the tail in the bf16 of the attention numerics
    assert state.ema.dtype == EMA_STATE_DTYPE == torch.bfloat16 and state.tail.dtype == torch.bfloat16
    assert torch.equal(state.ema, full.ema[:, :, expected].bfloat16())
    assert torch.equal(state.tail, full.tail[:, :, expected].bfloat16())
    assert policy.state_bytes() == 2 * len(expected) * (17 + 16) * 2
    evicted = sorted(set(range(64)) - set(expected))
    for j in evicted:  # an evicted token's state is gone
        assert not (state.ema == full.ema[0, 0, j]).all(-1).any()


def test_old_token_ema_decays_and_tail_is_carried():
    n0, n1 = 64, 512
    first = causal_attention(1, 1, 0, n0, seed=4)
    first[..., -16:, 3] = 0.0  # token 3 gets no attention from the last 16 queries: zero tail
    policy = NammPolicy(CFG, torch.zeros(4172), UNIT_STATS)
    policy.begin(1, 1)
    policy.step(make_view(first, step=0))
    before = policy.layer_state(0)
    assert torch.equal(before.tail[0, 0, 3], torch.zeros(16)) and (before.tail[0, 0, 5] > 0).all()

    second = causal_attention(1, 1, n0, n1, seed=5)
    second[..., :n0] = 0.0  # the old tokens get no new attention
    policy.step(make_view(second, step=1))
    after = policy.layer_state(0)
    assert after.ema.shape == (1, 1, n0 + n1, 17)
    # token 3: E <- gamma^512 E_prev exactly the decay
    torch.testing.assert_close(after.ema[0, 0, 3].float(), GAMMA**n1 * before.ema[0, 0, 3].float(), rtol=4e-3, atol=0)
    # token 5: its prior tail enters the first frame of the new series
    series = torch.cat([before.tail[0, 0, 5].float(), torch.zeros(n1)])
    first_frame = spectrogram(series, CFG)[0]
    carried = ema_frame_weights(n1 // 16, CFG)[0].float() * first_frame
    expected = (GAMMA**n1 * before.ema[0, 0, 5].float() + carried).bfloat16()
    torch.testing.assert_close(after.ema[0, 0, 5], expected, rtol=4e-3, atol=0)
    assert (carried > 0).any()


def test_members_pick_population_rows():
    population = torch.stack([readout_params(bias=-1.0), torch.zeros(4172)])  # evict all / keep all
    policy = NammPolicy(CFG, population, UNIT_STATS)
    attention = causal_attention(1, 2, 0, 32)
    policy.begin(1, 1)
    assert policy.step(make_view(attention, step=0)).indices.tolist() == [[[31], [31]]]  # default member 0
    policy.set_members(torch.tensor([1]))
    policy.begin(1, 1)
    assert policy.step(make_view(attention, step=0)).kept == 32
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        policy.set_members(torch.tensor([2]))
    policy.set_members(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="set_members gave 2 rows"):
        policy.step(make_view(attention, step=0))


def test_protection_and_cap_from_config():
    attention = causal_attention(1, 1, 0, 32)
    protect = NammConfig(protect_sink=2, protect_prompt_tail=3)
    policy = NammPolicy(protect, readout_params(bias=-1.0), UNIT_STATS)
    policy.begin(1, 1)
    decision = policy.step(make_view(attention, step=0, prompt_length=torch.tensor([20])))
    assert decision.indices.tolist() == [[[0, 1, 17, 18, 19, 31]]]

    capped = NammPolicy(NammConfig(cache_cap=5), readout_params(bias=1.0), UNIT_STATS)
    capped.begin(1, 1)
    assert capped.step(make_view(attention, step=0)).indices.tolist() == [[[0, 1, 2, 3, 31]]]


def test_statistics_mode_accumulates_valid_slots_and_keeps_everything():
    accumulator = StatsAccumulator(17)
    policy = NammPolicy(CFG, accumulator=accumulator)
    policy.begin(2, 2)
    valid = torch.ones(2, 2, 48, dtype=torch.bool)
    valid[1, :, :16] = False  # row 1 left-padded
    emas = []
    for layer in range(2):
        attention = causal_attention(2, 2, 0, 48, seed=10 + layer)
        decision = policy.step(make_view(attention, step=0, valid=valid, layer=layer))
        assert torch.equal(decision.indices, torch.arange(48).expand(2, 2, 48))
        emas.append(spectral_ema_step(attention, None, CFG).ema[valid])
    values = torch.cat(emas).double().numpy()
    stats = accumulator.freeze()
    np.testing.assert_allclose(stats.mean.numpy(), values.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats.var.numpy(), values.var(0), rtol=1e-5)
    assert float(accumulator.count) == 2 * (48 * 2 + 32 * 2)
    # the next step carries the full state (48 old slots)
    policy.step(make_view(causal_attention(2, 2, 48, 16), step=1, valid=torch.ones(2, 2, 64, dtype=torch.bool)))
    assert policy.layer_state(0).ema.shape == (2, 2, 64, 17)


def test_first_step_resets_state_and_mismatches_are_rejected():
    policy = NammPolicy(CFG, torch.zeros(4172), UNIT_STATS)
    with pytest.raises(ValueError, match="before begin"):
        policy.step(make_view(causal_attention(1, 1, 0, 16), step=0))
    policy.begin(1, 1)
    policy.step(make_view(causal_attention(1, 1, 0, 32), step=0))
    with pytest.raises(ValueError, match="old slots"):
        policy.step(make_view(causal_attention(1, 1, 20, 16), step=1))  # 20 old slots, state has 32
    policy.step(make_view(causal_attention(1, 1, 0, 16), step=0))  # a new sequence: state reset
    assert policy.layer_state(0).ema.shape == (1, 1, 16, 17)
    with pytest.raises(ValueError, match="outside the 1 layers"):
        policy.step(make_view(causal_attention(1, 1, 0, 16), step=0, layer=1))
    with pytest.raises(ValueError, match="batch rows"):
        policy.step(make_view(causal_attention(2, 1, 0, 16), step=0))
    with pytest.raises(ValueError, match=r"n_new \(24\)"):
        policy.step(make_view(causal_attention(1, 1, 0, 24), step=0))


def test_constructor_validation():
    with pytest.raises(ValueError, match="params and stats"):
        NammPolicy(CFG, torch.zeros(4172))
    with pytest.raises(ValueError, match="params must be"):
        NammPolicy(CFG, torch.zeros(2, 4000), UNIT_STATS)
    with pytest.raises(ValueError, match="non-finite"):
        NammPolicy(CFG, torch.full((4172,), float("nan")), UNIT_STATS)
    with pytest.raises(ValueError, match="17 features"):
        NammPolicy(CFG, torch.zeros(4172), NormalisationStats(torch.zeros(3), torch.ones(3)))
    with pytest.raises(ValueError, match="takes no params"):
        NammPolicy(CFG, torch.zeros(4172), accumulator=StatsAccumulator(17))
    with pytest.raises(ValueError, match="statistics mode"):
        NammPolicy(CFG, accumulator=StatsAccumulator(17)).set_members(torch.zeros(1, dtype=torch.int64))


def test_keep_bias_moves_retention_monotonically_and_zero_is_unchanged():
    attention = causal_attention(2, 3, 0, 64, seed=5)
    ema = spectral_ema_step(attention, None, CFG).ema[..., 0]
    params = readout_params(bin_weight=1.0, bias=-float(ema.median()))

    def decide(keep_bias=None):
        policy = (NammPolicy(CFG, params, UNIT_STATS) if keep_bias is None
                  else NammPolicy(CFG, params, UNIT_STATS, keep_bias=keep_bias))
        policy.begin(2, 1)
        return policy.step(make_view(attention, step=0))

    default, zero = decide(), decide(0.0)
    assert torch.equal(default.indices, zero.indices) and torch.equal(default.visible, zero.visible)
    spread = float(ema.max() - ema.min())

    def kept_slots(keep_bias):  # visible kept slots summed over rows and heads
        decision = decide(keep_bias)
        return decision.indices.numel() if decision.visible is None else int(decision.visible.sum())

    kept = [kept_slots(bias * spread) for bias in (-2.0, -0.5, -0.1, 0.0, 0.1, 0.5, 2.0)]
    assert kept == sorted(kept) and kept[0] < kept[3] < kept[-1] == 2 * 3 * 64
    assert kept[0] == 2 * 3  # every score below the threshold: only the newest slot


def test_keep_bias_validation():
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="keep_bias must be a finite"):
            NammPolicy(CFG, torch.zeros(4172), UNIT_STATS, keep_bias=bad)
    with pytest.raises(ValueError, match="takes no params"):
        NammPolicy(CFG, accumulator=StatsAccumulator(17), keep_bias=1.0)

"""NAMM features (namm-spec §2) against an independent float64 NumPy computation written here.

The reference builds each token's series (tail + attention column), takes every STFT frame by the explicit
DFT sum, applies the EMA weights with the causal frame mask and the gamma^n_new decay, and computes the
recency embedding from the formula.
"""

import numpy as np
import pytest
import torch

from namm_transfer.namm.config import NammConfig
from namm_transfer.namm.features import (
    NormalisationStats,
    SpectralState,
    StatsAccumulator,
    ema_frame_weights,
    recency_embedding,
    recency_frequencies,
    spectral_ema_step,
    spectrogram,
    token_features,
)

CFG = NammConfig()


# ---------------------------------------------------------------- NumPy float64 reference (namm-spec §2)
def np_stft_frames(series: np.ndarray, n_fft: int = 32, hop: int = 16) -> np.ndarray:
    """(L,) -> (F, n_fft // 2 + 1) magnitudes by the explicit DFT sum with a periodic Hann window."""
    n = np.arange(n_fft)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)
    frames = []
    for start in range(0, len(series) - n_fft + 1, hop):
        seg = series[start : start + n_fft] * window
        bins = [abs(sum(seg[m] * np.exp(-2j * np.pi * k * m / n_fft) for m in n)) for k in range(n_fft // 2 + 1)]
        frames.append(bins)
    return np.array(frames)


def np_ema_step(attn, prev_ema, prev_tail, gamma=0.99, n_fft=32, hop=16):
    """attn (Q, N) for one (row, head); prev_* for the N - Q old tokens or None.

    Returns ema (N, 17) and tail (N, 16)."""
    n_new, slots = attn.shape
    n_old = slots - n_new
    frames_count = n_new // hop
    weights = np.array([(1 - gamma**hop) * gamma ** (hop * (frames_count - 1 - f)) for f in range(frames_count)])
    ema = np.zeros((slots, n_fft // 2 + 1))
    tails = np.zeros((slots, n_fft - hop))
    for j in range(slots):
        old = j < n_old
        tail = prev_tail[j] if (old and prev_tail is not None) else np.zeros(n_fft - hop)
        series = np.concatenate([tail, attn[:, j]])
        frames = np_stft_frames(series, n_fft, hop)
        first = 0 if old else (j - n_old) // hop
        for f in range(first, frames_count):
            ema[j] += weights[f] * frames[f]
        if old and prev_ema is not None:
            ema[j] += gamma**n_new * prev_ema[j]
        tails[j] = series[-(n_fft - hop) :]
    return ema, tails


def np_recency(r, dim=8, base=50000.0):
    half = dim // 2
    freqs = np.array([base ** (-i / half) for i in range(half)])
    angles = np.asarray(r, dtype=np.float64)[..., None] * freqs
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)


def state_of(ema: np.ndarray, tail: np.ndarray) -> SpectralState:
    """(H, N, 17), (H, N, 16) NumPy -> a batch-1 fp32 SpectralState."""
    return SpectralState(torch.from_numpy(ema).float().unsqueeze(0), torch.from_numpy(tail).float().unsqueeze(0))


def hand_made_attention(n_old: int, n_new: int, heads: int = 2, seed: int = 0) -> np.ndarray:
    """(heads, n_new, n_old + n_new): peaked causal pattern; query t sees old tokens and new tokens <= t."""
    rng = np.random.default_rng(seed)
    slots = n_old + n_new
    attn = np.zeros((heads, n_new, slots))
    for h in range(heads):
        for t in range(n_new):
            visible = n_old + t + 1
            row = rng.exponential(size=visible)
            row[0] += 3.0 * (h + 1)  # a sink-like first token
            row[n_old + t] += 2.0  # the query's own token
            attn[h, t, :visible] = row / row.sum()
    return attn


# ---------------------------------------------------------------- spectrogram and EMA
def test_spectrogram_matches_explicit_dft():
    series = np.random.default_rng(1).random((3, 16 + 64))
    out = spectrogram(torch.from_numpy(series).float(), CFG)
    assert out.shape == (3, 4, 17) and out.dtype == torch.float32
    for i in range(3):
        np.testing.assert_allclose(out[i].numpy(), np_stft_frames(series[i]), rtol=1e-5, atol=1e-6)


def test_ema_weights_values():
    w = ema_frame_weights(32, CFG)
    assert w[-1].item() == pytest.approx(1 - 0.99**16) == pytest.approx(0.148542, abs=1e-6)
    assert (w[:-1] / w[1:]).allclose(torch.full((31,), 0.99**16, dtype=torch.float64))
    assert w.sum().item() == pytest.approx(1 - 0.99**512)  # not renormalised


@pytest.mark.parametrize("with_prior", [False, True])
def test_spectral_ema_step_matches_numpy(with_prior):
    n_old, n_new, heads = 3, 64, 2
    attn = hand_made_attention(n_old, n_new, heads)
    rng = np.random.default_rng(2)
    prev_ema = rng.random((heads, n_old, 17)) if with_prior else None
    prev_tail = rng.random((heads, n_old, 16)) * 0.1 if with_prior else None
    previous = state_of(prev_ema, prev_tail) if with_prior else None
    state = spectral_ema_step(torch.from_numpy(attn).float().unsqueeze(0), previous, CFG)
    assert state.ema.shape == (1, heads, n_old + n_new, 17)
    assert state.tail.shape == (1, heads, n_old + n_new, 16)
    for h in range(heads):
        ema, tail = np_ema_step(
            attn[h], None if prev_ema is None else prev_ema[h], None if prev_tail is None else prev_tail[h]
        )
        np.testing.assert_allclose(state.ema[0, h].numpy(), ema, rtol=2e-5, atol=1e-7)
        np.testing.assert_allclose(state.tail[0, h].numpy(), tail, rtol=1e-6, atol=1e-7)
    if with_prior:  # the prior state enters only the old tokens, decayed by gamma^n_new
        no_prior = spectral_ema_step(
            torch.from_numpy(attn).float().unsqueeze(0),
            SpectralState(torch.zeros(1, heads, n_old, 17), previous.tail),
            CFG,
        )
        diff = state.ema - no_prior.ema
        torch.testing.assert_close(diff[:, :, :n_old], 0.99**n_new * previous.ema, rtol=1e-5, atol=1e-7)
        assert torch.equal(diff[:, :, n_old:], torch.zeros_like(diff[:, :, n_old:]))


def test_new_tokens_use_only_frames_from_their_block_on():
    # Attention that is NOT causal: a new token in block b must still ignore frames f < b.
    n_new = 64
    attn = torch.ones(1, 1, n_new, n_new)
    ema = spectral_ema_step(attn, None, CFG).ema[0, 0]
    frames = spectrogram(torch.cat([torch.zeros(n_new, 16), attn[0, 0].T], dim=-1), CFG)  # (N, 4, 17)
    weights = ema_frame_weights(4, CFG).float()
    for t in (0, 15, 16, 40, 63):
        expected = (weights[t // 16 :, None] * frames[t, t // 16 :]).sum(0)
        torch.testing.assert_close(ema[t], expected)


def test_spectral_ema_step_rejects_bad_n_new_and_state():
    with pytest.raises(ValueError, match=r"n_new \(40\)"):
        spectral_ema_step(torch.zeros(1, 1, 40, 40), None, CFG)
    bad = SpectralState(torch.zeros(1, 1, 2, 17), torch.zeros(1, 1, 2, 16))
    with pytest.raises(ValueError, match="old slots"):
        spectral_ema_step(torch.zeros(1, 1, 16, 19), bad, CFG)


# ---------------------------------------------------------------- recency
def test_recency_frequencies_and_embedding():
    np.testing.assert_allclose(recency_frequencies(CFG).numpy(), [1, 0.066874, 0.0044721, 0.00029907], rtol=5e-5)
    r = torch.tensor([[0, 1, 7, 1000, 32768]])
    emb = recency_embedding(r, CFG)
    assert emb.shape == (1, 5, 8) and emb.dtype == torch.float32
    np.testing.assert_allclose(emb.numpy(), np_recency(r.numpy()).astype(np.float32), rtol=0, atol=1e-7)
    assert torch.equal(emb[0, 0], torch.tensor([0.0] * 4 + [1.0] * 4))


def test_recency_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="max_recency=32768"):
        recency_embedding(torch.tensor([32769]), CFG)
    with pytest.raises(ValueError, match="recency must lie"):
        recency_embedding(torch.tensor([-1]), CFG)


# ---------------------------------------------------------------- full feature vector
def test_token_features_match_numpy():
    n_old, n_new, heads = 3, 64, 2
    attn = hand_made_attention(n_old, n_new, heads, seed=5)
    old_positions = np.array([[0, 5, 40], [1, 20, 41]])
    positions = np.concatenate([old_positions, np.tile(np.arange(64, 128), (heads, 1))], axis=1)
    rng = np.random.default_rng(6)
    prev_ema, prev_tail = rng.random((heads, n_old, 17)), rng.random((heads, n_old, 16)) * 0.1
    mean, var = rng.random(17) * 0.05, rng.random(17) * 0.01
    var[3] = 0.0  # std clamped to 1e-7

    state = spectral_ema_step(
        torch.from_numpy(attn).float().unsqueeze(0),
        state_of(prev_ema, prev_tail),
        CFG,
    )
    stats = NormalisationStats(torch.from_numpy(mean).float(), torch.from_numpy(var).float())
    feats = token_features(state, torch.from_numpy(positions).unsqueeze(0), stats, CFG)
    assert feats.shape == (1, heads, n_old + n_new, 25)
    for h in range(heads):
        ema, _ = np_ema_step(attn[h], prev_ema[h], prev_tail[h])
        recency = np_recency(positions[h, -1] - positions[h])
        np.testing.assert_allclose(feats[0, h, :, :8].numpy(), recency, atol=1e-6)
        std = np.maximum(np.sqrt(var.astype(np.float32)), 1e-7)
        normalised = (ema - mean.astype(np.float32)) / std
        ok = np.arange(17) != 3
        np.testing.assert_allclose(feats[0, h, :, 8:][:, ok].numpy(), normalised[:, ok], rtol=1e-4, atol=1e-4)
        # var 0: the std is clamped to 1e-7, so the feature is (E - mu) * 1e7.
        np.testing.assert_allclose(feats[0, h, :, 8 + 3].numpy() * 1e-7, ema[:, 3] - mean[3], rtol=1e-5, atol=1e-7)


def test_token_features_clamp_ages_beyond_the_table():
    """A protected sink token 40,000 tokens old gets the embedding of the largest age (the official table's last
    row) instead of an error (issue 6, fix 6; namm-spec pitfall 11)."""
    positions = torch.tensor([[[0, 7232, 40000]]])
    state = SpectralState(ema=torch.zeros(1, 1, 3, 17), tail=torch.zeros(1, 1, 3, 16))
    stats = NormalisationStats(torch.zeros(17), torch.ones(17))
    feats = token_features(state, positions, stats, CFG)
    expected = recency_embedding(torch.tensor([32768, 32768, 0]), CFG)
    assert torch.equal(feats[0, 0, :, :8], expected)


# ---------------------------------------------------------------- normalisation statistics
def test_normalisation_stats_validation():
    with pytest.raises(ValueError, match="matching 1-D"):
        NormalisationStats(torch.zeros(17), torch.zeros(16))
    with pytest.raises(ValueError, match=">= 0"):
        NormalisationStats(torch.zeros(2), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="finite"):
        NormalisationStats(torch.tensor([float("nan")]), torch.ones(1))


def test_accumulator_masked_mean_population_variance_and_merge():
    rng = np.random.default_rng(3)
    chunks = [rng.normal(size=(2, 3, 5, 4)) * (i + 1) + i for i in range(3)]
    masks = [rng.random((2, 3, 5)) > 0.3 for _ in range(3)]
    acc = StatsAccumulator(4)
    for values, mask in zip(chunks, masks):
        acc.update(torch.from_numpy(values).float(), torch.from_numpy(mask))
    selected = np.concatenate([v[m] for v, m in zip(chunks, masks)]).astype(np.float32).astype(np.float64)
    frozen = acc.freeze()
    np.testing.assert_allclose(frozen.mean.numpy(), selected.mean(0), rtol=1e-6)
    np.testing.assert_allclose(frozen.var.numpy(), selected.var(0), rtol=1e-6)  # ddof 0
    assert float(acc.count) == len(selected)

    # Two "ranks" merged (object merge and packed tensors) equal one accumulator over everything.
    a, b = StatsAccumulator(4), StatsAccumulator(4)
    a.update(torch.from_numpy(chunks[0]).float(), torch.from_numpy(masks[0]))
    for values, mask in zip(chunks[1:], masks[1:]):
        b.update(torch.from_numpy(values).float(), torch.from_numpy(mask))
    packed = torch.stack([a.to_tensor(), b.to_tensor()])
    assert packed.shape == (2, 9)
    merged = StatsAccumulator.from_tensor(packed)
    a.merge(b)
    for result in (a, merged):
        torch.testing.assert_close(result.to_tensor(), acc.to_tensor(), rtol=1e-10, atol=1e-10)


def test_accumulator_empty_update_is_neutral_and_freeze_needs_data():
    acc = StatsAccumulator(2)
    with pytest.raises(ValueError, match="no values"):
        acc.freeze()
    acc.update(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
    acc.update(torch.tensor([[100.0, 100.0]]), torch.tensor([False]))
    stats = acc.freeze()
    assert torch.equal(stats.mean, torch.tensor([2.0, 4.0]))
    assert torch.equal(stats.var, torch.tensor([1.0, 4.0]))
    with pytest.raises(ValueError, match="end in 2 features"):
        acc.update(torch.zeros(3, 3))

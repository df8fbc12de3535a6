"""BAM scorer (namm-spec §3): parameter layout, zero init, and the batched population path against a
dense float64 reference written here (explicit backward-masked softmax, one row at a time)."""

import math

import numpy as np
import pytest
import torch

from namm_transfer.namm.config import NammConfig
from namm_transfer.namm.scorer import BamWeights, bam_scores, flatten_params, unflatten_params, weight_shapes
from namm_transfer.namm.selection import select_tokens

CFG = NammConfig()


def reference_scores(x: np.ndarray, theta: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """x (N, 25), theta (4172,), valid (N,) -> (N,) scores, float64, following namm-spec §3.1 literally."""
    d, h = 25, 32
    w_qkv = theta[0:2400].reshape(25, 96)  # input index outer
    b_qkv = theta[2400:2496]
    w_o = theta[2496:4096].reshape(32, 50)
    b_o = theta[4096:4146]
    w = theta[4146:4171]
    b = theta[4171]
    qkv = x @ w_qkv + b_qkv
    q, k, v = qkv[:, :h], qkv[:, h : 2 * h], qkv[:, 2 * h :]
    n = len(x)
    out = np.zeros((n, h))
    for i in range(n):
        allowed = [j for j in range(n) if j >= i and valid[j]]
        logits = np.array([q[i] @ k[j] / math.sqrt(h) for j in allowed])
        p = np.exp(logits - logits.max())
        p /= p.sum()
        out[i] = sum(pj * v[j] for pj, j in zip(p, allowed))
    z = out @ w_o + b_o
    r, m = z[:, :d], z[:, d:]
    hidden = x * (1 + m) + r
    return hidden @ w + b


def test_parameter_count_and_layout():
    assert CFG.num_params == 4172
    assert sum(math.prod(s) for s in weight_shapes(CFG).values()) == 4172
    w = unflatten_params(torch.arange(4172, dtype=torch.float32), CFG)
    assert w.w_qkv.shape == (1, 25, 96) and w.w_o.shape == (1, 32, 50)
    assert w.w_qkv[0, 3, 7] == 3 * 96 + 7  # row-major, input index outer
    assert w.w_qkv[0, 24, 95] == 2399
    assert torch.equal(w.b_qkv[0], torch.arange(2400, 2496, dtype=torch.float32))
    assert w.w_o[0, 0, 0] == 2496 and w.w_o[0, 5, 11] == 2496 + 5 * 50 + 11 and w.w_o[0, 31, 49] == 4095
    assert torch.equal(w.b_o[0], torch.arange(4096, 4146, dtype=torch.float32))
    assert torch.equal(w.w_out[0], torch.arange(4146, 4171, dtype=torch.float32))
    assert w.b_out[0] == 4171


def test_flatten_roundtrip_with_population():
    params = torch.randn(3, 4172)
    weights = unflatten_params(params, CFG)
    assert isinstance(weights, BamWeights) and weights.b_out.shape == (3,)
    assert torch.equal(flatten_params(weights), params)


def test_zero_params_score_exactly_zero_and_keep_everything():
    features = torch.randn(2, 3, 11, 25) * 10
    valid = torch.ones(2, 3, 11, dtype=torch.bool)
    valid[1, :, :2] = False
    scores = bam_scores(features, torch.zeros(4172), torch.zeros(2, dtype=torch.int64), CFG, valid)
    assert torch.equal(scores, torch.zeros(2, 3, 11))
    kept = select_tokens(scores, torch.ones_like(valid)).indices
    assert torch.equal(kept, torch.arange(11).expand(2, 3, 11))


def test_batched_population_matches_dense_reference():
    gen = torch.Generator().manual_seed(0)
    population = torch.randn(3, 4172, generator=gen, dtype=torch.float64) * 0.2
    features = torch.randn(3, 2, 7, 25, generator=gen, dtype=torch.float64)
    member = torch.tensor([2, 0, 2])
    valid = torch.ones(3, 2, 7, dtype=torch.bool)
    valid[0, :, :2] = False  # left padding
    valid[2, 1, 3] = False  # a hole in the middle
    scores = bam_scores(features.float(), population.float(), member, CFG, valid)
    assert scores.shape == (3, 2, 7) and scores.dtype == torch.float32
    for b in range(3):
        for h in range(2):
            expected = reference_scores(features[b, h].numpy(), population[member[b]].numpy(), valid[b, h].numpy())
            np.testing.assert_allclose(scores[b, h].numpy(), expected, rtol=1e-4, atol=1e-4)


def test_backward_mask_and_padding_keys():
    gen = torch.Generator().manual_seed(1)
    params = torch.randn(4172, generator=gen) * 0.3
    member = torch.zeros(1, dtype=torch.int64)
    features = torch.randn(1, 1, 6, 25, generator=gen)
    valid = torch.ones(1, 1, 6, dtype=torch.bool)
    valid[0, 0, 2] = False
    base = bam_scores(features, params, member, CFG, valid)

    older = features.clone()
    older[0, 0, 3] += 5.0  # token 3 is seen only by tokens 0..3
    changed = bam_scores(older, params, member, CFG, valid)
    assert torch.equal(changed[..., 4:], base[..., 4:])
    assert not torch.allclose(changed[..., :4], base[..., :4])

    padded = features.clone()
    padded[0, 0, 2] += 5.0  # an invalid key is never attended to
    changed = bam_scores(padded, params, member, CFG, valid)
    keep = torch.tensor([True, True, False, True, True, True])
    torch.testing.assert_close(changed[..., keep], base[..., keep])


def test_member_selects_population_row():
    gen = torch.Generator().manual_seed(2)
    population = torch.randn(2, 4172, generator=gen) * 0.2
    features = torch.randn(1, 2, 5, 25, generator=gen)
    mixed = bam_scores(features, population, torch.tensor([1]), CFG)
    alone = bam_scores(features, population[1], torch.tensor([0]), CFG)
    torch.testing.assert_close(mixed, alone)


def test_bad_inputs_are_rejected():
    features = torch.zeros(1, 1, 3, 25)
    member = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="params must be"):
        bam_scores(features, torch.zeros(4171), member, CFG)
    with pytest.raises(ValueError, match="features must be"):
        bam_scores(torch.zeros(1, 1, 3, 24), torch.zeros(4172), member, CFG)
    with pytest.raises(ValueError, match="member must be"):
        bam_scores(features, torch.zeros(4172), torch.zeros(2, dtype=torch.int64), CFG)
    with pytest.raises(ValueError, match="valid"):
        bam_scores(features, torch.zeros(4172), member, CFG, torch.ones(1, 1, 4, dtype=torch.bool))

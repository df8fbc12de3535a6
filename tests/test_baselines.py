"""Hand-made eviction rules (namm_transfer/namm/baselines.py) driven through hand-built LayerViews."""

from collections import defaultdict

import pytest
import torch

from namm_transfer.namm.baselines import (
    BASELINES, FullCachePolicy, H2OPolicy, L2NormPolicy, RandomPolicy, RecencyPolicy, make_baseline,
)
from namm_transfer.namm.budget import FixedRatioBudget, MatchedBudget, RetentionRecord
from namm_transfer.namm.interface import EvictionPolicy, LayerView
from namm_transfer.namm.selection import keep_top


def random_attention(valid: torch.Tensor, n_new: int, generator: torch.Generator) -> torch.Tensor:
    """(B, H, n_new, N) softmax attention of the newest n_new queries: causal, padding keys masked, zero rows
    for queries that see no valid key."""
    b, h, n = valid.shape
    query_slot = torch.arange(n - n_new, n).view(-1, 1)
    allowed = (torch.arange(n).view(1, -1) <= query_slot) & valid.unsqueeze(2)
    logits = torch.randn(b, h, n_new, n, generator=generator).masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def run(policy, *, steps=4, batch=2, heads=3, n_new=8, dim=4, pad=0, seed=0, layer=0):
    """Drive ``policy`` over ``steps`` policy steps of one layer, gathering the cache with each decision.

    Row 0 starts with ``pad`` padding tokens (left padding). Yields (view, decision) per step.
    """
    generator = torch.Generator().manual_seed(seed)
    token_index = torch.zeros(batch, heads, 0, dtype=torch.int64)
    keys = torch.zeros(batch, heads, 0, dim)
    valid = torch.zeros(batch, heads, 0, dtype=torch.bool)
    policy.begin(batch, layer + 1)
    for step in range(steps):
        new_index = torch.arange(step * n_new, (step + 1) * n_new).expand(batch, heads, n_new)
        new_valid = torch.ones(batch, heads, n_new, dtype=torch.bool)
        new_valid[0, :, :] = new_index[0] >= pad
        token_index = torch.cat([token_index, new_index], dim=-1)
        keys = torch.cat([keys, torch.randn(batch, heads, n_new, dim, generator=generator)], dim=-2)
        valid = torch.cat([valid, new_valid], dim=-1)
        attention = random_attention(valid, n_new, generator)
        view = LayerView(layer=layer, step=step, arrival=token_index, attendable=valid, n_new=n_new, keys=keys,
                         attention_fn=lambda a=attention: a)
        decision = policy.step(view)
        yield view, decision
        token_index = token_index.gather(-1, decision.indices)
        valid = valid.gather(-1, decision.indices)
        keys = keys.gather(-2, decision.indices.unsqueeze(-1).expand(-1, -1, -1, dim))


MATCHED = {(0, 0): 5, (1, 0): 9, (2, 0): 4, (3, 0): 12}  # N per step: 8, 13, 17, 12 with n_new = 8
POLICIES = {
    "h2o": lambda budget: H2OPolicy(budget),
    "l2": lambda budget: L2NormPolicy(budget),
    "recency": lambda budget: RecencyPolicy(budget, sink=2),
    "random": lambda budget: RandomPolicy(budget, seed=3),
}
BUDGETS = {
    "ratio0.5": lambda: FixedRatioBudget(0.5),
    "ratio0.25": lambda: FixedRatioBudget(0.25),
    "matched": lambda: MatchedBudget(MATCHED),
}


@pytest.mark.parametrize("budget_name", sorted(BUDGETS))
@pytest.mark.parametrize("policy_name", sorted(POLICIES))
def test_every_baseline_hits_its_budget_keeps_newest_and_sorts(policy_name, budget_name):
    budget = BUDGETS[budget_name]()
    policy = POLICIES[policy_name](budget)
    for view, decision in run(policy, pad=3):
        b, h, n = view.arrival.shape
        k = budget.tokens(view)
        assert decision.indices.shape == (b, h, k) and decision.indices.dtype == torch.int64
        if budget_name == "matched":
            assert decision.kept == MATCHED[(view.step, view.layer)]
        assert (decision.indices.diff(dim=-1) > 0).all()
        assert (decision.indices[..., -1] == n - 1).all()
        # padding only fills what the real tokens cannot
        kept_valid = view.attendable.gather(-1, decision.indices).sum(-1)
        assert torch.equal(kept_valid, view.attendable.sum(-1).clamp(max=k))


def test_matched_budget_from_a_retention_log_reproduces_the_counts():
    log = [RetentionRecord(0, 0, 8, 5), RetentionRecord(1, 0, 13, 9), RetentionRecord(2, 0, 17, 4),
           RetentionRecord(3, 0, 12, 12)]
    budget = MatchedBudget.from_retention(log)
    for name, make in POLICIES.items():
        kept = [decision.kept for _, decision in run(make(budget))]
        assert kept == list(MATCHED.values()), name


def test_h2o_matches_a_reference_of_accumulated_attention_per_token():
    budget = FixedRatioBudget(0.5)
    totals = defaultdict(float)  # (row, head, token) -> attention summed over every query so far
    for view, decision in run(H2OPolicy(budget), steps=5, batch=2, heads=2, n_new=8, seed=7):
        attention = view.attention().double().sum(dim=2)
        b, h, n = view.arrival.shape
        k = budget.tokens(view)
        recent = k // 2
        for row in range(b):
            for head in range(h):
                tokens = view.arrival[row, head].tolist()
                for slot, token in enumerate(tokens):
                    totals[row, head, token] += attention[row, head, slot].item()
                forced = set(tokens[n - max(recent, 1):])
                rest = sorted(set(tokens) - forced, key=lambda t: -totals[row, head, t])
                expected = sorted(forced | set(rest[: k - len(forced)]))
                kept = view.arrival[row, head, decision.indices[row, head]].tolist()
                assert kept == expected, (view.step, row, head)


def test_h2o_carries_totals_with_the_kept_tokens():
    policy = H2OPolicy(MatchedBudget({(0, 0): 4, (1, 0): 4}))
    policy.begin(1, 1)
    first = torch.zeros(1, 1, 8, 8)
    first[..., 1] = 1.0  # token 1: total 8
    first[..., 3] = 0.5  # token 3: total 4
    index = torch.arange(8).view(1, 1, 8)
    view = LayerView(0, 0, index, torch.ones(1, 1, 8, dtype=torch.bool), 8, torch.zeros(1, 1, 8, 2), lambda: first)
    decision = policy.step(view)
    kept = index.gather(-1, decision.indices)
    assert kept.flatten().tolist() == [1, 3, 6, 7]  # heavy hitters 1, 3 + recent window 6, 7
    second = torch.zeros(1, 1, 4, 8)
    second[..., 2] = 1.25  # token 6: total 5
    second[..., 1] = 0.15  # token 3: total 4.6 (0.6 without the carried 4)
    index = torch.cat([kept, torch.arange(8, 12).view(1, 1, 4)], dim=-1)
    view = LayerView(0, 1, index, torch.ones(1, 1, 8, dtype=torch.bool), 4, torch.zeros(1, 1, 8, 2), lambda: second)
    decision = policy.step(view)
    # token 1 (8, all from step 0) and token 6 (5) beat token 3 (4.6); recent window 10, 11
    assert index.gather(-1, decision.indices).flatten().tolist() == [1, 6, 10, 11]


def test_h2o_refuses_a_later_step_without_state():
    policy = H2OPolicy(FixedRatioBudget(0.5))
    policy.begin(1, 1)
    view = LayerView(0, 1, torch.arange(8).view(1, 1, 8), torch.ones(1, 1, 8, dtype=torch.bool), 4,
                     torch.zeros(1, 1, 8, 2), lambda: torch.full((1, 1, 4, 8), 0.1))
    with pytest.raises(ValueError, match="no accumulated attention for layer 0 at step 1"):
        policy.step(view)
    steps = run(policy, steps=2)
    next(steps)
    policy.begin(2, 1)  # a new batch drops the state: the next step of the old sequence is refused
    with pytest.raises(ValueError, match="no accumulated attention"):
        next(steps)


def test_h2o_refuses_state_of_the_wrong_size():
    policy = H2OPolicy(FixedRatioBudget(0.5))
    steps = run(policy, steps=2)
    next(steps)  # keeps 4 of 8 slots
    view = LayerView(0, 1, torch.arange(12).expand(2, 3, 12), torch.ones(2, 3, 12, dtype=torch.bool), 4,
                     torch.zeros(2, 3, 12, 2), lambda: torch.full((2, 3, 4, 12), 0.1))
    with pytest.raises(ValueError, match=r"state of layer 0 has shape \(2, 3, 4\), but the view holds \(2, 3, 8\)"):
        policy.step(view)


def test_l2_keeps_the_lowest_norm_keys_and_the_newest():
    torch.manual_seed(0)
    norms = torch.stack([torch.randperm(10).float() + 1.0 for _ in range(2)]).view(1, 2, 10)
    norms[..., -1] = 100.0  # the newest token has the largest norm and is kept anyway
    directions = torch.nn.functional.normalize(torch.randn(1, 2, 10, 6), dim=-1)
    view = LayerView(0, 0, torch.arange(10).expand(1, 2, 10), torch.ones(1, 2, 10, dtype=torch.bool), 10,
                     directions * norms.unsqueeze(-1), lambda: pytest.fail("L2 must not read attention"))
    decision = L2NormPolicy(MatchedBudget({(0, 0): 4})).step(view)
    for head in range(2):
        lowest = torch.argsort(norms[0, head, :-1])[:3].tolist()
        assert decision.indices[0, head].tolist() == sorted(lowest) + [9]


def test_recency_keeps_sinks_and_the_most_recent_window():
    budget = FixedRatioBudget(0.75)
    for view, decision in run(RecencyPolicy(budget, sink=4), steps=4, n_new=8):
        seen = int(view.arrival.max()) + 1
        k = budget.tokens(view)
        expected = list(range(4)) + list(range(seen - (k - 4), seen))
        kept = view.arrival.gather(-1, decision.indices)
        assert (kept == torch.tensor(expected)).all(), view.step


def test_recency_sinks_skip_left_padding_and_small_budgets_keep_the_earliest_sinks():
    budget = FixedRatioBudget(0.75)
    for view, decision in run(RecencyPolicy(budget, sink=2), steps=3, n_new=8, pad=3):
        for row, first_real in ((0, [3, 4]), (1, [0, 1])):  # row 0 starts with 3 padding tokens
            for head in range(view.num_heads):
                slots = decision.indices[row, head]
                real = view.arrival[row, head, slots][view.attendable[row, head, slots]]
                assert real[:2].tolist() == first_real, (view.step, row, head)
    view, decision = next(run(RecencyPolicy(MatchedBudget({(0, 0): 3}), sink=4), steps=1))
    assert (decision.indices == torch.tensor([0, 1, 7])).all()


def test_random_is_deterministic_per_seed_and_differs_across_seeds_and_layers():
    budget = FixedRatioBudget(0.5)

    def kept(seed, layer=0):
        return [decision.indices for _, decision in run(RandomPolicy(budget, seed=seed), layer=layer)]

    same = kept(5)
    assert all(torch.equal(a, b) for a, b in zip(same, kept(5)))
    assert not all(torch.equal(a, b) for a, b in zip(same, kept(6)))
    assert not all(torch.equal(a, b) for a, b in zip(same, kept(5, layer=1)))


def test_full_cache_keeps_every_slot():
    for view, decision in run(FullCachePolicy(), steps=3, pad=2):
        b, h, n = view.arrival.shape
        assert torch.equal(decision.indices, torch.arange(n).expand(b, h, n))
    assert view.num_slots == 24


def test_keep_top_ranks_newest_then_forced_then_valid_then_padding():
    scores = torch.tensor([5.0, 1.0, 4.0, 3.0, 2.0]).view(1, 1, 5)
    valid = torch.ones(1, 1, 5, dtype=torch.bool)
    assert keep_top(scores, 3, valid).indices.flatten().tolist() == [0, 2, 4]
    forced = torch.tensor([False, True, False, False, False]).view(1, 1, 5)
    assert keep_top(scores, 3, valid, forced).indices.flatten().tolist() == [0, 1, 4]
    padded = torch.tensor([False, True, True, True, True]).view(1, 1, 5)
    assert keep_top(scores, 3, padded).indices.flatten().tolist() == [2, 3, 4]
    assert keep_top(scores, 5, padded).indices.flatten().tolist() == [0, 1, 2, 3, 4]
    # a forced padding slot is not forced; ties go to the lower slot index
    assert keep_top(torch.zeros(1, 1, 5), 3, padded, ~padded).indices.flatten().tolist() == [1, 2, 4]


@pytest.mark.parametrize(
    "scores, k, message",
    [(torch.zeros(1, 1, 4), 0, "cannot keep 0 of 4"), (torch.zeros(1, 1, 4), 5, "cannot keep 5 of 4"),
     (torch.tensor([[[0.0, float("nan"), 1.0, 2.0]]]), 2, "NaN"), (torch.zeros(1, 4), 2, "must both be")],
)
def test_keep_top_rejects_bad_input(scores, k, message):
    with pytest.raises(ValueError, match=message):
        keep_top(scores, k, torch.ones(scores.shape, dtype=torch.bool))


def test_registry_builds_every_baseline_behind_the_policy_protocol():
    budget = FixedRatioBudget(0.5)
    assert sorted(BASELINES) == ["full", "h2o", "l2", "random", "recency"]
    for name in BASELINES:
        policy = make_baseline(name, None if name == "full" else budget)
        assert isinstance(policy, EvictionPolicy) and policy.name == name
    assert make_baseline("recency", budget, sink=7).sink == 7
    with pytest.raises(ValueError, match="unknown baseline 'snapkv'; known: full, h2o, l2, random, recency"):
        make_baseline("snapkv", budget)
    with pytest.raises(ValueError, match="'l2' needs a budget"):
        make_baseline("l2")
    with pytest.raises(ValueError, match="takes no budget"):
        make_baseline("full", budget)
    with pytest.raises(ValueError, match="baseline 'random'"):
        make_baseline("random", budget, sink=3)


@pytest.mark.parametrize(
    "build, message",
    [(lambda b: H2OPolicy(b, recent_fraction=1.5), "recent_fraction"), (lambda b: RecencyPolicy(b, sink=-1), "sink"),
     (lambda b: RandomPolicy(b, seed=-1), "seed")],
)
def test_baseline_settings_are_validated(build, message):
    with pytest.raises(ValueError, match=message):
        build(FixedRatioBudget(0.5))

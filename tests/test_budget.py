"""Budgets of the hand-made eviction rules (namm_transfer/namm/budget.py)."""

import math

import pytest
import torch

from namm_transfer.namm.budget import Budget, FixedRatioBudget, MatchedBudget, RetentionRecord
from namm_transfer.namm.interface import LayerView


def view_of(token_index: list[int], *, step: int = 0, layer: int = 0, batch: int = 1, heads: int = 2) -> LayerView:
    """A LayerView whose slots hold the given absolute token indices (same for every row and head)."""
    index = torch.tensor(token_index, dtype=torch.int64).expand(batch, heads, -1).contiguous()
    n = index.shape[-1]
    return LayerView(
        layer=layer, step=step, arrival=index, attendable=torch.ones(batch, heads, n, dtype=torch.bool),
        n_new=min(4, n), keys=torch.zeros(batch, heads, n, 2), attention_fn=lambda: torch.zeros(0),
    )


@pytest.mark.parametrize(
    "ratio, seen, expected",
    [(0.25, 1024, 256), (0.5, 7, 4), (0.3, 10, 3), (0.35, 20, 7), (0.7, 10, 7), (1.0, 13, 13), (0.01, 3, 1)],
)
def test_fixed_ratio_is_ceil_of_ratio_times_tokens_seen(ratio, seen, expected):
    view = view_of(list(range(seen)))
    assert FixedRatioBudget(ratio).tokens(view) == expected


def test_fixed_ratio_counts_evicted_tokens_and_clamps_to_slots():
    # 100 slots survive out of 1000 tokens seen: half of the tokens seen is more than the layer holds.
    survivors = list(range(0, 1000, 10))
    assert FixedRatioBudget(0.5).tokens(view_of(survivors[:-1] + [999])) == 100
    assert FixedRatioBudget(0.05).tokens(view_of(survivors[:-1] + [999])) == 50


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, math.nan])
def test_fixed_ratio_rejects_ratios_outside_unit_interval(ratio):
    with pytest.raises(ValueError, match="ratio must be in"):
        FixedRatioBudget(ratio)


def test_matched_budget_replays_counts_per_step_and_layer():
    budget = MatchedBudget({(0, 0): 5, (0, 1): 7, (1, 0): 3})
    assert budget.tokens(view_of(list(range(10)), step=0, layer=0)) == 5
    assert budget.tokens(view_of(list(range(10)), step=0, layer=1)) == 7
    assert budget.tokens(view_of(list(range(10)), step=1, layer=0)) == 3
    # clamped to the slots the layer holds
    assert budget.tokens(view_of(list(range(6)), step=0, layer=1)) == 6


def test_matched_budget_missing_key_names_step_and_layer():
    budget = MatchedBudget({(0, 0): 5})
    with pytest.raises(ValueError, match="no recorded count for step 2, layer 3"):
        budget.tokens(view_of(list(range(10)), step=2, layer=3))


def test_matched_budget_extends_past_the_recorded_steps_with_the_last_share():
    """A baseline answering longer than the NAMM: past a layer's last recorded step it keeps the share of tokens seen
    the NAMM held at that step, and says which steps it extended (issue 6, fix 4)."""
    log = [RetentionRecord(0, 0, 512, 400, 512), RetentionRecord(1, 0, 912, 600, 1024),
           RetentionRecord(0, 1, 512, 256, 512)]
    budget = MatchedBudget.from_retention(log)
    assert budget.last_shares == {0: 600 / 1024, 1: 0.5} and budget.extended_steps == 0
    assert budget.tokens(view_of(list(range(1024)), step=1, layer=0)) == 600  # recorded: replayed
    # step 2 of layer 0 at 1536 tokens seen: ceil(600 / 1024 * 1536) = 900
    assert budget.tokens(view_of(list(range(1536)), step=2, layer=0)) == 900
    assert budget.tokens(view_of(list(range(1536)), step=2, layer=1)) == 768
    assert budget.tokens(view_of(list(range(1536)), step=2, layer=1)) == 768  # asked again: still one extension
    assert budget.extended == {(2, 0), (2, 1)} and budget.extended_steps == 2
    with pytest.raises(ValueError, match="no recorded count for step 0, layer 2"):  # a layer never recorded
        budget.tokens(view_of(list(range(10)), step=0, layer=2))
    with pytest.raises(ValueError, match="share of layer 0"):
        MatchedBudget({(0, 0): 1}, {0: 1.5})


def test_matched_budget_without_tokens_seen_cannot_extend():
    budget = MatchedBudget.from_retention([RetentionRecord(0, 0, 512, 400)])
    with pytest.raises(ValueError, match="no recorded count for step 1, layer 0"):
        budget.tokens(view_of(list(range(1024)), step=1, layer=0))


@pytest.mark.parametrize("counts", [{}, {(0, 0): 0}, {(-1, 0): 3}, {(0,): 3}, {"a": 3}, {(0, 0): 2.5}])
def test_matched_budget_rejects_bad_counts(counts):
    with pytest.raises(ValueError, match="MatchedBudget"):
        MatchedBudget(counts)


def test_matched_budget_from_retention_log():
    log = [RetentionRecord(0, 0, 512, 400), RetentionRecord(0, 1, 512, 300), RetentionRecord(1, 0, 912, 600),
           RetentionRecord(1, 0, 912, 600)]  # a repeated identical entry (e.g. a second batch) is fine
    budget = MatchedBudget.from_retention(log)
    assert budget.counts == {(0, 0): 400, (0, 1): 300, (1, 0): 600}
    with pytest.raises(ValueError, match="conflicting counts for step 1, layer 0: 600 and 601"):
        MatchedBudget.from_retention(log + [RetentionRecord(1, 0, 912, 601)])


@pytest.mark.parametrize(
    "fields, message",
    [((-1, 0, 5, 3), "step and layer"), ((0, 0, 0, 1), "slots_before"), ((0, 0, 5, 6), "kept must be in"),
     ((0, 0, 5, 0), "kept must be in"), ((0, 0, 5, 3, 4), "tokens_seen must be >= slots_before")],
)
def test_retention_record_validates(fields, message):
    with pytest.raises(ValueError, match=message):
        RetentionRecord(*fields)


def test_budgets_follow_the_protocol():
    assert isinstance(FixedRatioBudget(0.5), Budget)
    assert isinstance(MatchedBudget({(0, 0): 1}), Budget)

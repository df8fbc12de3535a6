"""Binary selection with count alignment (namm-spec §4) and protected slots."""

import pytest
import torch

from namm_transfer.namm.interface import KeepDecision
from namm_transfer.namm.selection import protected_slots, select_tokens

INF = float("inf")


def scores_of(*rows):
    """One batch row, one head per given list: (1, H, N)."""
    return torch.tensor([list(r) for r in rows], dtype=torch.float32).unsqueeze(0)


def all_valid(scores):
    return torch.ones_like(scores, dtype=torch.bool)


def test_threshold_keeps_ties_and_the_newest_slot():
    s = scores_of([0.0, -1e-6, 2.0, -3.0, -5.0])
    decision = select_tokens(s, all_valid(s))
    assert isinstance(decision, KeepDecision)
    assert decision.indices.tolist() == [[[0, 2, 4]]]  # 0.0 kept (>=), newest kept despite -5
    assert decision.indices.dtype == torch.int64
    assert select_tokens(s, all_valid(s), threshold=1.0).indices.tolist() == [[[2, 4]]]


def test_count_alignment_pads_with_top_scoring_negatives():
    s = scores_of([1.0, 2.0, 3.0, -1.0, 0.5, -9.0], [-4.0, -0.5, -2.0, -0.1, -3.0, -9.0])
    decision = select_tokens(s, all_valid(s))
    # head 0 passes 4 slots (0, 1, 2, 4) plus the newest -> K = 5; head 1 passes only the newest and
    # fills with its 4 best negatives (-0.1, -0.5, -2.0, -3.0), re-sorted chronologically.
    assert decision.kept == 5
    assert decision.indices.tolist() == [[[0, 1, 2, 4, 5], [1, 2, 3, 4, 5]]]


def test_alignment_spans_batch_rows_and_is_ascending():
    s = torch.randn(3, 4, 50, generator=torch.Generator().manual_seed(0))
    decision = select_tokens(s, all_valid(s))
    counts = ((s >= 0) | (torch.arange(50) == 49)).sum(-1)
    assert decision.kept == int(counts.max())
    assert (decision.indices.diff(dim=-1) > 0).all()
    # each (row, head) keeps exactly its top-K
    for b in range(3):
        for h in range(4):
            ranked = s[b, h].clone()
            ranked[49] = INF
            top = set(ranked.topk(decision.kept).indices.tolist())
            assert set(decision.indices[b, h].tolist()) == top


def test_invalid_slots_never_chosen_when_enough_valid_ones_exist():
    s = scores_of([9.0, 9.0, -1.0, -2.0, 1.0, 0.0], [9.0, -3.0, -2.0, -1.0, -4.0, -5.0])
    valid = all_valid(s)
    valid[0, :, :2] = False  # padding with high scores
    decision = select_tokens(s, valid)
    assert decision.indices.tolist() == [[[4, 5], [3, 5]]]
    # too few valid slots: invalid ones are used as fillers, oldest first (stable tie-break on -inf)
    valid[0, 1, :5] = False
    decision = select_tokens(s, valid)
    assert decision.indices.tolist() == [[[4, 5], [0, 5]]]


def test_nan_scores_are_evicted():
    s = scores_of([float("nan"), 1.0, float("nan"), -1.0])
    assert select_tokens(s, all_valid(s)).indices.tolist() == [[[1, 3]]]


def test_deterministic_ties_prefer_older_slots():
    s = scores_of([5.0, 5.0, 5.0, 5.0], [-1.0, -1.0, -1.0, -1.0])
    # above every score only the forced newest slot passes, so K = 1
    assert select_tokens(s, all_valid(s), threshold=6.0).indices.tolist() == [[[3], [3]]]
    s = scores_of([1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, 1.0])
    assert select_tokens(s, all_valid(s), cap=2).indices.tolist() == [[[0, 3], [0, 3]]]


def test_cap_takes_top_then_thresholds():
    s = scores_of([3.0, 1.0, 2.0, -1.0, 0.5, -2.0])
    assert select_tokens(s, all_valid(s), cap=3).indices.tolist() == [[[0, 2, 5]]]  # newest + 3.0 + 2.0
    assert select_tokens(s, all_valid(s), cap=10).indices.tolist() == [[[0, 1, 2, 4, 5]]]
    assert select_tokens(s, all_valid(s), cap=1).indices.tolist() == [[[5]]]


def test_protected_sink_and_prompt_tail():
    token_index = torch.arange(8).expand(2, 1, 8).clone()
    valid = torch.ones(2, 1, 8, dtype=torch.bool)
    valid[1, 0, :3] = False  # row 1 is left-padded by 3
    prompt_length = torch.tensor([6, 7])
    sink = protected_slots(token_index, valid, prompt_length, protect_sink=2, protect_prompt_tail=0)
    assert sink[:, 0].tolist() == [[True, True] + [False] * 6, [False] * 3 + [True, True] + [False] * 3]
    tail = protected_slots(token_index, valid, prompt_length, protect_sink=0, protect_prompt_tail=2)
    assert tail[0, 0].nonzero().flatten().tolist() == [4, 5]
    assert tail[1, 0].nonzero().flatten().tolist() == [5, 6]
    assert protected_slots(token_index, valid, None, 0, 2) is None
    assert protected_slots(token_index, valid, prompt_length, 0, 0) is None

    both = protected_slots(token_index, valid, prompt_length, protect_sink=1, protect_prompt_tail=1)
    decision = select_tokens(torch.full((2, 1, 8), -1.0), valid, protected=both)
    assert decision.indices.tolist() == [[[0, 5, 7]], [[3, 6, 7]]]


def test_bad_inputs_are_rejected():
    s = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="matching"):
        select_tokens(s, torch.ones(1, 2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="cap"):
        select_tokens(s, all_valid(s), cap=0)
    with pytest.raises(ValueError, match="protected"):
        select_tokens(s, all_valid(s), protected=torch.ones(1, 1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=">= 0"):
        protected_slots(torch.zeros(1, 1, 3, dtype=torch.long), all_valid(s)[:, :1], None, -1, 0)


def test_rows_keep_their_own_count_and_shorter_rows_are_padded_invisibly():
    # Row 0 passes 3 slots (newest included), row 1 only the newest: rows are separate sequences (population
    # members), so row 1 keeps 1 visible slot and 2 invisible padding slots, its next-best by score.
    s = torch.tensor([[[1.0, -1.0, 2.0, -3.0, 0.5]], [[-0.5, -2.0, -0.1, -4.0, -9.0]]])
    decision = select_tokens(s, all_valid(s))
    assert decision.indices.tolist() == [[[0, 2, 4]], [[0, 2, 4]]]
    assert decision.visible.tolist() == [[[True, True, True]], [[False, False, True]]]


def test_heads_of_one_row_keep_visible_fillers():
    # Within a row, count alignment across heads keeps fillers visible (namm-spec §4, pitfall 5).
    s = torch.tensor([[[1.0, 2.0, -1.0, 0.0], [-5.0, -1.0, -2.0, -3.0]]])
    decision = select_tokens(s, all_valid(s))
    assert decision.indices.tolist() == [[[0, 1, 3], [1, 2, 3]]]
    assert decision.visible is None

"""Which cache slots survive a step: one ranking routine shared by the NAMM and every baseline.

:func:`keep_top` ranks slots in tiers (the newest slot, then forced slots, then other valid slots, then
padding), by score within a tier, and keeps the top k of every (row, head). :func:`select_tokens` is the
NAMM's binary rule on top of it (namm-spec §4): a slot passes iff its score >= threshold; within a row, every
head keeps as many slots as its most generous head (count alignment, pitfall 5), so heads with fewer passing
slots also keep their best-scoring failing ones as visible fillers, exactly as the official code does.

Rows of a batch are independent sequences (e.g. different NAMM population members, namm-spec §5.5): each row
keeps its own count, and rows that keep fewer slots than the largest are padded with slots marked invisible
(``KeepDecision.visible``), which the runtime masks. With one row this is the official behaviour.

Ties are broken deterministically by a stable descending sort: among equal scores the older slot (lower
index) ranks first.

Shapes: B = batch rows, H = KV heads, N = cached slots, K = kept slots.
"""

from __future__ import annotations

import torch

from namm_transfer.namm.interface import KeepDecision


def protected_slots(
    token_index: torch.Tensor,
    valid: torch.Tensor,
    prompt_length: torch.Tensor | None,
    protect_sink: int,
    protect_prompt_tail: int,
) -> torch.Tensor | None:
    """Slots that must survive: attention sinks and the prompt tail (NammConfig.protect_*; field-notes §7).

    Sinks are the first ``protect_sink`` valid slots in cache order; since they are never evicted these are
    the first ``protect_sink`` real tokens of the sequence (left padding skipped). The prompt tail is the
    valid slots with ``prompt_length - protect_prompt_tail <= token_index < prompt_length``.

    Args:
        token_index: (B, H, N) int64 absolute arrival indices, ascending along N.
        valid: (B, H, N) bool.
        prompt_length: (B,) int64 or None (no prompt tail is protected then).

    Returns:
        (B, H, N) bool, or None when nothing is protected.
    """
    if protect_sink < 0 or protect_prompt_tail < 0:
        raise ValueError("protect_sink and protect_prompt_tail must be >= 0")
    protect_tail = protect_prompt_tail > 0 and prompt_length is not None
    if not protect_sink and not protect_tail:
        return None
    protected = valid & (valid.cumsum(dim=-1) <= protect_sink)
    if protect_tail:
        end = prompt_length.to(token_index.device).view(-1, 1, 1)
        protected |= valid & (token_index < end) & (token_index >= end - protect_prompt_tail)
    return protected


def keep_top(
    scores: torch.Tensor, k: int | torch.Tensor, valid: torch.Tensor, forced: torch.Tensor | None = None
) -> KeepDecision:
    """Keep the top ``k`` slots of every (row, head), ranked by tier, then by score.

    Tiers, highest first: the newest slot (index N-1, when valid); ``forced`` valid slots; other valid slots;
    padding slots. Within a tier the higher score wins and ties go to the lower slot index.

    Args:
        scores: (B, H, N) float, higher = more worth keeping; NaN is rejected.
        k: slots to keep, in [1, N]: an int for every row, or a (B,) int64 tensor of per-row counts. Rows
            keeping fewer than ``max(k)`` get their next-ranked slots as invisible padding.
        valid: (B, H, N) bool, False for padding slots.
        forced: (B, H, N) bool or None, slots to keep before any other (a recent window, sinks).

    Returns:
        KeepDecision with indices (B, H, max(k)) int64 ascending along K, and ``visible`` (B, H, max(k)) bool
        when rows keep different counts (else None).
    """
    if scores.dim() != 3 or valid.shape != scores.shape:
        raise ValueError(f"scores and valid must both be (B, H, N), got {tuple(scores.shape)} and {tuple(valid.shape)}")
    if forced is not None and forced.shape != scores.shape:
        raise ValueError(f"forced {tuple(forced.shape)} does not match scores {tuple(scores.shape)}")
    batch, _, n = scores.shape
    per_row = torch.as_tensor(k, dtype=torch.long, device=scores.device).reshape(-1).expand(batch)
    if int(per_row.min()) < 1 or int(per_row.max()) > n:
        shown = k if isinstance(k, int) else per_row.tolist()
        raise ValueError(f"cannot keep {shown} of {n} slots: k must be in [1, {n}]")
    if torch.isnan(scores).any():
        raise ValueError("eviction scores contain NaN")
    kept = int(per_row.max())
    tier = valid.to(torch.int8)
    if forced is not None:
        tier = torch.where(forced & valid, 2, tier).to(torch.int8)
    tier[..., -1] = torch.where(valid[..., -1], 3, 0).to(torch.int8)
    by_score = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    by_tier = torch.sort(tier.gather(-1, by_score), dim=-1, descending=True, stable=True).indices
    chosen = by_score.gather(-1, by_tier[..., :kept])
    indices, order = torch.sort(chosen, dim=-1)
    if bool((per_row == kept).all()):
        return KeepDecision(indices=indices)
    rank_visible = torch.arange(kept, device=scores.device) < per_row.view(batch, 1, 1)
    visible = rank_visible.expand_as(chosen).gather(-1, order)
    return KeepDecision(indices=indices, visible=visible)


def select_tokens(
    scores: torch.Tensor,
    valid: torch.Tensor,
    threshold: float = 0.0,
    protected: torch.Tensor | None = None,
    cap: int | None = None,
) -> KeepDecision:
    """Threshold selection with count alignment across the heads of each row (namm-spec §4).

    Args:
        scores: (B, H, N) scores; NaN counts as -inf (evicted).
        valid: (B, H, N) bool; invalid slots are chosen only as fillers when a (row, head) has fewer than
            K valid slots.
        threshold: keep iff score >= threshold (ties kept).
        protected: (B, H, N) bool or None; valid protected slots always pass (unless ``cap`` is smaller
            than their number).
        cap: at most this many slots per (row, head): the top ``cap`` by score are taken, then thresholded.

    Returns:
        :class:`KeepDecision`: row b keeps K_b = max over heads of its passing slots (>= 1, <= cap); the
        newest slot (index N - 1) always passes when valid. See :func:`keep_top` for padding across rows.
    """
    if scores.dim() != 3 or valid.shape != scores.shape:
        raise ValueError(
            f"scores and valid must be matching (B, H, N), got {tuple(scores.shape)} and {tuple(valid.shape)}"
        )
    if protected is not None and protected.shape != scores.shape:
        raise ValueError(f"protected {tuple(protected.shape)} does not match scores {tuple(scores.shape)}")
    if cap is not None and cap < 1:
        raise ValueError(f"cap must be None or >= 1, got {cap}")
    scores = torch.nan_to_num(scores.float(), nan=float("-inf"))
    passing = valid & (scores >= threshold)
    passing[..., -1] |= valid[..., -1]
    if protected is not None:
        passing |= protected & valid
    per_row = passing.sum(dim=-1).amax(dim=-1).clamp(min=1)
    if cap is not None:
        per_row = per_row.clamp(max=cap)
    return keep_top(scores, per_row, valid, forced=protected)

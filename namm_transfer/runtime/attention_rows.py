"""The attention rows a policy step reads: post-softmax attention of the recent queries over a layer's cached slots,
averaged over the query heads of each KV head (namm-spec.md §1.2, §7; ARCHITECTURE.md, "The data flow of one NAMM
step", step 3).

One function, :func:`attention_rows`, behind two implementations: on CUDA with triton the fused kernel of
:mod:`namm_transfer.runtime.triton_attention` (one launch), elsewhere the torch code below (query blocks). Both apply
the visibility rule of :func:`namm_transfer.runtime.layer.visibility_mask` and the same numerics, named by
:data:`namm_transfer.namm.interface.NUMERICS`:

* ``"official"``: the official implementation's eager bf16 attention: logits ``Q K^T`` formed in bf16 and divided by
  ``sqrt(d)`` in bf16, softmax in fp32, probabilities rounded to bf16, the mean over the G query heads of a KV head
  taken in bf16;
* ``"bfloat16"``: logits and softmax in fp32 (the model runs sdpa), probabilities rounded to bf16, bf16 mean;
* ``"float32"``: everything in fp32, no rounding.

The mean over query heads is :func:`query_head_mean`, the one function both the torch path and the golden check
against the official code (tests/test_golden_runtime.py) use.

Shapes: B batch rows, Hq query heads, H KV heads (query head ``h * G + i`` uses KV head ``h``, transformers'
``repeat_kv`` layout), Q recent queries, N cached slots, D head dim.
"""

from __future__ import annotations

import torch

from namm_transfer.namm.interface import NUMERICS
from namm_transfer.runtime import triton_attention
from namm_transfer.runtime.layer import visibility_mask


def probability_dtype(numerics: str) -> torch.dtype:
    """dtype the attention probabilities are rounded to and averaged in: bf16 for "official" and "bfloat16"."""
    if numerics not in NUMERICS:
        raise ValueError(f"attention numerics must be one of {', '.join(NUMERICS)}, got {numerics!r}")
    return torch.float32 if numerics == "float32" else torch.bfloat16


def query_head_mean(probs: torch.Tensor, num_kv_heads: int, numerics: str) -> torch.Tensor:
    """Round per-query-head probabilities and average the query heads of each KV head (namm-spec.md §1.2, §7).

    Query heads ``G*k .. G*k+G-1`` (G = Hq // num_kv_heads) belong to KV head k. The probabilities are rounded to
    :func:`probability_dtype` first and the mean is taken in that dtype, as the official code does with bf16
    attention; the kept set is bit-sensitive to this (namm-spec.md pitfall 8).

    Args:
        probs: (B, Hq, Q, N) post-softmax attention per query head, any float dtype.
        num_kv_heads: H, a divisor of Hq.
        numerics: one of :data:`NUMERICS`.

    Returns:
        (B, H, Q, N) in :func:`probability_dtype`.
    """
    dtype = probability_dtype(numerics)
    batch, query_heads, queries, slots = probs.shape
    if num_kv_heads < 1 or query_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads {num_kv_heads} does not divide the {query_heads} query heads")
    grouped = probs.to(dtype).view(batch, num_kv_heads, query_heads // num_kv_heads, queries, slots)
    return grouped.mean(dim=2)


def attention_rows(
    queries: torch.Tensor,
    keys: torch.Tensor,
    token_index: torch.Tensor,
    valid: torch.Tensor,
    query_index: torch.Tensor,
    query_valid: torch.Tensor,
    scaling: float,
    numerics: str,
    chunk: int,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Post-softmax attention of the recent queries over all cached slots, averaged per KV head.

    Masked entries (causality by arrival index, invalid slots, padding queries, the sliding window) are exactly
    zero. The torch path works in blocks of ``chunk`` queries, so at most (B, Hq, chunk, N) fp32 logits exist at a
    time; the fused kernel tiles by itself.

    Args:
        queries: (B, Hq, Q, D) buffered post-RoPE queries.
        keys: (B, H, N, D) cached keys.
        token_index: (B, H, N) integer arrival index of each slot.
        valid: (B, H, N) bool slot validity.
        query_index: (Q,) integer arrival index of each query.
        query_valid: (B, H, Q) bool, False for padding queries (their rows are all zero).
        scaling: factor applied to QK^T (1 / sqrt(D) for the models served).
        numerics: one of :data:`NUMERICS`.
        chunk: queries per block on the torch path.
        sliding_window: window of a sliding-window layer, None for full attention.

    Returns:
        (B, H, Q, N) in :func:`probability_dtype` (bf16 holds the bf16-rounded values exactly).
    """
    dtype = probability_dtype(numerics)
    if triton_attention.use_fused(queries):
        return triton_attention.fused_recent_attention(
            queries, keys, token_index, valid, query_index, query_valid, scaling, numerics, sliding_window,
            out_dtype=dtype,
        )
    batch, num_q_heads, num_queries, head_dim = queries.shape
    num_kv_heads, num_slots = keys.shape[1], keys.shape[2]
    groups = num_q_heads // num_kv_heads
    grouped = queries.reshape(batch, num_kv_heads, groups, num_queries, head_dim)
    keys_t = keys.transpose(-1, -2)[:, :, None]  # (B, H, 1, D, N)
    out = torch.empty(batch, num_kv_heads, num_queries, num_slots, dtype=dtype, device=keys.device)
    for start in range(0, num_queries, chunk):
        stop = min(start + chunk, num_queries)
        mask = visibility_mask(token_index, valid, query_index[start:stop], sliding_window)
        mask = (mask & query_valid[:, :, start:stop, None])[:, :, None]  # (B, H, 1, c, N)
        logits = _logits(grouped[:, :, :, start:stop], keys_t, scaling, numerics)  # (B, H, G, c, N)
        logits.masked_fill_(~mask, float("-inf"))
        probs = torch.softmax(logits, dim=-1).masked_fill_(~mask, 0.0)  # all-masked rows: NaN -> 0
        out[:, :, start:stop] = query_head_mean(probs.flatten(1, 2), num_kv_heads, numerics)
    return out


def _logits(queries: torch.Tensor, keys_t: torch.Tensor, scaling: float, numerics: str) -> torch.Tensor:
    """fp32 logits ``Q K^T * scaling`` of grouped queries (B, H, G, c, D) and transposed keys (B, H, 1, D, N); under
    "official" formed and scaled in bf16 (the official eager attention divides the bf16 product by sqrt(D) in bf16)."""
    if numerics == "official":
        return (torch.matmul(queries.bfloat16(), keys_t.bfloat16()) / (1.0 / scaling)).float()
    return torch.matmul(queries.float(), keys_t.float()) * scaling

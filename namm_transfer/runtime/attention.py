"""Attention over an evicting KV cache (ARCHITECTURE.md, "The data flow of one NAMM step", step 2).

Every layer of an :class:`~namm_transfer.runtime.cache.EvictingCache` holds its own physical K/V with a validity
mask and the absolute arrival index of every slot, per (batch row, KV head). Which cached slot a query may see is
therefore decided per layer from that state, never from the model's single 4-D mask (namm-spec.md §1.4 explains why
the official "last n_kv columns" slicing breaks after eviction and with padding):

* query with arrival index ``q`` sees slot ``j`` iff ``token_index[j] <= q`` (causality by arrival, bottom-right
  aligned for a chunk of new queries), ``valid[j]`` (left padding is never attended), and, for sliding-window
  layers, ``token_index[j] > q - window`` (the convention of transformers' ``sliding_window_overlay``).

This module holds:

* :func:`visibility_mask`: that rule as a boolean tensor;
* :func:`evicting_attention`: the one attention computation for the model's forward (torch sdpa over the layer's
  physical K/V); it also appends the chunk's post-RoPE queries to the layer's recent-query buffer;
* :func:`recent_attention`: the attention of the buffered recent queries over the current cache, recomputed at a
  policy step for the NAMM features (namm-spec.md §1.2, §7: softmax in fp32, rounded to bf16, GQA mean in bf16);
* :func:`register_attention`: registers :func:`namm_attention_forward` with transformers under
  :data:`ATTENTION_NAME`; adapters call it when they attach, never at import.

Shapes: B batch rows, Hq query heads, H KV heads (Hq a multiple of H; query head ``h * g + i`` uses KV head ``h``,
the layout of transformers' ``repeat_kv``), q new queries, N cached slots, D head dim.
"""

from __future__ import annotations

import weakref
from contextvars import ContextVar
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from namm_transfer.runtime import triton_attention

if TYPE_CHECKING:  # pragma: no cover - typing only
    from namm_transfer.runtime.cache import EvictingLayer

ATTENTION_NAME = "namm_evicting"
"""Name of the attention implementation registered with transformers by :func:`register_attention`."""

_ACTIVE_LAYER: ContextVar[weakref.ref | None] = ContextVar("namm_active_layer", default=None)


def set_active_layer(layer: "EvictingLayer") -> None:
    """Mark ``layer`` as the cache layer that was updated last (called by ``EvictingCache.update``).

    A weak reference is kept, so a finished cache is never held alive by this marker.
    """
    _ACTIVE_LAYER.set(weakref.ref(layer))


def active_layer_for(key: torch.Tensor) -> "EvictingLayer | None":
    """The evicting cache layer whose update returned ``key``, or None (no evicting cache in this forward)."""
    ref = _ACTIVE_LAYER.get()
    layer = ref() if ref is not None else None
    if layer is None or layer.keys is not key:
        return None
    return layer


def visibility_mask(
    token_index: torch.Tensor,
    valid: torch.Tensor,
    query_index: torch.Tensor,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Which cached slots each query may attend to.

    Args:
        token_index: (B, H, N) int64 absolute arrival index of every slot.
        valid: (B, H, N) bool, False for padding slots.
        query_index: (q,) int64 absolute arrival index of each query.
        sliding_window: if set, a query ``t`` sees only slots with ``token_index > t - sliding_window``.

    Returns:
        (B, H, q, N) bool, True where the query sees the slot.
    """
    slots = token_index[:, :, None, :]
    queries = query_index[None, None, :, None]
    mask = (slots <= queries) & valid[:, :, None, :]
    if sliding_window is not None:
        mask &= slots > queries - sliding_window
    return mask


def evicting_attention(
    layer_state: "EvictingLayer",
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention of a chunk of new queries over one evicting cache layer (its K/V already appended).

    The queries are the last q arrivals of the layer (arrival indices ``tokens_seen - q .. tokens_seen - 1``); their
    own slots are the last q slots, and every other slot arrived before them (steps run before a chunk is appended).
    So without invalid slots and without a window, the rule of :func:`visibility_mask` reduces to plain bottom-right
    causality, shared by every row and head (no mask at all for one query), evictions notwithstanding: then sdpa runs
    with ``enable_gqa`` and a (q, N) mask. Otherwise the query heads are grouped per KV head, so K/V are never repeated
    and each (row, KV head) gets its own mask. When the layer is managed by a policy, the queries are also appended
    to its recent-query buffer.

    Args:
        layer_state: the layer, right after ``EvictingCache.update`` appended this chunk.
        query: (B, Hq, q, D) post-RoPE queries.
        key: (B, H, N, D) the layer's physical keys (what ``update`` returned).
        value: (B, H, N, Dv) the layer's physical values.
        scaling: factor applied to QK^T.
        sliding_window: window of a sliding-window layer, None for full attention.

    Returns:
        (B, Hq, q, Dv) attention output. A query that sees no valid slot (a left-padding query) gets zeros.
    """
    batch, num_q_heads, q_len, head_dim = query.shape
    num_kv_heads, num_slots = key.shape[1], key.shape[2]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")
    if key.shape[:3] != layer_state.token_index.shape or value.shape[:3] != key.shape[:3]:
        raise ValueError(
            f"key/value shapes {tuple(key.shape)}/{tuple(value.shape)} do not match the cache layer's slots "
            f"{tuple(layer_state.token_index.shape)}"
        )
    layer_state.scaling, layer_state.sliding_window = scaling, sliding_window
    if layer_state.collect_queries:
        layer_state.record_queries(query)
    if sliding_window is None and not layer_state.has_invalid:
        causal = None
        if q_len > 1:
            slots = torch.arange(num_slots, device=query.device)
            causal = slots[None, :] <= torch.arange(num_slots - q_len, num_slots, device=query.device)[:, None]
        return F.scaled_dot_product_attention(query, key, value, attn_mask=causal, scale=scaling, enable_gqa=True)
    groups = num_q_heads // num_kv_heads
    first = layer_state.tokens_seen - q_len
    query_index = torch.arange(first, first + q_len, device=query.device)
    mask = visibility_mask(layer_state.token_index, layer_state.valid, query_index, sliding_window)
    grouped_query = query.reshape(batch, num_kv_heads, groups * q_len, head_dim)
    grouped_mask = mask[:, :, None].expand(-1, -1, groups, -1, -1)
    grouped_mask = grouped_mask.reshape(batch, num_kv_heads, groups * q_len, num_slots)
    output = F.scaled_dot_product_attention(grouped_query, key, value, attn_mask=grouped_mask, scale=scaling)
    return output.reshape(batch, num_q_heads, q_len, value.shape[-1])


def recent_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    token_index: torch.Tensor,
    valid: torch.Tensor,
    query_index: torch.Tensor,
    query_valid: torch.Tensor,
    scaling: float,
    attention_dtype: torch.dtype,
    chunk: int,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Post-softmax attention of the recent queries over all cached slots, GQA-averaged per KV head.

    Follows namm-spec.md §1.2 and §7: logits ``Q K^T * scaling`` and the softmax in fp32, the probabilities rounded
    to ``attention_dtype``, the mean over the query heads of each KV head taken in that dtype. Masked entries
    (causality by arrival index, padding slots, padding queries, the sliding window) are exactly zero. Computed in
    blocks of ``chunk`` queries, so at most (B, Hq, chunk, N) fp32 logits exist at a time.

    Args:
        queries: (B, Hq, Q, D) buffered post-RoPE queries.
        keys: (B, H, N, D) cached keys.
        token_index: (B, H, N) int64 arrival index of each slot.
        valid: (B, H, N) bool slot validity.
        query_index: (Q,) int64 arrival index of each query.
        query_valid: (B, H, Q) bool, False for padding queries (their rows are all zero).
        scaling: factor applied to QK^T.
        attention_dtype: dtype of the rounding and of the GQA mean (torch.bfloat16 or torch.float32).
        chunk: queries per block.
        sliding_window: window of a sliding-window layer, None for full attention.

    Returns:
        (B, H, Q, N) float32 holding the ``attention_dtype``-rounded values.

    On CUDA with triton installed the fused kernel of :mod:`namm_transfer.runtime.triton_attention` computes the
    same result in one launch (``chunk`` is then unused).
    """
    if triton_attention.use_fused(queries):
        return triton_attention.fused_recent_attention(
            queries, keys, token_index, valid, query_index, query_valid, scaling, attention_dtype, sliding_window
        )
    batch, num_q_heads, num_queries, head_dim = queries.shape
    num_kv_heads, num_slots = keys.shape[1], keys.shape[2]
    groups = num_q_heads // num_kv_heads
    grouped = queries.reshape(batch, num_kv_heads, groups, num_queries, head_dim)
    keys_t = keys.float().transpose(-1, -2)[:, :, None]  # (B, H, 1, D, N)
    out = torch.empty(batch, num_kv_heads, num_queries, num_slots, dtype=torch.float32, device=keys.device)
    for start in range(0, num_queries, chunk):
        stop = min(start + chunk, num_queries)
        mask = visibility_mask(token_index, valid, query_index[start:stop], sliding_window)
        mask &= query_valid[:, :, start:stop, None]
        logits = torch.matmul(grouped[:, :, :, start:stop].float(), keys_t) * scaling  # (B, H, g, c, N)
        logits.masked_fill_(~mask[:, :, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1).masked_fill_(~mask[:, :, None], 0.0)  # all-masked rows: NaN -> 0
        out[:, :, start:stop] = probs.to(attention_dtype).mean(dim=2).float()
    return out


def namm_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The transformers attention function registered as :data:`ATTENTION_NAME`.

    Signature of transformers' ``AttentionInterface`` (query (B, Hq, q, D), key/value (B, H, N, D); returns
    (B, q, Hq, D) and no weights). When the layer's K/V come from an :class:`EvictingCache` (found through the marker
    that the cache's ``update`` sets), the model's ``attention_mask`` is ignored and :func:`evicting_attention` builds
    the layer's own mask. Otherwise (no evicting cache) it is transformers' sdpa attention with the given mask.
    """
    layer = active_layer_for(key)
    if layer is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout:
        raise ValueError(f"the '{ATTENTION_NAME}' attention is for inference only; got dropout {dropout}")
    if kwargs.get("softcap") is not None:
        raise ValueError(f"the '{ATTENTION_NAME}' attention does not support attention logit softcapping")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    output = evicting_attention(layer, query, key, value, scale, sliding_window)
    return output.transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Register :func:`namm_attention_forward` with transformers (idempotent) and return its name.

    The attention mask function registered beside it is transformers' sdpa mask, so a model left on this
    implementation without an evicting cache still gets its usual causal/padding mask.
    """
    AttentionInterface.register(ATTENTION_NAME, namm_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME

"""The attention function transformers calls for the layers of an evicting KV cache (ARCHITECTURE.md, "The data
flow of one NAMM step", step 2).

Every layer of an :class:`~namm_transfer.runtime.cache.EvictingCache` holds its own physical K/V, validity and arrival
indices (:class:`~namm_transfer.runtime.layer.EvictingLayer`); which slot a query may see is decided per layer by
:func:`~namm_transfer.runtime.layer.visibility_mask`, never by the model's single 4-D mask.

This module holds:

* :func:`evicting_attention`: the one attention computation of the model's forward (torch sdpa over the layer's
  physical K/V); it also hands the chunk's post-RoPE queries to the layer's recent-query buffer;
* :func:`namm_attention_forward`: the function registered with transformers; when a chunk crosses a period boundary
  of the layer (``generate``'s one-shot prefill) it attends segment by segment and runs the layer's policy step at
  each boundary, so every step sees exactly ``period`` queries, whatever the chunking;
* :func:`namm_mask`: the mask function registered beside it; it builds transformers' sdpa mask and tells the cache
  which of the forward's new tokens are padding (from the model's 2-D ``attention_mask``, as ``generate`` passes it);
* :func:`register_attention`: registers both under :data:`ATTENTION_NAME`; adapters call it when they attach, never
  at import.

Shapes: B batch rows, Hq query heads, H KV heads (Hq a multiple of H; query head ``h * g + i`` uses KV head ``h``, the
layout of transformers' ``repeat_kv``), q new queries, N cached slots, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from namm_transfer.runtime.layer import (
    ATTENTION_NAME,
    EvictingLayer,
    active_layer_for,
    tell_model_padding,
    visibility_mask,
)


def namm_mask(*, q_length: int, kv_length: int, kv_offset: int = 0, attention_mask: torch.Tensor | None = None,
              **kwargs) -> torch.Tensor | None:
    """The mask function registered as :data:`ATTENTION_NAME`: transformers' ``sdpa_mask`` (for a model left on this
    attention without an evicting cache), after recording which new tokens the 2-D ``attention_mask`` (B, kv_length)
    marks as padding, for the cache (:func:`~namm_transfer.runtime.layer.model_padding`)."""
    padding = None
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] == kv_offset + kv_length:
        new = attention_mask[:, -q_length:].bool()
        padding = None if bool(new.all()) else new
    tell_model_padding(kv_offset + kv_length, padding)
    return sdpa_mask(q_length=q_length, kv_length=kv_length, kv_offset=kv_offset, attention_mask=attention_mask,
                     **kwargs)


def evicting_attention(
    layer_state: EvictingLayer,
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
    if key.shape[:3] != layer_state.arrival.shape or value.shape[:3] != key.shape[:3]:
        raise ValueError(
            f"key/value shapes {tuple(key.shape)}/{tuple(value.shape)} do not match the cache layer's slots "
            f"{tuple(layer_state.arrival.shape)}"
        )
    layer_state.scaling, layer_state.sliding_window = scaling, sliding_window
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
    mask = visibility_mask(layer_state.arrival, layer_state.attendable, query_index, sliding_window)
    grouped_query = query.reshape(batch, num_kv_heads, groups * q_len, head_dim)
    grouped_mask = mask[:, :, None].expand(-1, -1, groups, -1, -1)
    grouped_mask = grouped_mask.reshape(batch, num_kv_heads, groups * q_len, num_slots)
    output = F.scaled_dot_product_attention(grouped_query, key, value, attn_mask=grouped_mask, scale=scaling)
    return output.reshape(batch, num_q_heads, q_len, value.shape[-1])


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
    the layer's own mask, segment by segment when the chunk crosses period boundaries of the layer (the cache held
    the tokens past the first boundary back; the policy steps at each boundary before the next segment is
    admitted). Otherwise (no evicting cache) it is transformers' sdpa attention with the given mask.
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
    outputs, start = [], 0
    while True:  # one segment per period boundary the chunk crosses; one pass without a crossing
        stop = start + layer.admitted
        outputs.append(evicting_attention(layer, query[:, :, start:stop], layer.keys, layer.values, scale,
                                          sliding_window))
        start = stop
        if layer.incoming is None:
            break
        layer.step_now(layer)
        layer.admit_incoming()
    output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return output.transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Register :func:`namm_attention_forward` with transformers (idempotent) and return its name.

    The mask function registered beside it is :func:`namm_mask` (transformers' sdpa mask, plus the padding of the new
    tokens for the cache), so a model left on this implementation without an evicting cache still gets its usual
    causal/padding mask.
    """
    AttentionInterface.register(ATTENTION_NAME, namm_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, namm_mask)
    return ATTENTION_NAME

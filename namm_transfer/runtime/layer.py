"""One layer of an evicting KV cache: its eviction state and the rule deciding which slots a query may see.

This is the single home of a layer's state (ARCHITECTURE.md, "The data flow of one NAMM step"): the cache
(:mod:`namm_transfer.runtime.cache`) fills and prunes it, the forward attention (:mod:`namm_transfer.runtime.attention`)
and the attention rows of a policy step (:mod:`namm_transfer.runtime.attention_rows`) read it. Neither of those
modules imports the other; both import this one.

Per layer, :class:`EvictingLayer` holds

* physical keys/values (B, H, N, D), N differing between layers once a policy has evicted tokens;
* ``attendable`` (B, H, N) bool: False for left-padding slots and for slots a policy kept only to align counts across
  rows; such slots are never attended;
* ``arrival`` (B, H, N) int32: the absolute arrival index of every slot, counted by the cache (0 = the first
  token fed, evicted tokens and padding included). It does not depend on the model's position ids, so it also
  works for models whose position ids are all zero (the Decision Transformer's GPT-2);
* the post-RoPE queries that arrived since the layer's last policy step, when its policy reads attention;
* the tokens of the current chunk that lie past the layer's next period boundary (``incoming``): the attention
  admits them after the step at that boundary (see :meth:`EvictingLayer.update`).

The visibility rule (:func:`visibility_mask`): query with arrival index ``q`` sees slot ``j`` iff
``arrival[j] <= q`` (causality by arrival, bottom-right aligned for a chunk of new queries), ``attendable[j]``, and,
for sliding-window layers, ``arrival[j] > q - window`` (transformers' ``sliding_window_overlay`` convention).
namm-spec.md §1.4 explains why the official "last n_kv columns" slicing breaks after eviction and with padding.

Shapes: B batch rows, H KV heads, Hq query heads, N slots, D head dim, q queries.
"""

from __future__ import annotations

import weakref
from contextvars import ContextVar
from typing import Callable

import torch
from transformers.cache_utils import CacheLayerMixin

ATTENTION_NAME = "namm_evicting"
"""Name under which :mod:`namm_transfer.runtime.attention` registers the attention the layers need."""

ARRIVAL_DTYPE = torch.int32
"""dtype of the arrival indices held per slot (2^31 tokens is far beyond any context; half the bytes of int64)."""

_ACTIVE_LAYER: ContextVar[weakref.ref | None] = ContextVar("namm_active_layer", default=None)
_MODEL_PADDING: ContextVar[tuple[int, torch.Tensor | None] | None] = ContextVar("namm_model_padding", default=None)


def tell_model_padding(kv_length: int, padding: torch.Tensor | None) -> None:
    """Record the validity (B, q) bool of the q new tokens of a forward over ``kv_length`` tokens (seen + new), None
    for no padding; called by the attention's mask function, which sees the model's 2-D ``attention_mask``."""
    _MODEL_PADDING.set((kv_length, padding))


def model_padding(kv_length: int) -> torch.Tensor | None:
    """The validity told by :func:`tell_model_padding` for a forward over ``kv_length`` tokens, or None (no padding,
    or nothing was told for this forward)."""
    told = _MODEL_PADDING.get()
    if told is None or told[0] != kv_length:
        return None
    return told[1]


def set_active_layer(layer: "EvictingLayer") -> None:
    """Mark ``layer`` as the cache layer updated last (called by ``EvictingCache.update``); a weak reference, so a
    finished cache is never held alive by the marker."""
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
        token_index: (B, H, N) integer absolute arrival index of every slot.
        valid: (B, H, N) bool, False for slots never attended (padding, count alignment).
        query_index: (q,) integer absolute arrival index of each query.
        sliding_window: if set, a query ``t`` sees only slots with ``token_index > t - sliding_window``.

    Returns:
        (B, H, q, N) bool, True where the query sees the slot.
    """
    slots = token_index[:, :, None, :]
    queries = query_index.to(token_index.dtype)[None, None, :, None]
    mask = (slots <= queries) & valid[:, :, None, :]
    if sliding_window is not None:
        mask &= slots > queries - sliding_window
    return mask


class EvictingLayer(CacheLayerMixin):
    """One layer of an evicting cache: physical K/V plus per-slot validity and arrival index.

    Attributes:
        layer_idx: index of the layer in the model.
        period: new tokens per policy step, or None when no policy steps this layer (full cache, unmanaged layer).
        collect_queries: whether the attention buffers the layer's queries (its policy reads attention rows).
        keys, values: (B, H, N, D) physical K/V.
        attendable: (B, H, N) bool, False for slots never attended.
        arrival: (B, H, N) int32 absolute arrival index of each slot, ascending along N.
        has_invalid: whether an invalid slot may be held; False allows the attention's fast path.
        tokens_seen: tokens this layer has been fed (evicted ones and padding included).
        pending: tokens admitted since the last policy step (counted only when ``period`` is set).
        steps: policy steps this layer has had.
        queries: (B, Hq, pending, D) post-RoPE queries since the last step, or None.
        incoming: (keys, values, valid) of the current chunk's tokens past the next period boundary, or None.
        admitted: tokens appended by the last :meth:`update` or :meth:`admit_incoming`.
        scaling, sliding_window: told by the attention at each call; used to recompute attention rows at a step.
        step_now: the cache's step for this layer, called by the attention at a period boundary inside a chunk.
    """

    is_sliding = False  # a window is applied by the attention mask, not by transformers' sliding-layer logic

    def __init__(self, layer_idx: int, period: int | None, collect_queries: bool,
                 step_now: Callable[["EvictingLayer"], None] | None):
        super().__init__()
        self.layer_idx = layer_idx
        self.period = period
        self.collect_queries = collect_queries
        self.step_now = step_now
        self._clear()

    def _clear(self) -> None:
        self.keys = self.values = self.attendable = self.arrival = self.queries = self.incoming = None
        self.is_initialized = self.has_invalid = False
        self.tokens_seen = self.pending = self.steps = self.admitted = 0
        self.scaling: float | None = None
        self.sliding_window: int | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, _ = key_states.shape
        self.device = key_states.device
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.attendable = torch.ones(batch, heads, 0, dtype=torch.bool, device=self.device)
        self.arrival = torch.zeros(batch, heads, 0, dtype=ARRIVAL_DTYPE, device=self.device)
        self.is_initialized = True

    @property
    def step_due(self) -> bool:
        """A policy step is due: ``period`` tokens arrived since the last one."""
        return self.period is not None and self.pending >= self.period

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, valid: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Receive a chunk of n new tokens: append them up to the layer's next period boundary and hold the rest in
        ``incoming`` (the attention admits it with :meth:`admit_incoming` after the step at the boundary).

        key_states (B, H, n, D), value_states (B, H, n, Dv), valid (B, n) bool or None when all are valid. Returns
        the layer's physical (keys, values).
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n_new = key_states.shape[2]
        first = n_new if self.period is None else min(n_new, self.period - self.pending)
        if first < n_new:
            rest = None if valid is None else valid[:, first:]
            self.incoming = (key_states[:, :, first:], value_states[:, :, first:], rest)
            key_states, value_states = key_states[:, :, :first], value_states[:, :, :first]
            valid = None if valid is None else valid[:, :first]
        self._append(key_states, value_states, valid)
        return self.keys, self.values

    def admit_incoming(self) -> None:
        """Append the held tokens up to the next period boundary (after the step at the previous one)."""
        keys, values, valid = self.incoming
        self.incoming = None
        self.update(keys, values, valid=valid)

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor, valid: torch.Tensor | None) -> None:
        batch, heads, n_new, _ = key_states.shape
        if valid is None:
            valid = torch.ones(batch, n_new, dtype=torch.bool, device=self.device)
        else:
            self.has_invalid = self.has_invalid or not bool(valid.all())
        arrival = torch.arange(self.tokens_seen, self.tokens_seen + n_new, device=self.device, dtype=ARRIVAL_DTYPE)
        self.keys = torch.cat([self.keys, key_states], dim=2)
        self.values = torch.cat([self.values, value_states], dim=2)
        self.attendable = torch.cat([self.attendable, valid[:, None, :].expand(batch, heads, n_new)], dim=2)
        self.arrival = torch.cat([self.arrival, arrival.expand(batch, heads, n_new)], dim=2)
        self.tokens_seen += n_new
        self.admitted = n_new
        if self.period is not None:
            self.pending += n_new

    def record_queries(self, query: torch.Tensor) -> None:
        """Append a chunk's post-RoPE queries (B, Hq, q, D) to the recent-query buffer (if the policy reads them)."""
        if self.collect_queries:
            if self.queries is not None:
                query = torch.cat([self.queries, query], dim=2)
            elif query.untyped_storage().nbytes() > query.numel() * query.element_size():
                query = query.clone()  # a segment of a longer chunk: hold its own queries only, not the chunk's
            self.queries = query

    def keep(self, indices: torch.Tensor, visible: torch.Tensor | None = None) -> None:
        """Keep the slots ``indices`` (B, H, K) int64 of every (row, KV head), masking those where ``visible``
        (B, H, K) is False; starts a new step period."""
        self.keys = self.keys.gather(2, indices[..., None].expand(-1, -1, -1, self.keys.shape[-1]))
        self.values = self.values.gather(2, indices[..., None].expand(-1, -1, -1, self.values.shape[-1]))
        self.attendable = self.attendable.gather(2, indices)
        if visible is not None:
            self.attendable &= visible
            self.has_invalid = True
        self.arrival = self.arrival.gather(2, indices)
        self.queries = None
        self.pending = 0
        self.steps += 1

    def trim_to_window(self) -> None:
        """Drop the slots no future query of a sliding-window layer can see (keeps the last window - 1)."""
        first = self.num_slots - (self.sliding_window - 1)
        if first > 0:
            self.keys = self.keys[:, :, first:]
            self.values = self.values[:, :, first:]
            self.attendable = self.attendable[:, :, first:]
            self.arrival = self.arrival[:, :, first:]

    @property
    def num_slots(self) -> int:
        """N, the physical slots held now."""
        return 0 if not self.is_initialized else self.keys.shape[2]

    @property
    def kv_bytes(self) -> int:
        """Exact bytes of the physical keys and values held now (their storage, spare capacity included)."""
        return _nbytes(self.keys, self.values)

    def bookkeeping_bytes_by_class(self) -> dict[str, int]:
        """Exact bytes the method adds to the K/V in this layer, by what they hold: ``attendable`` (validity),
        ``arrival`` (arrival indices), ``queries`` (the recent-query buffer) and ``incoming`` (tokens of the current
        chunk held back at a period boundary)."""
        incoming = () if self.incoming is None else self.incoming
        return {"attendable": _nbytes(self.attendable), "arrival": _nbytes(self.arrival),
                "queries": _nbytes(self.queries), "incoming": _nbytes(*incoming)}

    @property
    def bookkeeping_bytes(self) -> int:
        """Exact bytes the method adds to the K/V in this layer (the sum of :meth:`bookkeeping_bytes_by_class`)."""
        return sum(self.bookkeeping_bytes_by_class().values())

    def get_seq_length(self) -> int:
        """Tokens seen (absolute count), so that models and ``generate`` derive absolute positions."""
        return self.tokens_seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the absolute sequence: the model's own mask covers every token seen. The
        ``namm_evicting`` attention ignores that mask and applies :func:`visibility_mask`."""
        return self.tokens_seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear()


def _nbytes(*tensors: torch.Tensor | None) -> int:
    """Bytes of the storage behind ``tensors``, each storage counted once: a view holds its whole storage alive, so
    spare capacity (a slice of a larger chunk) is counted too."""
    storages = {}
    for tensor in tensors:
        if tensor is not None:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())

"""An evicting KV cache for transformers models (ARCHITECTURE.md, "The data flow of one NAMM step").

:class:`EvictingCache` is a transformers ``Cache`` whose layers (:class:`EvictingLayer`) hold, per layer:

* physical keys/values (B, H, N, D), N differing between layers once a policy has evicted tokens;
* ``valid`` (B, H, N) bool: False for left-padding slots, which are never attended;
* ``token_index`` (B, H, N) int64: the absolute arrival index of every slot, counted by the cache itself (0 = the
  first token fed, evicted tokens and padding included). It does not depend on the model's position ids, so it also
  works for models whose position ids are all zero (the Decision Transformer's GPT-2);
* the post-RoPE queries that arrived since the layer's last policy step (appended by
  :func:`~namm_transfer.runtime.attention.evicting_attention`).

Policy schedule (namm-spec.md §1.3). When ``update_every`` new tokens have reached a managed layer, its policy step
runs lazily at the start of that layer's next ``update`` (before the new K/V are appended) or on :meth:`flush`. A
layer's cache is read only by that layer, so this equals stepping right after the forward, and
``model.generate(..., cache=EvictingCache(...))`` works without a runner. A chunk bringing more than
``update_every`` tokens (generate's one-shot prefill) gives one step over all of them (``n_new > update_every``; the
NAMM needs ``n_new`` to be a multiple of its STFT hop). The runner's chunked prefill
(:class:`~namm_transfer.runtime.runner.EvictingRunner`, or ``generate(prefill_chunk_size=update_every)``) cuts chunks
at multiples of ``update_every`` and so reproduces the paper's schedule exactly: steps at absolute token counts
``update_every``, ``2 * update_every``, ... with ``update_every`` new queries each.

At a step the cache shows the layer to the policy as a :class:`~namm_transfer.namm.interface.LayerView`, gathers the
kept slots of the returned :class:`~namm_transfer.namm.interface.KeepDecision` (keys, values, validity, arrival
indices; the arrival index of a kept slot never changes; slots the decision marks not ``visible`` become invalid,
i.e. masked like padding) and logs a
:class:`~namm_transfer.namm.budget.RetentionRecord`.

Layers outside ``managed_layers`` (e.g. Gemma3's sliding-window layers) are never stepped; once their attention has
told the cache their window, they hold only the last ``window - 1`` tokens before a new chunk, like transformers'
``DynamicSlidingWindowLayer`` (the mask hides older ones anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from namm_transfer.namm.budget import RetentionRecord
from namm_transfer.namm.interface import EvictionPolicy, KeepDecision, LayerView
from namm_transfer.runtime.attention import recent_attention, set_active_layer

_ATTENTION_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class CacheConfig:
    """Settings of an :class:`EvictingCache`.

    Attributes:
        update_every: new tokens per policy step (namm-spec.md §1.3: 512).
        attention_dtype: dtype in which the recent queries' per-query-head attention is rounded and GQA-averaged
            before the policy sees it ("bfloat16", the official half_attn numerics of namm-spec.md §7, or
            "float32").
        attention_chunk: recent queries per matmul block when the attention is recomputed at a step; bounds the
            step's memory to (B, Hq, attention_chunk, N) fp32 logits.
    """

    update_every: int = 512
    attention_dtype: str = "bfloat16"
    attention_chunk: int = 128

    def __post_init__(self) -> None:
        problems = []
        if self.update_every < 1:
            problems.append(f"update_every must be >= 1, got {self.update_every}")
        if self.attention_dtype not in _ATTENTION_DTYPES:
            problems.append(f"attention_dtype must be 'bfloat16' or 'float32', got {self.attention_dtype!r}")
        if self.attention_chunk < 1:
            problems.append(f"attention_chunk must be >= 1, got {self.attention_chunk}")
        if problems:
            raise ValueError("invalid CacheConfig: " + "; ".join(problems))

    @property
    def torch_attention_dtype(self) -> torch.dtype:
        return _ATTENTION_DTYPES[self.attention_dtype]


class EvictingLayer(CacheLayerMixin):
    """One layer of an :class:`EvictingCache`: physical K/V plus per-slot validity and arrival index.

    Attributes:
        layer_idx: index of the layer in the model.
        managed: whether a policy may evict from this layer.
        collect_queries: whether the attention appends its queries to ``queries`` (managed layers with a policy).
        keys, values: (B, H, N, D) physical K/V.
        valid: (B, H, N) bool, False for padding slots.
        token_index: (B, H, N) int64 absolute arrival index of each slot, ascending along N.
        has_invalid: whether an invalid slot (input padding, or a slot a policy kept invisible) may be held; False
            allows the attention's fast path.
        tokens_seen: tokens this layer has been fed (evicted ones and padding included).
        pending: tokens appended since the last policy step (counted only when ``collect_queries``).
        steps: policy steps this layer has had.
        queries: (B, Hq, pending, D) post-RoPE queries since the last step, or None.
        scaling, sliding_window: told by the attention at each call; used to recompute the attention at a step.
    """

    is_sliding = False  # a window is applied by the attention mask, not by transformers' sliding-layer logic

    def __init__(self, layer_idx: int, managed: bool, collect_queries: bool):
        super().__init__()
        self.layer_idx = layer_idx
        self.managed = managed
        self.collect_queries = collect_queries
        self._clear()

    def _clear(self) -> None:
        self.keys = self.values = self.valid = self.token_index = self.queries = None
        self.is_initialized = self.has_invalid = False
        self.tokens_seen = self.pending = self.steps = 0
        self.scaling: float | None = None
        self.sliding_window: int | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, _ = key_states.shape
        self.device = key_states.device
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.valid = torch.ones(batch, heads, 0, dtype=torch.bool, device=self.device)
        self.token_index = torch.zeros(batch, heads, 0, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, valid: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append n new tokens. key_states (B, H, n, D), value_states (B, H, n, Dv), valid (B, n) bool, or None
        when all are valid (a tensor marks the layer ``has_invalid``). Returns the layer's physical (keys, values)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, heads, n_new, _ = key_states.shape
        if valid is None:
            valid = torch.ones(batch, n_new, dtype=torch.bool, device=self.device)
        else:
            self.has_invalid = True
        arrival = torch.arange(self.tokens_seen, self.tokens_seen + n_new, device=self.device)
        self.keys = torch.cat([self.keys, key_states], dim=2)
        self.values = torch.cat([self.values, value_states], dim=2)
        self.valid = torch.cat([self.valid, valid[:, None, :].expand(batch, heads, n_new)], dim=2)
        self.token_index = torch.cat([self.token_index, arrival.expand(batch, heads, n_new)], dim=2)
        self.tokens_seen += n_new
        if self.collect_queries:
            self.pending += n_new
        return self.keys, self.values

    def record_queries(self, query: torch.Tensor) -> None:
        """Append a chunk's post-RoPE queries (B, Hq, q, D) to the recent-query buffer."""
        self.queries = query if self.queries is None else torch.cat([self.queries, query], dim=2)

    def keep(self, indices: torch.Tensor, visible: torch.Tensor | None = None) -> None:
        """Keep the slots ``indices`` (B, H, K) of every (row, KV head), masking those where ``visible`` (B, H, K)
        is False; starts a new step period."""
        self.keys = self.keys.gather(2, indices[..., None].expand(-1, -1, -1, self.keys.shape[-1]))
        self.values = self.values.gather(2, indices[..., None].expand(-1, -1, -1, self.values.shape[-1]))
        self.valid = self.valid.gather(2, indices)
        if visible is not None:
            self.valid &= visible
            self.has_invalid = True
        self.token_index = self.token_index.gather(2, indices)
        self.queries = None
        self.pending = 0
        self.steps += 1

    def trim_to_window(self) -> None:
        """Drop the slots no future query of a sliding-window layer can see (keeps the last window - 1)."""
        first = self.num_slots - (self.sliding_window - 1)
        if first > 0:
            self.keys = self.keys[:, :, first:]
            self.values = self.values[:, :, first:]
            self.valid = self.valid[:, :, first:]
            self.token_index = self.token_index[:, :, first:]

    @property
    def num_slots(self) -> int:
        """N, the physical slots held now."""
        return 0 if not self.is_initialized else self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        """Exact bytes of the physical keys and values held now."""
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def get_seq_length(self) -> int:
        """Tokens seen (absolute count), so that models and ``generate`` derive absolute positions."""
        return self.tokens_seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the absolute sequence: the model's own mask covers every token seen. The
        ``namm_evicting`` attention ignores that mask and builds the layer's mask from ``valid``/``token_index``."""
        return self.tokens_seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear()


class EvictingCache(Cache):
    """A transformers ``Cache`` whose managed layers are pruned by an :class:`EvictionPolicy`.

    Args:
        policy: the eviction policy, or None for a full cache (same code path, no steps, no query buffer).
        num_layers: number of attention layers of the model.
        managed_layers: layers the policy manages (None: all).
        config: schedule and numerics, see :class:`CacheConfig`.

    Attributes:
        retention: one :class:`RetentionRecord` per (step, managed layer), in the order the steps ran.
    """

    def __init__(
        self,
        policy: EvictionPolicy | None,
        num_layers: int,
        managed_layers: set[int] | frozenset[int] | None = None,
        config: CacheConfig | None = None,
    ):
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        managed = frozenset(range(num_layers)) if managed_layers is None else frozenset(managed_layers)
        if not managed <= set(range(num_layers)):
            raise ValueError(f"managed_layers {sorted(managed)} must lie in [0, {num_layers})")
        self.policy = policy
        self.config = config if config is not None else CacheConfig()
        self.managed_layers = managed
        layers = [EvictingLayer(i, i in managed, policy is not None and i in managed) for i in range(num_layers)]
        super().__init__(layers=layers)
        self._padding: torch.Tensor | None = None
        self._prompt_length: int | None = None
        self._clear_sequence()

    def _clear_sequence(self) -> None:
        self.retention: list[RetentionRecord] = []
        self._peak_bytes = 0
        self._batch_size: int | None = None

    def begin(self, attention_mask: torch.Tensor | None = None, prompt_length: int | None = None) -> None:
        """Start a new batch of sequences: empty every layer, forget the log, declare left padding.

        Args:
            attention_mask: (B, L) 2-D mask of the prompt (1 = token, 0 = padding), left padding only; its padding
                slots are marked invalid: never attended, and a policy sees them as ``LayerView.valid == False``.
                None: no padding.
            prompt_length: arrival index one past the last prompt token (the same for every row under left
                padding); passed to the policy as ``LayerView.prompt_length``. Defaults to L when a mask is given.
        """
        if attention_mask is not None:
            mask = attention_mask.bool()
            if mask.ndim != 2:
                raise ValueError(f"attention_mask must be 2-D (B, L), got shape {tuple(attention_mask.shape)}")
            if not mask.any(dim=1).all():
                raise ValueError("attention_mask has a row with no token")
            if (mask[:, 1:] < mask[:, :-1]).any():
                raise ValueError("attention_mask must be left-padded (zeros only before the first token of a row)")
            self._padding = mask
            self._padding_end = int(mask.shape[1] - mask.sum(dim=1).min())  # from here on, every row holds tokens
            prompt_length = mask.shape[1] if prompt_length is None else prompt_length
        else:
            self._padding = None
        if prompt_length is not None and prompt_length < 1:
            raise ValueError(f"prompt_length must be >= 1, got {prompt_length}")
        self._prompt_length = prompt_length
        self.reset()

    def reset(self) -> None:
        """Empty every layer and the retention log (keeps the padding declared by :meth:`begin`)."""
        super().reset()
        self._clear_sequence()

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the layer's due policy step, append the chunk, return the layer's physical (keys, values).

        key_states (B, H, n, D), value_states (B, H, n, Dv). Called by the model's attention before attending.
        """
        layer = self.layers[layer_idx]
        if self._batch_size is None:
            self._start(key_states.shape[0])
        elif key_states.shape[0] != self._batch_size:
            raise ValueError(f"batch size changed from {self._batch_size} to {key_states.shape[0]}; call begin()")
        if self._step_due(layer):
            self._step(layer)
        if not layer.managed and layer.sliding_window is not None:
            layer.trim_to_window()
        valid = self._arrival_validity(layer.tokens_seen, key_states.shape[2], key_states.device)
        keys, values = layer.update(key_states, value_states, valid=valid)
        self._peak_bytes = max(self._peak_bytes, self.kv_bytes())
        set_active_layer(layer)
        return keys, values

    def flush(self) -> None:
        """Run every policy step that is due now (instead of at the layers' next update)."""
        for layer in self.layers:
            if self._step_due(layer):
                self._step(layer)

    def kv_bytes(self) -> int:
        """Exact bytes of the physical keys and values held now by all layers (managed or not)."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def kv_bytes_peak(self) -> int:
        """Largest :meth:`kv_bytes` measured after any update of the current sequence."""
        return self._peak_bytes

    def kept_per_layer(self) -> list[int]:
        """Physical slots N held now by each layer."""
        return [layer.num_slots for layer in self.layers]

    def visible_per_layer(self) -> torch.Tensor:
        """(B, num_layers) float: slots each row can attend to now, per layer (mean over KV heads). Differs
        from :meth:`kept_per_layer` by input padding and by the invisible slots that align rows keeping
        fewer tokens (``KeepDecision.visible``)."""
        return torch.stack([layer.valid.sum(dim=-1).float().mean(dim=-1).cpu() for layer in self.layers], dim=1)

    def _start(self, batch_size: int) -> None:
        if self._padding is not None and self._padding.shape[0] != batch_size:
            raise ValueError(f"begin() declared {self._padding.shape[0]} rows but the model feeds {batch_size}")
        self._batch_size = batch_size
        if self.policy is not None:
            self.policy.begin(batch_size, len(self.layers))

    def _step_due(self, layer: EvictingLayer) -> bool:
        return layer.collect_queries and layer.pending >= self.config.update_every

    def _arrival_validity(self, start: int, count: int, device: torch.device) -> torch.Tensor | None:
        """(B, count) validity of the tokens with arrival indices start .. start + count - 1, None if all valid."""
        if self._padding is None or start >= self._padding_end:
            return None
        part = self._padding[:, start : start + count].to(device)
        if part.shape[1] < count:
            part = torch.cat([part, part.new_ones(part.shape[0], count - part.shape[1])], dim=1)
        return part

    def _step(self, layer: EvictingLayer) -> None:
        """Show ``layer`` to the policy, keep what it decides, log it."""
        n_new = layer.pending
        if layer.queries is None or layer.queries.shape[2] != n_new:
            buffered = 0 if layer.queries is None else layer.queries.shape[2]
            raise ValueError(
                f"layer {layer.layer_idx} buffered {buffered} queries for {n_new} new tokens: its attention does not "
                f"run through evicting_attention (attach the model's adapter first)"
            )
        num_slots = layer.num_slots
        query_index = torch.arange(layer.tokens_seen - n_new, layer.tokens_seen, device=layer.device)
        queries, keys, token_index, valid = layer.queries, layer.keys, layer.token_index, layer.valid
        scaling, window = layer.scaling, layer.sliding_window

        def attention_fn() -> torch.Tensor:
            return recent_attention(
                queries, keys, token_index, valid, query_index, valid[:, :, num_slots - n_new :], scaling,
                self.config.torch_attention_dtype, self.config.attention_chunk, window,
            )

        prompt_length = None
        if self._prompt_length is not None:
            prompt_length = torch.full((self._batch_size,), self._prompt_length, dtype=torch.long, device=layer.device)
        view = LayerView(
            layer=layer.layer_idx, step=layer.steps, token_index=token_index, valid=valid, n_new=n_new, keys=keys,
            attention_fn=attention_fn, prompt_length=prompt_length,
        )
        decision = self.policy.step(view)
        _check_decision(decision, token_index.shape, layer.layer_idx)
        self.retention.append(RetentionRecord(layer.steps, layer.layer_idx, num_slots, decision.kept))
        visible = None if decision.visible is None else decision.visible.to(layer.device)
        layer.keep(decision.indices.to(layer.device), visible)

    def _refuse(self, operation: str):
        raise ValueError(f"EvictingCache does not support {operation} (greedy decoding of whole batches only)")

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self._refuse("beam search (reorder_cache)")

    def crop(self, tokens_to_remove: int) -> None:
        self._refuse("crop (assisted decoding)")

    def batch_repeat_interleave(self, repeats: int):
        self._refuse("batch_repeat_interleave (several sequences per prompt)")

    def batch_select_indices(self, indices: torch.Tensor):
        self._refuse("batch_select_indices")


def _check_decision(decision: KeepDecision, slots_shape: torch.Size, layer_idx: int) -> None:
    """Raise ValueError unless ``decision.indices`` is (B, H, K) int64, 1 <= K <= N, strictly ascending in [0, N),
    and ``decision.visible`` is None or (B, H, K) bool."""
    indices = decision.indices
    batch, heads, num_slots = slots_shape
    if indices.dtype != torch.long or indices.ndim != 3 or tuple(indices.shape[:2]) != (batch, heads):
        raise ValueError(
            f"layer {layer_idx}: KeepDecision.indices must be int64 of shape ({batch}, {heads}, K), "
            f"got {indices.dtype} {tuple(indices.shape)}"
        )
    kept = indices.shape[2]
    if not 1 <= kept <= num_slots:
        raise ValueError(f"layer {layer_idx}: KeepDecision keeps {kept} slots, must be in [1, {num_slots}]")
    if indices.min() < 0 or indices.max() >= num_slots or (indices[..., 1:] <= indices[..., :-1]).any():
        raise ValueError(f"layer {layer_idx}: KeepDecision.indices must be strictly ascending in [0, {num_slots})")
    visible = decision.visible
    if visible is not None and (visible.dtype != torch.bool or visible.shape != indices.shape):
        raise ValueError(
            f"layer {layer_idx}: KeepDecision.visible must be bool of shape {tuple(indices.shape)}, "
            f"got {visible.dtype} {tuple(visible.shape)}"
        )

"""An evicting KV cache for transformers models (ARCHITECTURE.md, "The data flow of one NAMM step").

:class:`EvictingCache` is a transformers ``Cache`` whose layers (:class:`~namm_transfer.runtime.layer.EvictingLayer`,
the one home of a layer's eviction state) hold physical K/V, per-slot validity and arrival indices, and the recent
queries a policy step reads.

Policy schedule (namm-spec.md §1.3). A layer's policy step is due when ``update_every`` tokens have arrived since its
last one; the period and the attention numerics are declared by the policy (``policy.requirements``, a
:class:`~namm_transfer.namm.interface.StepRequirements`); a :class:`CacheConfig` value overrides them (e.g. one
schedule for every method of a comparison), and defaults fill in what neither sets. A chunk never carries a layer past a period boundary unstepped: the cache appends the tokens up
to the boundary and holds the rest back; the attention (:func:`~namm_transfer.runtime.attention.namm_attention_forward`)
attends that segment, runs the step and admits the next segment. So steps happen at absolute token counts
``update_every``, ``2 * update_every``, ... with exactly ``update_every`` new queries each, whether the prompt comes
in the runner's chunks or in ``model.generate``'s one-shot prefill. A step due at the end of a chunk runs lazily at
the next forward (before any layer appends) or on :meth:`EvictingCache.flush`: a layer's cache is read only by that
layer, so this equals stepping right after the forward.

Padding: left padding declared by :meth:`EvictingCache.begin` (the runner) or given to the model as a 2-D
``attention_mask`` (``generate``) marks slots invalid: never attended, seen by a policy as ``LayerView.attendable ==
False``. The prompt length a policy may protect (``LayerView.prompt_length``) is declared by :meth:`begin` or taken
from the first forward of a sequence (``generate`` feeds the whole prompt first).

At a step the cache shows the layer to the policy as a :class:`~namm_transfer.namm.interface.LayerView`, gathers the
kept slots of the returned :class:`~namm_transfer.namm.interface.KeepDecision` (slots it marks not ``visible`` become
invalid) and logs a :class:`~namm_transfer.namm.budget.RetentionRecord`.

Layers with a sliding window that no policy steps (Gemma3's and Qwen2's sliding layers, every Mistral layer with a
window, and every layer of a full cache) hold only the last ``window - 1`` tokens before a new chunk, like
transformers' ``DynamicSlidingWindowLayer`` (the mask hides older ones anyway).

Memory (:meth:`EvictingCache.kv_bytes`, :meth:`EvictingCache.policy_bytes` and their peaks): ``kv_bytes`` counts the
physical keys and values; ``policy_bytes`` every byte the method adds to them: per-slot validity and arrival indices,
buffered queries, tokens held back at a boundary, and the policy's own per-token state (``policy.state_bytes()``).
:meth:`EvictingCache.bytes_by_class` splits them by what they hold, and
:attr:`EvictingCache.total_bytes_peak_by_class` is that split at the moment of the total's peak.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from namm_transfer.namm.budget import RetentionRecord
from namm_transfer.namm.interface import NUMERICS, EvictionPolicy, KeepDecision, LayerView, StepRequirements
from namm_transfer.runtime.attention_rows import attention_rows
from namm_transfer.runtime.layer import ATTENTION_NAME, EvictingLayer, model_padding, set_active_layer

DEFAULT_UPDATE_EVERY = 512
DEFAULT_NUMERICS = "bfloat16"


@dataclass(frozen=True)
class CacheConfig:
    """Settings of an :class:`EvictingCache`; None leaves a setting to the policy's declaration.

    Attributes:
        update_every: new tokens per policy step (namm-spec.md §1.3: 512), overriding the policy's declared period;
            None: the policy's, or 512.
        attention_dtype: numerics of the attention rows a step reads, one of
            :data:`~namm_transfer.namm.interface.NUMERICS` ("official": bf16 logits as in the official eager
            attention; "bfloat16": fp32 logits, probabilities and GQA mean in bf16; "float32"), overriding the
            policy's declared numerics; None: the policy's, or "bfloat16".
        attention_chunk: recent queries per matmul block when the attention rows are recomputed on the torch path;
            bounds the step's memory to (B, Hq, attention_chunk, N) fp32 logits.
        layers_per_step: at most this many layers whose steps are due together go to a policy that offers
            ``step_layers`` (the NAMM) in one call; its workspace grows with it, its kernel launches shrink by it.
    """

    update_every: int | None = None
    attention_dtype: str | None = None
    attention_chunk: int = 128
    layers_per_step: int = 8

    def __post_init__(self) -> None:
        problems = []
        if self.update_every is not None and self.update_every < 1:
            problems.append(f"update_every must be None or >= 1, got {self.update_every}")
        if self.attention_dtype is not None and self.attention_dtype not in NUMERICS:
            problems.append(f"attention_dtype must be None or one of {', '.join(NUMERICS)}, got {self.attention_dtype!r}")
        if self.attention_chunk < 1:
            problems.append(f"attention_chunk must be >= 1, got {self.attention_chunk}")
        if self.layers_per_step < 1:
            problems.append(f"layers_per_step must be >= 1, got {self.layers_per_step}")
        if problems:
            raise ValueError("invalid CacheConfig: " + "; ".join(problems))


def _settle(configured, declared, default):
    """The configured value (an explicit override), else the policy's declared one, else the default."""
    return configured if configured is not None else declared if declared is not None else default


class EvictingCache(Cache):
    """A transformers ``Cache`` whose managed layers are pruned by an :class:`EvictionPolicy`.

    Args:
        policy: the eviction policy, or None for a full cache (same code path, no steps, no query buffer).
        num_layers: number of attention layers of the model.
        managed_layers: layers the policy manages (None: all).
        config: what the policy leaves open of the schedule and numerics, see :class:`CacheConfig`.

    Attributes:
        update_every: the policy period in tokens (the config's override, else the policy's declaration, else 512).
        numerics: numerics of the attention rows a step reads (likewise settled).
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
        needs = getattr(policy, "requirements", StepRequirements())
        self.update_every = _settle(self.config.update_every, needs.update_every, DEFAULT_UPDATE_EVERY)
        self.numerics = _settle(self.config.attention_dtype, needs.attention_numerics, DEFAULT_NUMERICS)
        stepped = set() if policy is None else managed
        layers = [
            EvictingLayer(i, self.update_every if i in stepped else None, i in stepped and needs.reads_attention,
                          self._step)
            for i in range(num_layers)
        ]
        super().__init__(layers=layers)
        self._padding: torch.Tensor | None = None
        self._declared_prompt_length: torch.Tensor | None = None
        self._clear_sequence()

    def _clear_sequence(self) -> None:
        self.retention: list[RetentionRecord] = []
        self._peaks = {"kv": 0, "policy": 0, "total": 0}
        self._peak_classes: dict[str, int] = {}
        self._batch_size: int | None = None
        self._prompt_length: torch.Tensor | None = None  # (B,) int64, set by the first forward

    def begin(
        self, attention_mask: torch.Tensor | None = None, prompt_length: int | torch.Tensor | None = None
    ) -> None:
        """Start a new batch of sequences: empty every layer, forget the log, declare left padding.

        Args:
            attention_mask: (B, L) 2-D mask of the prompt (1 = token, 0 = padding), left padding only; its padding
                slots are marked invalid: never attended, and a policy sees them as ``LayerView.attendable == False``.
                None: no padding declared (a 2-D mask the model receives, as under ``generate``, is read anyway).
            prompt_length: arrival index one past the last prompt token, one int for every row or a (B,) int64
                tensor; passed to the policy as ``LayerView.prompt_length``; 0 declares no prompt (nothing to
                protect, e.g. a Decision Transformer's episode). Defaults to L when a mask is given, else to the
                number of tokens of the sequence's first forward.
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
        if prompt_length is not None:
            prompt_length = torch.as_tensor(prompt_length, dtype=torch.long).reshape(-1)
            if int(prompt_length.min()) < 0:
                raise ValueError(f"prompt_length must be >= 0, got {prompt_length.tolist()}")
        self._declared_prompt_length = prompt_length
        self.reset()

    def reset(self) -> None:
        """Empty every layer and the retention log (keeps the padding declared by :meth:`begin`)."""
        super().reset()
        self._clear_sequence()

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the policy steps that are due, append the chunk (up to the layer's next period boundary), return the
        layer's physical (keys, values).

        key_states (B, H, n, D), value_states (B, H, n, Dv). Called by the model's attention before attending.
        """
        layer = self.layers[layer_idx]
        if layer.incoming is not None:
            raise ValueError(
                f"layer {layer_idx} got a new chunk before its attention admitted the last one: the model's attention "
                f"does not run through '{ATTENTION_NAME}' (attach the model's adapter first)"
            )
        if self._batch_size is None:
            self._start(key_states.shape[0], key_states.shape[2])
        elif key_states.shape[0] != self._batch_size:
            raise ValueError(f"batch size changed from {self._batch_size} to {key_states.shape[0]}; call begin()")
        if layer.step_due:
            self.flush()
        if layer.period is None and layer.sliding_window is not None:
            layer.trim_to_window()
        valid = self._arrival_validity(layer.tokens_seen, key_states.shape[2], key_states.device)
        keys, values = layer.update(key_states, value_states, valid=valid)
        self._track_peaks()
        set_active_layer(layer)
        return keys, values

    def flush(self) -> None:
        """Run every policy step that is due now (instead of at the next forward). A policy offering
        ``step_layers(views)`` gets up to ``config.layers_per_step`` layers per call: the eviction of a layer
        affects only that layer's later forwards, so its steps may run together."""
        due = [layer for layer in self.layers if layer.step_due]
        group = self.config.layers_per_step if hasattr(self.policy, "step_layers") else 1
        for start in range(0, len(due), group):
            self._step(*due[start : start + group])

    def kv_bytes(self) -> int:
        """Exact bytes of the physical keys and values held now by all layers (managed or not)."""
        return sum(layer.kv_bytes for layer in self.layers)

    def bytes_by_class(self) -> dict[str, int]:
        """Exact bytes held now, by what they hold.

        ``kv``: the physical keys and values of all layers (:meth:`kv_bytes`); ``attendable``, ``arrival``,
        ``queries``, ``incoming``: every layer's bookkeeping (:meth:`EvictingLayer.bookkeeping_bytes_by_class`); then
        the policy's per-sequence state: the classes of ``policy.state_bytes_by_class()`` when the policy offers it
        (e.g. a NAMM's ``ema`` and ``tail``), else ``policy_state`` = ``policy.state_bytes()`` (0 when it offers
        neither). Every class but ``kv`` counts in :meth:`policy_bytes`.
        """
        classes = {"kv": self.kv_bytes()}
        for layer in self.layers:
            for name, size in layer.bookkeeping_bytes_by_class().items():
                classes[name] = classes.get(name, 0) + size
        by_class = getattr(self.policy, "state_bytes_by_class", None)
        if by_class is not None:
            state = by_class()
            if set(state) & set(classes):
                raise ValueError(f"policy state classes {sorted(state)} clash with the cache's {sorted(classes)}")
            classes.update(state)
        else:
            state_bytes = getattr(self.policy, "state_bytes", None)
            classes["policy_state"] = 0 if state_bytes is None else state_bytes()
        return classes

    def policy_bytes(self) -> int:
        """Exact bytes the method adds to the K/V now: every class of :meth:`bytes_by_class` but ``kv`` (validity,
        arrival indices, buffered queries, held-back tokens, the policy's per-sequence state)."""
        classes = self.bytes_by_class()
        return sum(classes.values()) - classes["kv"]

    @property
    def kv_bytes_peak(self) -> int:
        """Largest :meth:`kv_bytes` measured after any update and around any step of the current sequence."""
        return self._peaks["kv"]

    @property
    def policy_bytes_peak(self) -> int:
        """Largest :meth:`policy_bytes` measured after any update and around any step of the current sequence."""
        return self._peaks["policy"]

    @property
    def total_bytes_peak(self) -> int:
        """Largest ``kv_bytes() + policy_bytes()`` measured after any update and around any step of the current
        sequence."""
        return self._peaks["total"]

    @property
    def total_bytes_peak_by_class(self) -> dict[str, int]:
        """:meth:`bytes_by_class` at the moment :attr:`total_bytes_peak` was measured (its values sum to it)."""
        return dict(self._peak_classes)

    def kept_per_layer(self) -> list[int]:
        """Physical slots N held now by each layer."""
        return [layer.num_slots for layer in self.layers]

    def visible_per_layer(self) -> torch.Tensor:
        """(B, num_layers) float: slots each row can attend to now, per layer (mean over KV heads). Differs
        from :meth:`kept_per_layer` by input padding and by the invisible slots that align rows keeping
        fewer tokens (``KeepDecision.visible``)."""
        return torch.stack([layer.attendable.sum(dim=-1).float().mean(dim=-1).cpu() for layer in self.layers], dim=1)

    def _track_peaks(self) -> None:
        classes = self.bytes_by_class()
        total = sum(classes.values())
        if total > self._peaks["total"] or not self._peak_classes:
            self._peak_classes = classes
        for name, value in (("kv", classes["kv"]), ("policy", total - classes["kv"]), ("total", total)):
            self._peaks[name] = max(self._peaks[name], value)

    def _start(self, batch_size: int, first_forward: int) -> None:
        if self._padding is not None and self._padding.shape[0] != batch_size:
            raise ValueError(f"begin() declared {self._padding.shape[0]} rows but the model feeds {batch_size}")
        declared = self._declared_prompt_length
        if declared is not None and declared.numel() not in (1, batch_size):
            raise ValueError(f"begin() declared {declared.numel()} prompt lengths but the model feeds {batch_size} rows")
        self._batch_size = batch_size
        self._prompt_length = (declared if declared is not None else torch.tensor([first_forward])).expand(batch_size)
        if self.policy is not None:
            self.policy.begin(batch_size, len(self.layers))

    def _arrival_validity(self, start: int, count: int, device: torch.device) -> torch.Tensor | None:
        """(B, count) validity of the tokens with arrival indices start .. start + count - 1 (padding declared by
        :meth:`begin` and padding in the model's attention mask), None if all are valid."""
        told = model_padding(start + count)
        declared = None
        if self._padding is not None and start < self._padding_end:
            declared = self._padding[:, start : start + count].to(device)
            if declared.shape[1] < count:
                declared = torch.cat([declared, declared.new_ones(declared.shape[0], count - declared.shape[1])], 1)
        if told is None or declared is None:
            return declared if told is None else told.to(device)
        return declared & told.to(device)

    def _step(self, *layers: EvictingLayer) -> None:
        """Show ``layers`` to the policy (one ``step`` call, or one ``step_layers`` call for several), keep what it
        decides, log it. Bytes are measured before (the query buffers are full then) and after."""
        self._track_peaks()
        views = [self._view(layer) for layer in layers]
        decisions = [self.policy.step(views[0])] if len(views) == 1 else self.policy.step_layers(views)
        for layer, view, decision in zip(layers, views, decisions):
            _check_decision(decision, view.arrival.shape, layer.layer_idx)
            record = RetentionRecord(layer.steps, layer.layer_idx, view.num_slots, decision.kept, layer.tokens_seen)
            self.retention.append(record)
            visible = None if decision.visible is None else decision.visible.to(layer.device)
            layer.keep(decision.indices.to(layer.device), visible)
        self._track_peaks()

    def _view(self, layer: EvictingLayer) -> LayerView:
        """The policy's view of a layer whose step is due."""
        n_new = layer.pending
        if layer.collect_queries and (layer.queries is None or layer.queries.shape[2] != n_new):
            buffered = 0 if layer.queries is None else layer.queries.shape[2]
            raise ValueError(
                f"layer {layer.layer_idx} buffered {buffered} queries for {n_new} new tokens: its attention does not "
                f"run through '{ATTENTION_NAME}' (attach the model's adapter first)"
            )
        num_slots = layer.num_slots
        query_index = torch.arange(layer.tokens_seen - n_new, layer.tokens_seen, device=layer.device)
        queries, keys, token_index, valid = layer.queries, layer.keys, layer.arrival, layer.attendable
        scaling, window = layer.scaling, layer.sliding_window

        def attention_fn() -> torch.Tensor:
            if queries is None:
                raise ValueError("the policy declared reads_attention=False but called LayerView.attention()")
            return attention_rows(
                queries, keys, token_index, valid, query_index, valid[:, :, num_slots - n_new :], scaling,
                self.numerics, self.config.attention_chunk, window,
            )

        return LayerView(
            layer=layer.layer_idx, step=layer.steps, arrival=token_index, attendable=valid, n_new=n_new, keys=keys,
            attention_fn=attention_fn, prompt_length=self._prompt_length.to(layer.device),
        )

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

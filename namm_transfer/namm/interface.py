"""The contract between eviction policies (NAMM and the baselines) and the runtime.

The runtime (``namm_transfer.runtime``) owns the KV cache of a real model. Every ``update_every`` tokens it
shows each managed layer to the policy as a :class:`LayerView` and applies the :class:`KeepDecision` the
policy returns. Policies see tensors only: no model, no tokenizer, no modality (ARCHITECTURE.md, "Layers").

Shapes use B = batch rows, H = KV heads of the layer, N = cached slots of the layer at step time
(tokens kept by earlier steps, in arrival order, followed by the ``n_new`` tokens that arrived since the
previous step), D = head dim, Q = ``n_new`` recent queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

import torch


@dataclass
class LayerView:
    """One managed layer at one policy step.

    Attributes:
        layer: index of the layer among the model's layers.
        step: how many policy steps this sequence has had before this one (0 at the first step).
        arrival: (B, H, N) integer (int32 from the runtime), absolute arrival index of every cached slot
            (0 = first token the sequence ever fed, evicted tokens included). For RoPE models without padding
            this equals the position id. Sorted ascending along N.
        attendable: (B, H, N) bool, False for slots never attended: input padding, and slots kept only to align
            a row's count with the other rows (``KeepDecision.visible``).
        n_new: number of slots at the end of N that arrived since the previous step.
        keys: (B, H, N, D) cached keys (post-RoPE where the model uses RoPE).
        attention_fn: returns (B, H, Q=n_new, N) post-softmax attention of the ``n_new`` most recent queries
            over all N slots, query heads averaged per KV head (GQA), zero where masked (causal, padding).
            Computed on first call and cached; policies that never call it cost nothing.
        prompt_length: (B,) int64 or None, arrival index one past the last prompt token of each row
            (lets a policy protect the prompt tail).
    """

    layer: int
    step: int
    arrival: torch.Tensor
    attendable: torch.Tensor
    n_new: int
    keys: torch.Tensor
    attention_fn: Callable[[], torch.Tensor]
    prompt_length: torch.Tensor | None = None
    _attention: torch.Tensor | None = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return self.arrival.shape[0]

    @property
    def num_heads(self) -> int:
        return self.arrival.shape[1]

    @property
    def num_slots(self) -> int:
        return self.arrival.shape[2]

    def attention(self) -> torch.Tensor:
        """(B, H, n_new, N) GQA-averaged attention of the recent queries; computed once."""
        if self._attention is None:
            self._attention = self.attention_fn()
        return self._attention


@dataclass
class KeepDecision:
    """Which slots of a layer survive a step.

    Attributes:
        indices: (B, H, K) int64 indices into the N slots of the :class:`LayerView`, ascending along K
            (chronological order is preserved). K is the same for every row and head of the layer, because
            the cache is a dense tensor; rows that keep fewer tokens are padded with slots the policy chooses.
        visible: optional (B, H, K) bool, False for padding slots that only align a row's count with the
            other rows of the batch: the runtime masks them (never attended, chosen last later). None means
            every kept slot stays visible. (Within one row, the NAMM's own count alignment across heads keeps
            its "filler" tokens visible, as the official implementation does, namm-spec.md §4.)
    """

    indices: torch.Tensor
    visible: torch.Tensor | None = None

    @property
    def kept(self) -> int:
        return self.indices.shape[-1]


NUMERICS = ("official", "bfloat16", "float32")
"""Names of the numerics of :meth:`LayerView.attention` (namm-spec.md §1.2, §7): "official" (bf16 logits as in the
official eager attention, fp32 softmax, probabilities and query-head mean in bf16), "bfloat16" (fp32 logits and
softmax, probabilities and mean in bf16), "float32" (no rounding)."""


@dataclass(frozen=True)
class StepRequirements:
    """What a policy needs from the runtime, declared once by the policy and read by the cache.

    Attributes:
        update_every: the period in tokens the policy was built for (a NAMM's evolved period, namm-spec.md §1.3), or
            None to run at the cache's period.
        reads_attention: whether the policy calls :meth:`LayerView.attention`; when False the runtime buffers no
            queries for it.
        attention_numerics: numerics of :meth:`LayerView.attention` (one of :data:`NUMERICS`), or None for the
            cache's.
    """

    update_every: int | None = None
    reads_attention: bool = True
    attention_numerics: str | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.update_every is not None and self.update_every < 1:
            problems.append(f"update_every must be None or >= 1, got {self.update_every}")
        if self.attention_numerics is not None and self.attention_numerics not in NUMERICS:
            problems.append(f"attention_numerics must be None or one of {', '.join(NUMERICS)}, "
                            f"got {self.attention_numerics!r}")
        if problems:
            raise ValueError("invalid StepRequirements: " + "; ".join(problems))


@runtime_checkable
class EvictionPolicy(Protocol):
    """What the runtime calls. Implemented by :class:`~namm_transfer.namm.policy.NammPolicy` and every
    baseline in :mod:`namm_transfer.namm.baselines`.

    ``begin`` starts a new batch of sequences and drops all per-sequence state. ``step`` is called once per
    managed layer every ``update_every`` tokens and returns what that layer keeps; the policy gathers its own
    per-token state with the same indices before returning.

    Optional members the runtime reads when present: ``requirements`` (a :class:`StepRequirements`; absent means
    the defaults: the cache's period and numerics, attention read) and ``state_bytes()`` (exact bytes of the
    per-sequence state the policy holds now, counted in the cache's ``policy_bytes``; absent means none).
    """

    name: str

    def begin(self, batch_size: int, num_layers: int) -> None: ...

    def step(self, view: LayerView) -> KeepDecision: ...

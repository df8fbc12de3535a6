"""Shared fixtures for the runtime tests: a tiny random Llama with GQA, small eviction policies implementing the
:class:`~namm_transfer.namm.interface.EvictionPolicy` protocol, and a helper that builds a "masked twin" of an
evicted cache (the full cache with evicted slots marked invalid and their values poisoned).

Everything is fp32 on CPU and seeded.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from namm_transfer.namm.interface import KeepDecision, LayerView
from namm_transfer.runtime.cache import EvictingCache

POISON = 1.0e6


class FullPolicy:
    """Runs every step and keeps every slot; records the views it saw."""

    name = "full"

    def __init__(self):
        self.views: list[LayerView] = []
        self.begun: list[tuple[int, int]] = []

    def begin(self, batch_size: int, num_layers: int) -> None:
        self.begun.append((batch_size, num_layers))

    def step(self, view: LayerView) -> KeepDecision:
        self.views.append(view)
        b, h, n = view.arrival.shape
        return KeepDecision(torch.arange(n, device=view.arrival.device).expand(b, h, n).clone())


class LowestPolicy:
    """Keeps, in every row and head, the ``keep[layer] - 1`` valid slots with the lowest arrival index plus the
    newest slot (the same set for every head): fixed, layer-dependent counts. Records (view, decision) pairs."""

    name = "lowest"

    def __init__(self, keep: dict[int, int]):
        self.keep = keep
        self.calls: list[tuple[LayerView, KeepDecision]] = []

    def begin(self, batch_size: int, num_layers: int) -> None:
        self.calls.clear()

    def step(self, view: LayerView) -> KeepDecision:
        b, h, n = view.arrival.shape
        k = min(self.keep[view.layer], n)
        # rank valid slots first, then by arrival; the newest slot ranks last and is forced in
        rank = (~view.attendable).long() * n + torch.arange(n, device=view.attendable.device)
        rank[..., -1] = 3 * n
        order = torch.argsort(rank, dim=-1)
        chosen = torch.cat([order[..., : k - 1], torch.full_like(order[..., :1], n - 1)], dim=-1)
        decision = KeepDecision(chosen.sort(dim=-1).values)
        self.calls.append((view, decision))
        return decision


class TopAttentionPolicy:
    """Keeps, per row and KV head, the ``k`` slots the newest query attends to most (newest forced in): different
    sets per head, so the cache becomes ragged across heads. Uses ``view.attention()``."""

    name = "top_attention"

    def __init__(self, k: int):
        self.k = k
        self.calls: list[tuple[LayerView, KeepDecision]] = []

    def begin(self, batch_size: int, num_layers: int) -> None:
        self.calls.clear()

    def step(self, view: LayerView) -> KeepDecision:
        n = view.num_slots
        score = view.attention()[:, :, -1].clone()  # (B, H, N)
        score[..., -1] = float("inf")
        top = score.topk(min(self.k, n), dim=-1).indices
        decision = KeepDecision(top.sort(dim=-1).values)
        self.calls.append((view, decision))
        return decision


@pytest.fixture(scope="session")
def tiny_llama() -> LlamaForCausalLM:
    """3 layers, hidden 64, 4 query heads, 2 KV heads (GQA), vocab 128, fp32, seeded."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def masked_twin():
    """Build, from a full cache and an evicted cache of the same tokens, a policy-free cache that holds every token
    with the evicted ones marked invalid and their values set to ``POISON``."""

    def build(full: EvictingCache, evicted: EvictingCache) -> EvictingCache:
        twin = EvictingCache(None, len(full.layers), full.managed_layers, full.config)
        for src, kept, dst in zip(full.layers, evicted.layers, twin.layers):
            survives = (src.arrival[..., :, None] == kept.arrival[..., None, :]).any(-1)
            dst.lazy_initialization(src.keys, src.values)
            dst.keys = src.keys.clone()
            dst.values = src.values.masked_fill(~survives[..., None], POISON)
            dst.attendable = src.attendable & survives
            dst.has_invalid = True
            dst.arrival = src.arrival.clone()
            dst.tokens_seen = src.tokens_seen
        return twin

    return build


@pytest.fixture
def policies():
    """The test policy classes."""
    return {"full": FullPolicy, "lowest": LowestPolicy, "top_attention": TopAttentionPolicy}

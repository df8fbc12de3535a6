"""A worked example of the Adapter protocol: a small plain-PyTorch causal transformer (not from transformers) whose
attention calls :func:`evicting_attention` through the cache, registered under its own model type and managed by
test policies. It has learned absolute positions and no RoPE; the eviction test feeds all-zero position ids, as a
Decision Transformer's GPT-2 backbone does, since the cache counts arrivals itself."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from namm_transfer.adapters.base import ModelGeometry, adapter_for, register_adapter
from namm_transfer.runtime.attention import evicting_attention
from namm_transfer.runtime.cache import CacheConfig, EvictingCache
from namm_transfer.runtime.runner import EvictingRunner, RunnerConfig

from conftest import POISON


@dataclass
class PlainConfig:
    model_type: str = "namm-test-plain-lm"
    vocab_size: int = 64
    dim: int = 32
    heads: int = 4
    kv_heads: int = 2
    layers: int = 2
    max_positions: int = 256


class PlainAttention(nn.Module):
    def __init__(self, config: PlainConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.heads, self.kv_heads = layer_idx, config.heads, config.kv_heads
        self.head_dim = config.dim // config.heads
        self.q = nn.Linear(config.dim, config.heads * self.head_dim)
        self.kv = nn.Linear(config.dim, 2 * config.kv_heads * self.head_dim)
        self.out = nn.Linear(config.heads * self.head_dim, config.dim)

    def forward(self, x: torch.Tensor, cache: EvictingCache | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            k, v = cache.update(k, v, self.layer_idx)
            y = evicting_attention(cache.layers[self.layer_idx], q, k, v, self.head_dim**-0.5)
        return self.out(y.transpose(1, 2).reshape(b, t, -1))


class PlainBlock(nn.Module):
    def __init__(self, config: PlainConfig, layer_idx: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(config.dim), nn.LayerNorm(config.dim)
        self.attn = PlainAttention(config, layer_idx)
        hidden = 2 * config.dim
        self.mlp = nn.Sequential(nn.Linear(config.dim, hidden), nn.GELU(), nn.Linear(hidden, config.dim))

    def forward(self, x: torch.Tensor, cache: EvictingCache | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache)
        return x + self.mlp(self.norm2(x))


class PlainLM(nn.Module):
    def __init__(self, config: PlainConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.positions = nn.Embedding(config.max_positions, config.dim)
        self.blocks = nn.ModuleList(PlainBlock(config, i) for i in range(config.layers))
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab_size)

    def forward(self, input_ids=None, inputs_embeds=None, position_ids=None, cache=None) -> torch.Tensor:
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if position_ids is None:
            position_ids = torch.arange(x.shape[1]).expand(x.shape[0], -1)
        x = x + self.positions(position_ids)
        for block in self.blocks:
            x = block(x, cache)
        return self.head(self.norm(x))


@register_adapter(PlainConfig.model_type)
class PlainAdapter:
    name = "plain_lm"

    def decoder(self, model):
        return model

    def geometry(self, model):
        c = model.config
        return ModelGeometry(c.layers, c.heads, c.kv_heads, c.dim // c.heads, frozenset(range(c.layers)))

    def attach(self, model):
        return lambda: None  # its attention always goes through evicting_attention when given a cache

    def forward_chunk(self, model, cache, *, position_ids, input_ids=None, inputs_embeds=None, last_only=False):
        logits = model(input_ids=input_ids, inputs_embeds=inputs_embeds, position_ids=position_ids, cache=cache)
        return logits[:, -1:] if last_only else logits


def make_model() -> PlainLM:
    torch.manual_seed(0)
    return PlainLM(PlainConfig()).eval()


def test_registry_finds_the_adapter_and_refuses_a_second_one_for_the_type():
    assert isinstance(adapter_for(make_model()), PlainAdapter)
    with pytest.raises(ValueError, match="already has adapter PlainAdapter"):
        register_adapter(PlainConfig.model_type)(type("Other", (), {}))


def test_full_budget_equals_the_models_own_full_forward(policies):
    model = make_model()
    adapter = adapter_for(model)
    ids = torch.randint(0, 64, (2, 50))
    policy = policies["full"]()
    config = RunnerConfig(chunk_size=10, max_new_tokens=20, cache=CacheConfig(update_every=16))
    result = EvictingRunner(adapter, model, policy, config).generate(ids, return_logits=True)
    assert [v.n_new for v in policy.views[::2]] == [16, 16, 16, 16]  # steps at 16, 32, 48, 64 tokens
    with torch.no_grad():
        full = model(torch.cat([ids, result.new_tokens[:, :-1]], dim=1))
    torch.testing.assert_close(result.logits, full[:, 49:], atol=1e-5, rtol=0)
    assert torch.equal(result.new_tokens, full[:, 49:].argmax(-1))


@torch.no_grad()
def test_evicted_tokens_are_never_attended(policies, masked_twin):
    """All-zero position ids; ragged per-head eviction; the twin holds every token with the evicted ones masked and
    poisoned: later outputs agree."""
    model = make_model()
    adapter = adapter_for(model)
    ids = torch.randint(0, 64, (1, 32))
    forced = torch.randint(0, 64, (1, 4))
    config = CacheConfig(update_every=32, attention_dtype="float32")
    evicted = EvictingCache(policies["top_attention"](k=10), 2, config=config)
    full = EvictingCache(None, 2, config=config)
    zeros = torch.zeros(1, 8, dtype=torch.long)  # no positions, as for a Decision Transformer
    for cache in (evicted, full):
        for start in range(0, 32, 8):
            adapter.forward_chunk(model, cache, input_ids=ids[:, start : start + 8], position_ids=zeros)
    evicted.flush()
    assert evicted.kept_per_layer() == [10, 10]
    assert not torch.equal(evicted.layers[0].arrival[0, 0], evicted.layers[0].arrival[0, 1])
    twin = masked_twin(full, evicted)
    outputs = []
    for cache in (evicted, twin, full):
        steps = [
            adapter.forward_chunk(model, cache, input_ids=forced[:, t : t + 1], position_ids=zeros[:, :1])
            for t in range(4)
        ]
        outputs.append(torch.cat(steps, dim=1))
    got, ref, unpruned = outputs
    assert (twin.layers[0].values == POISON).any()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert (got - unpruned).abs().max() > 1e-3

"""Chunked prefill and greedy decoding over an evicting KV cache (ARCHITECTURE.md, "The data flow of one NAMM
step"; namm-spec.md §1.3).

The prompt is fed in chunks of ``chunk_size`` tokens that are also cut at every multiple of ``update_every``, so the
policy steps at absolute token counts ``update_every``, ``2 * update_every``, ... with exactly ``update_every`` new
queries each, as in the official implementation (its 128-token chunks and 512-token period). Decoding is greedy, one
token per forward, and keeps the same schedule. Positions are explicit and absolute (attention-mask cumsum - 1 under
left padding), so kept tokens keep their RoPE positions after eviction. ``policy=None`` runs the same code with a
full cache, so timings and memory compare like with like.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from namm_transfer.namm.budget import RetentionRecord
from namm_transfer.namm.interface import EvictionPolicy
from namm_transfer.runtime.cache import CacheConfig, EvictingCache


@dataclass(frozen=True)
class RunnerConfig:
    """Settings of an :class:`EvictingRunner`.

    Attributes:
        chunk_size: prefill chunk length (namm-spec.md §1.3: 128).
        max_new_tokens: default number of tokens to generate.
        cache: the evicting cache's settings; its ``update_every`` is the policy period the chunks align to.
    """

    chunk_size: int = 128
    max_new_tokens: int = 128
    cache: CacheConfig = field(default_factory=CacheConfig)

    def __post_init__(self) -> None:
        problems = []
        if self.chunk_size < 1:
            problems.append(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not isinstance(self.cache, CacheConfig):
            problems.append(f"cache must be a CacheConfig, got {type(self.cache).__name__}")
        if problems:
            raise ValueError("invalid RunnerConfig: " + "; ".join(problems))

    @property
    def update_every(self) -> int:
        return self.cache.update_every


@dataclass
class GenerationResult:
    """What :meth:`EvictingRunner.generate` returns.

    Attributes:
        new_tokens: (B, T) int64 generated tokens; after a row's eos the row holds eos.
        logits: (B, T, V) float logits of every decoding step (the step that chose ``new_tokens[:, t]``), or None.
        retention: the cache's retention log (one record per step and managed layer).
        kv_bytes_peak: largest physical K/V bytes held at any time.
        kv_bytes_final: physical K/V bytes held at the end.
        kept_per_layer: physical slots per layer at the end.
        visible_per_layer: (B, num_layers) slots each row can attend to at the end (see
            :meth:`EvictingCache.visible_per_layer`).
        tokens_seen: tokens fed through the model (prompt, padding included, plus all fed generated tokens).
        prefill_seconds: wall time of the prefill (first token's logits included).
        decode_seconds: wall time of the decoding forwards.
    """

    new_tokens: torch.Tensor
    logits: torch.Tensor | None
    retention: list[RetentionRecord]
    kv_bytes_peak: int
    kv_bytes_final: int
    kept_per_layer: list[int]
    visible_per_layer: torch.Tensor
    tokens_seen: int
    prefill_seconds: float
    decode_seconds: float


def prefill_chunks(start: int, stop: int, chunk_size: int, update_every: int) -> list[tuple[int, int]]:
    """Half-open (a, b) ranges covering arrival indices [start, stop): at most ``chunk_size`` long, and never
    crossing a multiple of ``update_every`` (so a policy step always sees exactly ``update_every`` queries)."""
    if chunk_size < 1 or update_every < 1:
        raise ValueError(f"chunk_size and update_every must be >= 1, got {chunk_size} and {update_every}")
    bounds = []
    while start < stop:
        end = min(start + chunk_size, stop, (start // update_every + 1) * update_every)
        bounds.append((start, end))
        start = end
    return bounds


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EvictingRunner:
    """Greedy generation with an evicting cache, through a model :class:`~namm_transfer.adapters.base.Adapter`.

    Args:
        adapter: the model family's adapter.
        model: the model.
        policy: the eviction policy, or None for a full cache.
        config: chunking, generation length and cache settings.
    """

    def __init__(self, adapter, model: nn.Module, policy: EvictionPolicy | None, config: RunnerConfig | None = None):
        self.adapter = adapter
        self.model = model
        self.policy = policy
        self.config = config if config is not None else RunnerConfig()
        self.geometry = adapter.geometry(model)

    def new_cache(self) -> EvictingCache:
        """An empty evicting cache for this model, policy and configuration."""
        return EvictingCache(self.policy, self.geometry.num_layers, self.geometry.managed_layers, self.config.cache)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        eos_token_id: int | None = None,
        return_logits: bool = False,
        *,
        inputs_embeds: torch.Tensor | None = None,
    ) -> GenerationResult:
        """Chunked prefill of the prompt, then greedy decoding.

        Args:
            input_ids: (B, L) int64 prompt, left-padded if rows differ in length.
            attention_mask: (B, L) 1 for tokens, 0 for left padding; None if there is no padding. Right padding
                raises ValueError.
            max_new_tokens: tokens to generate (default ``config.max_new_tokens``); fewer if every row hit eos.
            eos_token_id: token that ends a row.
            return_logits: also return the (B, T, V) logits of every decoding step.
            inputs_embeds: (B, L, hidden) prompt embeddings instead of ``input_ids`` (e.g. a video prompt);
                decoding then feeds the generated token ids.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        prompt = input_ids if input_ids is not None else inputs_embeds
        max_new_tokens = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        device = next(self.model.parameters()).device
        prompt = prompt.to(device)
        batch, length = prompt.shape[:2]
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (batch, length):
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != prompt {(batch, length)}")
            attention_mask = attention_mask.to(device)
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        else:
            positions = torch.arange(length, device=device).expand(batch, length)
        cache = self.new_cache()
        cache.begin(attention_mask, prompt_length=length)
        key = "input_ids" if input_ids is not None else "inputs_embeds"
        restore = self.adapter.attach(self.model)
        try:
            _synchronize(device)
            start = time.perf_counter()
            for a, b in prefill_chunks(0, length, self.config.chunk_size, self.config.update_every):
                logits = self.adapter.forward_chunk(
                    self.model, cache, position_ids=positions[:, a:b], last_only=True, **{key: prompt[:, a:b]}
                )[:, -1]
            _synchronize(device)
            prefill_seconds = time.perf_counter() - start
            start = time.perf_counter()
            tokens, step_logits = self._decode(cache, logits, positions[:, -1] + 1, max_new_tokens, eos_token_id,
                                               return_logits)
            cache.flush()
            _synchronize(device)
            decode_seconds = time.perf_counter() - start
        finally:
            restore()
        return GenerationResult(
            new_tokens=tokens,
            logits=step_logits,
            retention=list(cache.retention),
            kv_bytes_peak=cache.kv_bytes_peak,
            kv_bytes_final=cache.kv_bytes(),
            kept_per_layer=cache.kept_per_layer(),
            visible_per_layer=cache.visible_per_layer(),
            tokens_seen=cache.get_seq_length(),
            prefill_seconds=prefill_seconds,
            decode_seconds=decode_seconds,
        )

    def _decode(
        self,
        cache: EvictingCache,
        logits: torch.Tensor,
        next_position: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | None,
        return_logits: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Greedy loop from the prompt's last logits (B, V); next_position (B,). Returns tokens (B, T) and logits."""
        finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        tokens, kept_logits = [], []
        for step in range(max_new_tokens):
            token = logits.argmax(dim=-1)
            if eos_token_id is not None:
                token = token.masked_fill(finished, eos_token_id)
                finished |= token == eos_token_id
            tokens.append(token)
            if return_logits:
                kept_logits.append(logits.float())
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            logits = self.adapter.forward_chunk(
                self.model, cache, input_ids=token[:, None], position_ids=(next_position + step)[:, None],
                last_only=True,
            )[:, -1]
        return torch.stack(tokens, dim=1), torch.stack(kept_logits, dim=1) if return_logits else None

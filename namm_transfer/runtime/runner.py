"""Chunked prefill and greedy decoding over an evicting KV cache (ARCHITECTURE.md, "The data flow of one NAMM
step"; namm-spec.md §1.3).

The prompt is fed in chunks of ``chunk_size`` tokens that are also cut at every multiple of ``update_every``, so the
policy steps at absolute token counts ``update_every``, ``2 * update_every``, ... with exactly ``update_every`` new
queries each, as in the official implementation (its 128-token chunks and 512-token period). Decoding is greedy, one
token per forward, and keeps the same schedule. Positions are explicit and absolute, so kept tokens keep their RoPE
positions after eviction. ``policy=None`` runs the same code with a full cache, so timings and memory compare like
with like.

Rows of different lengths are never padded (a row's eviction must not depend on its batch: padding would count as
arrivals for the period and the budgets). The left padding of the input is dropped and every row starts at arrival
0; once the shortest prompt is consumed, each forward feeds every row its next token, a prompt token for a row still
reading its prompt and its own greedy token for a row that is generating. So every row sees exactly the schedule,
positions and arrival counts it would see alone, and only the forwards between the shortest and the longest prompt
go one token at a time.
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
        cache: the evicting cache's settings (what the policy leaves open of the period and numerics).
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


@dataclass
class GenerationResult:
    """What :meth:`EvictingRunner.generate` returns.

    Attributes:
        new_tokens: (B, T) int64 generated tokens; after a row's eos the row holds eos.
        logits: (B, T, V) float logits of every decoding step (the step that chose ``new_tokens[:, t]``), or None.
        retention: the cache's retention log (one record per step and managed layer).
        kv_bytes_peak: largest physical K/V bytes held at any time.
        kv_bytes_final: physical K/V bytes held at the end.
        policy_bytes_peak: largest bytes the method added to the K/V at any time (validity, arrival indices,
            buffered queries, the policy's per-token state; :meth:`EvictingCache.policy_bytes`).
        policy_bytes_final: those bytes at the end.
        total_bytes_peak: largest K/V + policy bytes at any time (not the sum of the two peaks).
        total_bytes_final: ``kv_bytes_final + policy_bytes_final``.
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
    policy_bytes_peak: int
    policy_bytes_final: int
    total_bytes_peak: int
    total_bytes_final: int
    kept_per_layer: list[int]
    visible_per_layer: torch.Tensor
    tokens_seen: int
    prefill_seconds: float
    decode_seconds: float


@dataclass
class ContinuationScore:
    """What :meth:`EvictingRunner.score_continuation` returns.

    Attributes:
        log_probs: (B, T) fp32 log-probability of each continuation token given everything before it, read
            through the evicting cache (teacher forcing).
        retention: the cache's retention log (one record per step and managed layer).
        visible_per_layer: (B, num_layers) slots each row can attend to at the end.
        kv_bytes_peak: largest physical K/V bytes held at any time.
        total_bytes_peak: largest K/V + policy bytes held at any time.
        tokens_seen: prompt plus continuation tokens fed (L + T).
    """

    log_probs: torch.Tensor
    retention: list[RetentionRecord]
    visible_per_layer: torch.Tensor
    kv_bytes_peak: int
    total_bytes_peak: int
    tokens_seen: int


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
        """Chunked prefill of the prompts (up to the shortest), then greedy decoding, every row on its own schedule.

        Args:
            input_ids: (B, L) int64 prompt, left-padded if rows differ in length (the padding is dropped, see the
                module docstring).
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
        prompt, lengths = _left_aligned(prompt.to(device), attention_mask)
        shortest = int(lengths.min())
        cache = self.new_cache()
        cache.begin(prompt_length=lengths)
        key = "input_ids" if input_ids is not None else "inputs_embeds"
        restore = self.adapter.attach(self.model)
        try:
            _synchronize(device)
            start = time.perf_counter()
            positions = torch.arange(shortest, device=device).expand(prompt.shape[0], shortest)
            for a, b in prefill_chunks(0, shortest, self.config.chunk_size, cache.update_every):
                logits = self.adapter.forward_chunk(
                    self.model, cache, position_ids=positions[:, a:b], last_only=True, **{key: prompt[:, a:b]}
                )[:, -1]
            _synchronize(device)
            prefill_seconds = time.perf_counter() - start
            start = time.perf_counter()
            tokens, step_logits = self._decode(cache, logits, prompt, lengths, max_new_tokens, eos_token_id,
                                               return_logits)
            cache.flush()
            _synchronize(device)
            decode_seconds = time.perf_counter() - start
        finally:
            restore()
        kv_final, policy_final = cache.kv_bytes(), cache.policy_bytes()
        return GenerationResult(
            new_tokens=tokens,
            logits=step_logits,
            retention=list(cache.retention),
            kv_bytes_peak=cache.kv_bytes_peak,
            kv_bytes_final=kv_final,
            policy_bytes_peak=cache.policy_bytes_peak,
            policy_bytes_final=policy_final,
            total_bytes_peak=cache.total_bytes_peak,
            total_bytes_final=kv_final + policy_final,
            kept_per_layer=cache.kept_per_layer(),
            visible_per_layer=cache.visible_per_layer(),
            tokens_seen=cache.get_seq_length(),
            prefill_seconds=prefill_seconds,
            decode_seconds=decode_seconds,
        )

    @torch.no_grad()
    def score_continuation(self, input_ids: torch.Tensor, continuation_ids: torch.Tensor) -> ContinuationScore:
        """Teacher-forced log-probabilities of ``continuation_ids`` after ``input_ids`` under eviction.

        The prompt and its continuation are fed as one sequence on the runner's schedule (chunks cut at every
        multiple of the period, so the policy steps exactly where it would while decoding the continuation); the
        prompt length is the prompt's, so a policy's protected prompt tail is the question, not the answer.
        One forward pass per chunk, no sampling: the dense fitness of issue 8 and the evaluation's answer
        likelihood.

        Args:
            input_ids: (B, L) int64 prompts of one length (no padding).
            continuation_ids: (B, T) or (T,) int64 tokens scored after the prompt, T >= 1.
        """
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be (B, L) with L >= 1, got {tuple(input_ids.shape)}")
        batch, length = input_ids.shape
        if continuation_ids.dim() == 1:
            continuation_ids = continuation_ids.expand(batch, -1)
        if continuation_ids.dim() != 2 or continuation_ids.shape[0] != batch or continuation_ids.shape[1] < 1:
            raise ValueError(f"continuation_ids must be (T,) or ({batch}, T) with T >= 1, got "
                             f"{tuple(continuation_ids.shape)}")
        device = next(self.model.parameters()).device
        sequence = torch.cat([input_ids, continuation_ids], dim=1).to(device)
        total, count = sequence.shape[1], continuation_ids.shape[1]
        cache = self.new_cache()
        cache.begin(prompt_length=torch.full((batch,), length, dtype=torch.long, device=device))
        positions = torch.arange(total, device=device).expand(batch, total)
        predicting = []  # logits (B, t, V) of columns length - 1 .. total - 2, in order
        restore = self.adapter.attach(self.model)
        try:
            for a, b in prefill_chunks(0, total, self.config.chunk_size, cache.update_every):
                needed = b > length - 1 and a < total - 1
                logits = self.adapter.forward_chunk(self.model, cache, position_ids=positions[:, a:b],
                                                    input_ids=sequence[:, a:b], last_only=not needed)
                if needed:
                    first, last = max(a, length - 1), min(b, total - 1)
                    predicting.append(logits[:, first - a:last - a].float())
            cache.flush()
        finally:
            restore()
        log_probs = torch.log_softmax(torch.cat(predicting, dim=1), dim=-1)
        chosen = log_probs.gather(-1, sequence[:, length:, None]).squeeze(-1)
        return ContinuationScore(
            log_probs=chosen,
            retention=list(cache.retention),
            visible_per_layer=cache.visible_per_layer(),
            kv_bytes_peak=cache.kv_bytes_peak,
            total_bytes_peak=cache.total_bytes_peak,
            tokens_seen=cache.get_seq_length(),
        )

    def _decode(
        self,
        cache: EvictingCache,
        logits: torch.Tensor,
        prompt: torch.Tensor,
        lengths: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | None,
        return_logits: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Greedy loop from the logits (B, V) at the shortest prompt's last token, one token per row and forward.

        ``prompt`` (B, L, ...) holds row b's prompt in its first ``lengths[b]`` columns. At column t a row whose
        prompt is done picks its next token from the logits of column t - 1 and feeds it; the other rows feed
        their prompt token t. Returns tokens (B, T) and logits (B, T, V): row b's k-th token was chosen from the
        logits of column ``lengths[b] - 1 + k``. A finished row (eos) holds eos; rows stop at ``max_new_tokens``.
        """
        batch, device = logits.shape[0], logits.device
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        tokens = torch.full((batch, max_new_tokens), -1, dtype=torch.long, device=device)
        kept_logits = torch.zeros(batch, max_new_tokens, logits.shape[-1], device=device) if return_logits else None
        made = torch.zeros(batch, dtype=torch.long, device=device)
        embed = prompt.dtype.is_floating_point  # an embeddings prompt: generated tokens are embedded to join it
        column = int(lengths.min())
        while True:
            generating = (lengths <= column) & (made < max_new_tokens)
            token = logits.argmax(dim=-1)
            if eos_token_id is not None:
                token = token.masked_fill(finished, eos_token_id)
                finished |= generating & (token == eos_token_id)
            rows = generating.nonzero().flatten()
            tokens[rows, made[rows]] = token[rows]
            if return_logits:
                kept_logits[rows, made[rows]] = logits[rows].float()
            made += generating.long()
            if bool(((made >= max_new_tokens) | finished).all()):
                break
            if column < prompt.shape[1]:  # some rows still read their prompt: mix prompt and generated inputs
                own = lengths > column
                fed = self.model.get_input_embeddings()(token) if embed else token
                mixed = torch.where(own.view(-1, *([1] * (prompt.dim() - 2))), prompt[:, column], fed)
                inputs = {"inputs_embeds" if embed else "input_ids": mixed[:, None]}
            else:
                inputs = {"input_ids": token[:, None]}
            logits = self.adapter.forward_chunk(
                self.model, cache, position_ids=torch.full((batch, 1), column, device=device), last_only=True,
                **inputs,
            )[:, -1]
            column += 1
        count = int(made.max())
        tokens = tokens[:, :count]
        if eos_token_id is not None:  # rows that all finished early: the rest holds eos
            tokens = tokens.masked_fill(tokens < 0, eos_token_id)
        return tokens, kept_logits[:, :count] if return_logits else None


def _left_aligned(prompt: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the left padding: (B, L, ...) prompt with row b's ``lengths[b]`` tokens in its first columns (the rest is
    never fed), and lengths (B,) int64. Right padding raises ValueError."""
    batch, length = prompt.shape[:2]
    if attention_mask is None:
        return prompt, torch.full((batch,), length, dtype=torch.long, device=prompt.device)
    if tuple(attention_mask.shape) != (batch, length):
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != prompt {(batch, length)}")
    mask = attention_mask.to(prompt.device).bool()
    if (mask[:, 1:] < mask[:, :-1]).any():
        raise ValueError("attention_mask must be left-padded (zeros only before the first token of a row)")
    lengths = mask.sum(dim=1)
    if int(lengths.min()) < 1:
        raise ValueError("attention_mask has a row with no token")
    shift = length - lengths  # row b's first token sits at column shift[b]
    columns = (torch.arange(length, device=prompt.device)[None, :] + shift[:, None]).clamp(max=length - 1)
    index = columns.view(batch, length, *([1] * (prompt.dim() - 2))).expand_as(prompt)
    return prompt.gather(1, index), lengths

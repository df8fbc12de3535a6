"""Answering one text item with one eviction policy, and measuring what it cost in memory (K/V and the policy's
own bytes). The dense alternative, the reference answer's likelihood, is :mod:`namm_transfer.answer_likelihood`.

Used by the text evaluation program (``python -m namm_transfer.text``), the demo and the evolution fitness.
Several batch rows can answer the same prompt at once (one per NAMM population member, docs/algorithm.md §5.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from namm_transfer.adapters.base import adapter_for
from namm_transfer.cli import IntRange
from namm_transfer.evals.longbench import truncate_middle
from namm_transfer.evals.text_tasks import TextItem
from namm_transfer.namm.budget import RetentionRecord
from namm_transfer.namm.interface import EvictionPolicy
from namm_transfer.runtime.cache import CacheConfig
from namm_transfer.runtime.runner import EvictingRunner, RunnerConfig

PROMPT_TOKENS = IntRange(256, 131_072)
"""Prompt lengths the programs accept for built-in tasks: every task fits in 256 tokens, and 128k tokens is the
longest context of the models this suite targets (a longer prompt would only exhaust memory)."""
SEED = IntRange(0, 999_999)
"""Item seeds: train seeds stop below the first held-out one (10**6, evals/text_tasks.py)."""
CHUNK_TOKENS = IntRange(16, 8192)
"""Prefill chunk lengths the programs accept."""
PERIOD_TOKENS = IntRange(16, 65_536)
"""NAMM periods (``update_every``) the programs accept; a multiple of the NAMM's hop is checked by NammConfig."""


@dataclass
class ItemRun:
    """One prompt answered by B rows under one policy.

    Attributes:
        predictions: B decoded answers.
        kv_retained: B fractions: visible KV slots at the end / (managed layers x tokens seen), i.e. the share
            of the full cache's KV memory the row still holds (1.0 for the full cache).
        kept_per_layer: per layer, visible slots at the end / tokens seen, averaged over rows.
        kv_bytes_peak: largest physical K/V bytes held at any time (all rows).
        kv_bytes_final: physical K/V bytes held at the end (all rows).
        policy_bytes_peak: largest bytes the method adds to the K/V at any time (validity, arrival indices,
            buffered queries, the policy's per-token state; all rows).
        policy_bytes_final: those bytes at the end.
        total_bytes_peak: largest K/V + policy bytes at any time (not the sum of the two peaks).
        total_bytes_final: K/V + policy bytes at the end.
        prompt_tokens: prompt length L.
        tokens_seen: tokens fed (prompt plus generated tokens fed back).
        seconds: prefill + decoding wall time.
        retention: the runtime's retention log (step, layer, slots before, kept).
    """

    predictions: list[str]
    kv_retained: list[float]
    kept_per_layer: list[float]
    kv_bytes_peak: int
    kv_bytes_final: int
    policy_bytes_peak: int
    policy_bytes_final: int
    total_bytes_peak: int
    total_bytes_final: int
    prompt_tokens: int
    tokens_seen: int
    seconds: float
    retention: list[RetentionRecord]


def kept_share(visible_per_layer: torch.Tensor, managed_layers, tokens_seen: int) -> list[float]:
    """Per row, the share of the full cache's KV memory still held: visible slots summed over the managed layers
    / (managed layers x tokens seen). ``visible_per_layer`` is (B, num_layers)."""
    managed = sorted(managed_layers)
    visible = visible_per_layer[:, managed].float().sum(dim=1)
    return (visible / (len(managed) * tokens_seen)).tolist()


class TextGenerator:
    """Greedy answers from a causal LM whose KV cache an eviction policy manages.

    Args:
        model: a Hugging Face causal LM with a registered adapter.
        tokenizer: its tokenizer.
        cache: cache settings (policy period and attention numerics).
        chunk_size: prefill chunk length (docs/algorithm.md §1.3: 128).
        chat_template: "auto" (use the tokenizer's template when it has one), "on" or "off".
        max_prompt_tokens: prompts longer than this are cut in the middle (LongBench convention, §6).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        cache: CacheConfig,
        chunk_size: int = 128,
        chat_template: str = "auto",
        max_prompt_tokens: int | None = None,
    ) -> None:
        if chat_template not in ("auto", "on", "off"):
            raise ValueError(f"chat_template must be 'auto', 'on' or 'off', got {chat_template!r}")
        has_template = getattr(tokenizer, "chat_template", None) is not None
        if chat_template == "on" and not has_template:
            raise ValueError("the tokenizer has no chat template; use --chat-template off")
        self.model = model
        self.tokenizer = tokenizer
        self.adapter = adapter_for(model)
        self.runner_config = RunnerConfig(chunk_size=chunk_size, cache=cache)
        self.use_chat_template = has_template if chat_template == "auto" else chat_template == "on"
        self.max_prompt_tokens = max_prompt_tokens
        self.device = next(model.parameters()).device

    def encode(self, prompt: str) -> torch.Tensor:
        """(1, L) int64 token ids of ``prompt`` as the model sees it (chat template applied if enabled)."""
        if self.use_chat_template:
            messages = [{"role": "user", "content": prompt}]
            encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
            ids = list(encoded["input_ids"])
        else:
            ids = self.tokenizer(prompt)["input_ids"]
        if self.max_prompt_tokens is not None:
            ids = truncate_middle(ids, self.max_prompt_tokens)
        return torch.tensor([ids], dtype=torch.long)

    def run(self, item: TextItem, policy: EvictionPolicy | None, rows: int = 1) -> ItemRun:
        """Answer ``item`` with ``rows`` identical rows (rows > 1 for a NAMM population) under ``policy``."""
        input_ids = self.encode(item.prompt).expand(rows, -1).contiguous()
        runner = EvictingRunner(self.adapter, self.model, policy, self.runner_config)
        result = runner.generate(
            input_ids, max_new_tokens=item.max_new_tokens, eos_token_id=self.tokenizer.eos_token_id
        )
        predictions = []
        for row in result.new_tokens.tolist():
            if self.tokenizer.eos_token_id in row:
                row = row[: row.index(self.tokenizer.eos_token_id)]
            predictions.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        visible = result.visible_per_layer.float()  # (B, num_layers)
        per_row = kept_share(visible, runner.geometry.managed_layers, result.tokens_seen)
        per_layer = (visible.mean(dim=0) / result.tokens_seen).tolist()
        return ItemRun(
            predictions=predictions,
            kv_retained=per_row,
            kept_per_layer=per_layer,
            kv_bytes_peak=result.kv_bytes_peak,
            kv_bytes_final=result.kv_bytes_final,
            policy_bytes_peak=result.policy_bytes_peak,
            policy_bytes_final=result.policy_bytes_final,
            total_bytes_peak=result.total_bytes_peak,
            total_bytes_final=result.total_bytes_final,
            prompt_tokens=input_ids.shape[1],
            tokens_seen=result.tokens_seen,
            seconds=result.prefill_seconds + result.decode_seconds,
            retention=result.retention,
        )


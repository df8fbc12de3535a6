"""Answering one video prompt through the evicting runtime and reading what the cache kept of each frame.

:class:`RetentionRunner` is an :class:`~namm_transfer.runtime.runner.EvictingRunner` that remembers the cache of its
last ``generate`` (the runner's ``new_cache`` is the extension point), so the per-frame retention of
:mod:`namm_transfer.video.retention` can be read after decoding. :func:`answer_video` ties the two together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from namm_transfer.adapters.llava_next_video import VideoPrompt
from namm_transfer.runtime.cache import EvictingCache
from namm_transfer.runtime.runner import EvictingRunner, GenerationResult
from namm_transfer.video.retention import cache_frame_retention


class RetentionRunner(EvictingRunner):
    """An evicting runner whose ``last_cache`` is the cache of its latest generation (None before the first)."""

    last_cache: EvictingCache | None = None

    def new_cache(self) -> EvictingCache:
        self.last_cache = super().new_cache()
        return self.last_cache


@dataclass
class VideoAnswer:
    """What :func:`answer_video` returns.

    Attributes:
        result: the runner's generation result (tokens, logits, KV bytes, retention log, timings).
        frame_retention: (num_layers, F + 1) attendable slots per layer kept from each frame, last column text and
            generated tokens (:func:`~namm_transfer.video.retention.cache_frame_retention`).
    """

    result: GenerationResult
    frame_retention: torch.Tensor


def answer_video(
    runner: RetentionRunner,
    prompt: VideoPrompt,
    max_new_tokens: int | None = None,
    eos_token_id: int | None = None,
    return_logits: bool = False,
) -> VideoAnswer:
    """Chunked prefill of ``prompt.inputs_embeds`` (1, L, hidden) with the runner's policy, greedy decoding, and the
    per-frame retention of the final cache."""
    result = runner.generate(
        inputs_embeds=prompt.inputs_embeds, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
        return_logits=return_logits,
    )
    retention = cache_frame_retention(runner.last_cache, prompt.frame_of_token, prompt.num_frames)
    return VideoAnswer(result, retention)

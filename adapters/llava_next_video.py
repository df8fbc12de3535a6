"""Adapter for ``transformers.LlavaNextVideoForConditionalGeneration`` (LLaVA-NeXT-Video; Zhang et al. 2024,
https://llava-vl.github.io/blog/2024-04-30-llava-next-video/), and the video prompt it runs on.

Data flow (ARCHITECTURE.md, ``adapters/llava_next_video.py``):

1. frames (1, F, 3, S, S) -> the model's own ``get_video_features``: CLIP vision tower, CLS dropped
   (``vision_feature_select_strategy="default"``), spatial average pooling by ``spatial_pool_stride``, projector ->
   (1, F * T, hidden) with T = ((S / patch) / stride)^2 tokens per frame (144 for the 7B at 336 px; field-notes §4);
2. those features replace the F * T video placeholder tokens of the prompt (the model's own placeholder check, so a
   count mismatch raises "Video features and video tokens do not match"): :func:`embed_video_prompt` returns
   ``inputs_embeds`` (1, L, hidden) and, for every prompt position, the frame it came from (-1 for text);
3. ``EvictingRunner.generate(inputs_embeds=...)`` prefills the language model in chunks with policy steps and decodes
   greedily. Only ``model.model.language_model``'s attention runs through the evicting cache; the vision tower ran
   once in step 1 and is not managed.

The cache's arrival index of a slot is its position in the prompt (then the generated tokens), so the frame map of
step 2 tells, for every kept slot, which frame it came from (:mod:`namm_transfer.video.retention`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from namm_transfer.adapters.base import register_adapter
from namm_transfer.adapters.causal_lm import CausalLMAdapter

TEXT_SOURCE = -1
"""Frame id of prompt positions that hold text (and of generated tokens)."""


@register_adapter("llava_next_video")
class LlavaNextVideoAdapter(CausalLMAdapter):
    """The language model ``model.model.language_model`` is the managed decoder; geometry, attention routing and the
    forward of a chunk are those of a causal LM (the full model's forward embeds ids itself and passes embeddings and
    the cache to the language model only)."""

    name = "llava_next_video"

    def decoder(self, model: nn.Module) -> nn.Module:
        decoder = getattr(getattr(model, "model", None), "language_model", None)
        if decoder is None or not hasattr(decoder, "layers"):
            raise ValueError(
                f"{type(model).__name__} is not a LLaVA-NeXT-Video model with a decoder at .model.language_model.layers"
            )
        return decoder


def tokens_per_frame(config) -> int:
    """Video tokens one frame becomes: ((image_size // patch_size) // spatial_pool_stride)^2 (ceil pooling is not
    used: AvgPool2d floors). Requires ``vision_feature_select_strategy == "default"`` (``"full"`` keeps CLS and breaks
    the pooling reshape, field-notes §4)."""
    if config.vision_feature_select_strategy != "default":
        raise ValueError(
            f"vision_feature_select_strategy must be 'default' for video, got {config.vision_feature_select_strategy!r}"
        )
    side = config.vision_config.image_size // config.vision_config.patch_size
    return (side // config.spatial_pool_stride) ** 2


def expand_video_token(input_ids: torch.Tensor, video_token_id: int, count: int) -> torch.Tensor:
    """Repeat the single video placeholder of a prompt ``count`` times (what the official processor does to the
    text before tokenising). input_ids (1, L) with exactly one ``video_token_id`` -> (1, L - 1 + count)."""
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be (1, L), got {tuple(input_ids.shape)}")
    where = (input_ids[0] == video_token_id).nonzero().flatten()
    if where.numel() != 1:
        raise ValueError(f"the prompt must hold the video token {video_token_id} exactly once, found {where.numel()}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    at = int(where)
    repeated = input_ids.new_full((1, count), video_token_id)
    return torch.cat([input_ids[:, :at], repeated, input_ids[:, at + 1 :]], dim=1)


@dataclass
class VideoPrompt:
    """A video prompt ready for ``EvictingRunner.generate(inputs_embeds=...)``.

    Attributes:
        input_ids: (1, L) int64, text tokens and F * T video placeholders.
        inputs_embeds: (1, L, hidden) text embeddings with the video features spliced in.
        frame_of_token: (L,) int64, the frame (0 .. F - 1) each position came from, ``TEXT_SOURCE`` (-1) for text.
        num_frames: F.
        tokens_per_frame: T.
    """

    input_ids: torch.Tensor
    inputs_embeds: torch.Tensor
    frame_of_token: torch.Tensor
    num_frames: int
    tokens_per_frame: int

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]


@torch.no_grad()
def embed_video_prompt(model: nn.Module, input_ids: torch.Tensor, pixel_values_videos: torch.Tensor) -> VideoPrompt:
    """Run the vision tower and splice the pooled frame features into the prompt.

    Args:
        model: a ``LlavaNextVideoForConditionalGeneration``.
        input_ids: (1, L) prompt holding exactly F * T video tokens (see :func:`expand_video_token`).
        pixel_values_videos: (1, F, 3, S, S) preprocessed frames (:func:`namm_transfer.video.frames.preprocess`).

    Returns:
        the :class:`VideoPrompt`; raises ValueError when the video tokens and the F * T features differ in number.
    """
    if pixel_values_videos.ndim != 5 or pixel_values_videos.shape[0] != 1 or input_ids.shape[0] != 1:
        raise ValueError(
            f"one video at a time: input_ids (1, L) and pixel_values_videos (1, F, 3, S, S), got "
            f"{tuple(input_ids.shape)} and {tuple(pixel_values_videos.shape)}"
        )
    embedding = model.get_input_embeddings()
    device, dtype = embedding.weight.device, embedding.weight.dtype
    input_ids = input_ids.to(device)
    inputs_embeds = embedding(input_ids)
    features = model.model.get_video_features(
        pixel_values_videos=pixel_values_videos.to(device, dtype), return_dict=True
    ).pooler_output  # (1, F * T, hidden)
    features = features.to(device, inputs_embeds.dtype)
    _, video_mask = model.model.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, video_features=features)
    inputs_embeds = inputs_embeds.masked_scatter(video_mask, features)
    num_frames = pixel_values_videos.shape[1]
    per_frame = features.shape[1] // num_frames
    frame_of_token = torch.full((input_ids.shape[1],), TEXT_SOURCE, dtype=torch.long)
    positions = (input_ids[0] == model.config.video_token_id).nonzero().flatten().cpu()
    frame_of_token[positions] = torch.arange(positions.numel()) // per_frame
    return VideoPrompt(input_ids, inputs_embeds, frame_of_token, num_frames, per_frame)

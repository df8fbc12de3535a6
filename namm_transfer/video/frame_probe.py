"""Pretraining the embedded model's fresh vision tower on frame labels, before any language-model step.

LLaVA starts from a CLIP tower that already sees (Liu et al. 2023, §4.2: the tower stays frozen); the embedded
model's tower is randomly initialised, and learning to see through the language model's loss alone is slow on this
CPU (batch 4, ~20 s per step; held-out accuracy 28% after 150 projector and 50 tower steps). So a first stage
teaches the tower directly: every frame of a built-in train video is labelled with the needle it shows (colour and
shape, or none), and a linear probe (:class:`FrameProbe`) reads the features the projector will see, the pooled
patch tokens of the last layer (``vision_feature_layer=-1``, CLS dropped, ``spatial_pool_stride`` average pooling),
averaged over the frame. The probe is thrown away afterwards; only the tower keeps what it learnt.

Needle frames are rare (1-4 of 16-32), so a batch takes every needle frame of its videos and as many haystack
frames drawn at random from the same videos (:func:`probe_batch`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from namm_transfer.evals.video_tasks import COLOURS, KINDS, SHAPES, TaskConfig, VideoTask, make_task
from namm_transfer.video.frames import FrameConfig, preprocess

NO_NEEDLE = 0
"""Label of a frame without a needle; colour ``c`` is ``1 + list(COLOURS).index(c)``, shape likewise."""


def frame_labels(task: VideoTask) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame labels of a generated video: (num_frames,) int64 colour labels and (num_frames,) int64 shape labels,
    :data:`NO_NEEDLE` where no needle is drawn (needles never share a frame)."""
    colours, shapes = np.zeros(task.num_frames, np.int64), np.zeros(task.num_frames, np.int64)
    for needle in task.needles:
        frames = slice(needle.start, needle.start + needle.length)
        colours[frames] = 1 + list(COLOURS).index(needle.colour)
        shapes[frames] = 1 + SHAPES.index(needle.shape)
    return colours, shapes


@dataclass
class ProbeBatch:
    """Frames and their labels: pixels (N, 3, S, S) float32, colours (N,) and shapes (N,) int64."""

    pixels: torch.Tensor
    colours: torch.Tensor
    shapes: torch.Tensor


def probe_batch(split: str, first_index: int, videos: int, num_frames: int, image_size: int, seed: int
                ) -> ProbeBatch:
    """Every needle frame of the built-in tasks ``first_index .. first_index + videos - 1`` of ``split`` (kinds in
    turn, as :func:`namm_transfer.video.train.make_example` numbers them) and as many of their haystack frames, drawn
    by a generator seeded with (seed, first_index)."""
    rng = np.random.default_rng([seed, first_index])
    pixels, colours, shapes = [], [], []
    for index in range(first_index, first_index + videos):
        kind = KINDS[index % len(KINDS)]
        task, frames = make_task(split, kind, num_frames, index // len(KINDS), TaskConfig(size=image_size))
        colour, shape = frame_labels(task)
        needle = np.flatnonzero(colour != NO_NEEDLE)
        haystack = rng.choice(np.flatnonzero(colour == NO_NEEDLE), size=len(needle), replace=False)
        chosen = np.concatenate([needle, haystack])
        pixels.append(preprocess(frames[chosen], FrameConfig(num_frames=len(chosen), size=image_size)))
        colours.append(torch.from_numpy(colour[chosen]))
        shapes.append(torch.from_numpy(shape[chosen]))
    return ProbeBatch(torch.cat(pixels), torch.cat(colours), torch.cat(shapes))


class FrameProbe(nn.Module):
    """Linear read-outs of a frame's needle colour and shape from the mean of its pooled vision tokens.

    Args:
        hidden_size: the vision tower's width.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.colour = nn.Linear(hidden_size, 1 + len(COLOURS))
        self.shape = nn.Linear(hidden_size, 1 + len(SHAPES))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, tokens, hidden) pooled features -> colour logits (N, 1 + colours) and shape logits (N, 1 + shapes)."""
        mean = features.mean(dim=1)
        return self.colour(mean), self.shape(mean)


def pooled_features(llava_model, pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) pixels -> (N, tokens_per_frame, hidden) float: the tower's last hidden states without CLS, pooled
    by the model's own resampler, i.e. exactly what ``get_video_features`` hands the projector."""
    inner = llava_model.model
    hidden = inner.vision_tower(pixels.to(llava_model.device), output_hidden_states=True).hidden_states[-1]
    return inner.vision_resampler(hidden[:, 1:])


def probe_loss(llava_model, probe: FrameProbe, batch: ProbeBatch) -> tuple[torch.Tensor, float, float]:
    """Summed cross-entropy of the colour and shape labels; also the colour and shape accuracies of the batch."""
    colour_logits, shape_logits = probe(pooled_features(llava_model, batch.pixels))
    colours, shapes = batch.colours.to(colour_logits.device), batch.shapes.to(shape_logits.device)
    loss = nn.functional.cross_entropy(colour_logits, colours) + nn.functional.cross_entropy(shape_logits, shapes)
    colour_right = (colour_logits.argmax(-1) == colours).float().mean().item()
    shape_right = (shape_logits.argmax(-1) == shapes).float().mean().item()
    return loss, colour_right, shape_right

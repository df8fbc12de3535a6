"""Per-frame retention: which frames of a video prompt an evicting KV cache still holds.

Every cache slot carries its arrival index (0 = the first prompt token); a :class:`VideoPrompt`'s ``frame_of_token``
maps prompt positions to frames (-1 for text). Generated tokens arrive after the prompt and count as text. So the
slots a layer can still attend to, split by source, give a (layers x frames) retention map: the heat map of the
video evaluation, and a check that the split sums to the kept counts.
"""

from __future__ import annotations

import torch

from namm_transfer.runtime.cache import EvictingCache


def frame_counts(arrival: torch.Tensor, attendable: torch.Tensor, frame_of_token: torch.Tensor,
                 num_frames: int) -> torch.Tensor:
    """Count attendable slots by source.

    Args:
        arrival: (B, H, N) int64 arrival index of every slot.
        attendable: (B, H, N) bool, False for padding and masked slots (not counted).
        frame_of_token: (L,) int64 frame of each prompt position, -1 for text; arrivals >= L are text.
        num_frames: F.

    Returns:
        (B, H, F + 1) int64: column f < F counts the slots of frame f, column F the text slots.
    """
    if arrival.shape != attendable.shape:
        raise ValueError(f"arrival {tuple(arrival.shape)} and attendable {tuple(attendable.shape)} differ in shape")
    frame_of_token = frame_of_token.to(arrival.device)
    length = frame_of_token.numel()
    in_prompt = arrival < length
    source = torch.full_like(arrival, num_frames)
    frames = frame_of_token[arrival.clamp(max=length - 1)]
    source = torch.where(in_prompt & (frames >= 0), frames, source)
    counts = torch.zeros(*arrival.shape[:2], num_frames + 1, dtype=torch.long, device=arrival.device)
    return counts.scatter_add_(2, source, attendable.long())


def cache_frame_retention(cache: EvictingCache, frame_of_token: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(num_layers, F + 1) float: attendable slots per layer and source (column F = text), averaged over batch rows
    and KV heads. Row sums equal :meth:`EvictingCache.visible_per_layer` (averaged over rows)."""
    rows = [
        frame_counts(layer.arrival, layer.attendable, frame_of_token, num_frames).float().mean(dim=(0, 1)).cpu()
        for layer in cache.layers
    ]
    return torch.stack(rows)


def frame_fraction(retention: torch.Tensor, frame_of_token: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(num_layers, F) fraction of each frame's tokens still held: ``retention[:, :F]`` divided by the frame's
    token count in the prompt."""
    sizes = torch.bincount(frame_of_token[frame_of_token >= 0], minlength=num_frames).float()
    if (sizes == 0).any():
        raise ValueError("every frame must have at least one token in the prompt")
    return retention[:, :num_frames] / sizes

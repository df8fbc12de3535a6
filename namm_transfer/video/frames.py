"""Reading a video and turning its frames into ``pixel_values_videos`` for a LLaVA-NeXT-Video model.

Frame sampling follows lmms-eval's Hugging Face video path (``llava_hf``): ``np.linspace(0, n - 1, N, dtype=int)``,
i.e. N indices spread uniformly over the n decoded frames, rounded down. Decoding uses decord
(``VideoReader(path).get_batch(indices)``), as lmms-eval does.

The preprocessing reproduces transformers' ``LlavaNextVideoVideoProcessor`` (torchvision backend) without torchvision,
which does not import beside the pinned torch (field-notes.md §1):

1. resize so the shortest side is ``size`` (the long side ``int(size * long / short)``), bicubic with antialias,
   rounded and clamped back to uint8;
2. center crop to ``crop`` x ``crop`` (offsets ``round((H - crop) / 2)``, torchvision's convention);
3. rescale by 1/255 and normalise with the CLIP mean and standard deviation.

A missing or undecodable video raises :class:`VideoReadError` (a ValueError naming the file and the reason), which an
evaluation records as a failed item.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VideoReadError(ValueError):
    """A video file is missing, unreadable, or has no frames; the message names the file and the reason."""


@dataclass(frozen=True)
class FrameConfig:
    """How frames become model input.

    Attributes:
        num_frames: frames sampled per video (lmms-eval's ``max_frames_num``; 32 by default there).
        size: shortest side after resizing (the vision tower's ``image_size``: 336 for the 7B, 64 embedded).
        crop: side of the square center crop (defaults to ``size``).
        mean, std: per-channel normalisation (CLIP's).
    """

    num_frames: int = 32
    size: int = 336
    crop: int | None = None
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        problems = []
        if self.num_frames < 1:
            problems.append(f"num_frames must be >= 1, got {self.num_frames}")
        if self.size < 1:
            problems.append(f"size must be >= 1, got {self.size}")
        if self.crop is not None and not 1 <= self.crop <= self.size:
            problems.append(f"crop must be in [1, size={self.size}], got {self.crop}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            problems.append("mean and std must have 3 entries, std positive")
        if problems:
            raise ValueError("invalid FrameConfig: " + "; ".join(problems))

    @property
    def crop_size(self) -> int:
        return self.size if self.crop is None else self.crop


def sample_indices(total: int, num_frames: int) -> np.ndarray:
    """lmms-eval's uniform sampling: ``np.linspace(0, total - 1, num_frames, dtype=int)`` (int64, may repeat
    indices when ``num_frames > total``)."""
    if total < 1 or num_frames < 1:
        raise ValueError(f"need at least one frame to sample from and to, got total={total}, num_frames={num_frames}")
    return np.linspace(0, total - 1, num_frames, dtype=int).astype(np.int64)


def read_frames(path: str | Path, num_frames: int) -> np.ndarray:
    """Decode ``num_frames`` uniformly sampled frames of a video with decord.

    Returns:
        (num_frames, H, W, 3) uint8 RGB.
    Raises:
        VideoReadError: the file is missing, cannot be decoded, or has no frames.
    """
    path = Path(path)
    if not path.is_file():
        raise VideoReadError(f"video {path} does not exist")
    import decord  # imported here: only video programs need it

    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        total = len(reader)
        if total < 1:
            raise VideoReadError(f"video {path} has no frames")
        frames = reader.get_batch(sample_indices(total, num_frames).tolist()).asnumpy()
    except VideoReadError:
        raise
    except Exception as error:  # decord raises its own DECORDError or RuntimeError for broken streams
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise VideoReadError(f"cannot decode video {path}: {first_line}") from None
    return frames


def resize_shortest_side(frames: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> (N, 3, H', W') uint8 with min(H', W') = ``size``, the other side
    ``int(size * long / short)``; bicubic with antialias, rounded and clamped (torchvision's uint8 convention)."""
    height, width = frames.shape[-2:]
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if height <= width else (new_long, new_short)
    if tuple(new_size) == (height, width):
        return frames
    resized = F.interpolate(frames.float(), size=new_size, mode="bicubic", align_corners=False, antialias=True)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def center_crop(frames: torch.Tensor, crop: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, crop, crop), offsets ``int(round((H - crop) / 2))`` as in torchvision."""
    height, width = frames.shape[-2:]
    if crop > height or crop > width:
        raise ValueError(f"cannot crop {crop}x{crop} from {height}x{width} frames")
    top, left = int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))
    return frames[..., top : top + crop, left : left + crop]


def preprocess(frames: np.ndarray, config: FrameConfig) -> torch.Tensor:
    """(N, H, W, 3) uint8 RGB frames -> (N, 3, crop, crop) float32 normalised pixel values.

    Stack as ``pixel_values_videos[None]`` for a batch of one video: (1, N, 3, crop, crop).
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (N, H, W, 3) uint8, got {frames.dtype} {tuple(frames.shape)}")
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    video = center_crop(resize_shortest_side(video, config.size), config.crop_size)
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    return (video.float() / 255.0 - mean) / std


def load_video(path: str | Path, config: FrameConfig) -> torch.Tensor:
    """Read, sample and preprocess one video: (num_frames, 3, crop, crop) float32. Raises :class:`VideoReadError`."""
    return preprocess(read_frames(path, config.num_frames), config)

"""Frame reading and preprocessing (namm_transfer.video.frames): lmms-eval's uniform sampling, decord decoding of real
mp4 files, the hand-written resize / center crop / CLIP normalisation (checked against transformers' official video
processor where torchvision imports), and one clear error for missing or corrupt videos."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from namm_transfer.evals.video_tasks import write_mp4
from namm_transfer.video.frames import (
    CLIP_MEAN,
    CLIP_STD,
    FrameConfig,
    VideoReadError,
    center_crop,
    load_video,
    preprocess,
    read_frames,
    resize_shortest_side,
    sample_indices,
)


def test_sampling_is_lmms_evals_linspace():
    assert sample_indices(10, 4).tolist() == [0, 3, 6, 9]
    assert sample_indices(100, 8).tolist() == np.linspace(0, 99, 8, dtype=int).tolist() == [0, 14, 28, 42, 56, 70, 84, 99]
    assert sample_indices(3, 5).tolist() == [0, 0, 1, 1, 2]  # more frames asked than exist: repeats
    with pytest.raises(ValueError):
        sample_indices(0, 4)


@pytest.fixture(scope="module")
def ramp_video(tmp_path_factory):
    """A 40-frame 32x56 mp4 whose frame t is a flat grey of level 5 * t."""
    frames = np.stack([np.full((32, 56, 3), 5 * t, dtype=np.uint8) for t in range(40)])
    path = tmp_path_factory.mktemp("video") / "ramp.mp4"
    write_mp4(frames, path, fps=10)
    return path


def test_read_frames_decodes_the_sampled_frames(ramp_video):
    frames = read_frames(ramp_video, 5)
    assert frames.shape == (5, 32, 56, 3) and frames.dtype == np.uint8
    expected = 5 * np.linspace(0, 39, 5, dtype=int)  # frames 0, 9, 19, 29, 39
    np.testing.assert_allclose(frames.reshape(5, -1).mean(axis=1), expected, atol=2.0)


def test_preprocess_resizes_crops_and_normalises(ramp_video):
    config = FrameConfig(num_frames=3, size=16)
    video = load_video(ramp_video, config)
    assert video.shape == (3, 3, 16, 16) and video.dtype == torch.float32
    # flat frames stay flat; their value is (level / 255 - mean) / std per channel
    level = torch.from_numpy(read_frames(ramp_video, 3)).float().mean(dim=(1, 2))  # (3, 3)
    expected = (level / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(video.mean(dim=(2, 3)), expected, atol=0.03, rtol=0)


def test_resize_and_crop_geometry():
    frames = torch.arange(2 * 3 * 30 * 60, dtype=torch.float).reshape(2, 3, 30, 60).remainder(256).to(torch.uint8)
    resized = resize_shortest_side(frames, 20)
    assert resized.shape == (2, 3, 20, 40) and resized.dtype == torch.uint8
    assert resize_shortest_side(frames.transpose(2, 3), 20).shape == (2, 3, 40, 20)
    assert resize_shortest_side(frames, 30) is frames  # already the right size
    cropped = center_crop(frames, 30)
    assert torch.equal(cropped, frames[..., :, 15:45])
    with pytest.raises(ValueError):
        center_crop(frames, 31)


def test_matches_the_official_video_processor():
    pytest.importorskip("torchvision")
    from transformers import LlavaNextVideoVideoProcessor

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(4, 40, 56, 3), dtype=np.uint8)
    official = LlavaNextVideoVideoProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    expected = official(videos=[list(frames)], return_tensors="pt")["pixel_values_videos"][0]
    ours = preprocess(frames, FrameConfig(num_frames=4, size=32))
    torch.testing.assert_close(ours, expected, atol=2.5 / 255 / min(CLIP_STD), rtol=0)


def test_missing_and_corrupt_videos_raise_one_clear_error(tmp_path):
    with pytest.raises(VideoReadError, match="does not exist"):
        read_frames(tmp_path / "absent.mp4", 4)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    with pytest.raises(VideoReadError, match="cannot decode video .*broken.mp4"):
        read_frames(broken, 4)
    assert issubclass(VideoReadError, ValueError)


def test_frame_config_is_validated():
    with pytest.raises(ValueError, match="num_frames"):
        FrameConfig(num_frames=0)
    with pytest.raises(ValueError, match="crop"):
        FrameConfig(size=32, crop=40)
    assert FrameConfig(size=32).crop_size == 32

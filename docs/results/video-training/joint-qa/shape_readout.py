"""How well a trained tower's pooled tokens encode a needle frame's shape: linear read-outs fitted on the needle
frames of train videos and measured on those of the first 64 held-out videos (16 frames each), once from the mean of
a frame's pooled tokens (what the vision stage's probe reads) and once from all of them. Run from the repository
root on a parts folder and a number of train videos:
``python docs/results/video-training/joint-qa/shape_readout.py weights/video 512``."""

import sys

import torch

from namm_transfer.video.frame_probe import NO_NEEDLE, pooled_features, probe_batch
from namm_transfer.video.model import load_embedded_video_model

FRAMES, HELDOUT_VIDEOS, VIDEOS_PER_BATCH, STEPS = 16, 64, 16, 500


def needle_features(video, split: str, videos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, tokens, hidden) pooled features of the needle frames of the first ``videos`` videos, and their shapes."""
    features, shapes = [], []
    for first in range(0, videos, VIDEOS_PER_BATCH):
        batch = probe_batch(split, first, VIDEOS_PER_BATCH, FRAMES, video.vision.image_size, seed=0)
        needle = batch.colours != NO_NEEDLE
        with torch.no_grad():
            features.append(pooled_features(video.model, batch.pixels[needle]))
        shapes.append(batch.shapes[needle])
    return torch.cat(features), torch.cat(shapes)


def fit_and_score(train_x, train_y, test_x, test_y) -> tuple[float, float]:
    """Train and held-out accuracy of a linear read-out (standardised inputs, Adam, weight decay 1e-3)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    readout = torch.nn.Linear(train_x.shape[1], int(train_y.max()) + 1)
    optimizer = torch.optim.Adam(readout.parameters(), 1e-2, weight_decay=1e-3)
    for _ in range(STEPS):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(readout(train_x), train_y).backward()
        optimizer.step()
    accuracy = lambda x, y: (readout(x).argmax(-1) == y).float().mean().item()  # noqa: E731
    return accuracy(train_x, train_y), accuracy(test_x, test_y)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    video = load_embedded_video_model(sys.argv[1])
    train_x, train_y = needle_features(video, "train", int(sys.argv[2]))
    test_x, test_y = needle_features(video, "heldout", HELDOUT_VIDEOS)
    print(f"needle frames: {len(train_y)} train, {len(test_y)} held out")
    for name, flatten in (("mean of the tokens", lambda x: x.mean(1)), ("all tokens", lambda x: x.flatten(1))):
        train, held_out = fit_and_score(flatten(train_x), train_y, flatten(test_x), test_y)
        print(f"{name}: train {train:.3f}, held out {held_out:.3f}")


if __name__ == "__main__":
    main()

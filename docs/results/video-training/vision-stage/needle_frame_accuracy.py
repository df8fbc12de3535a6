"""The vision stage's probe on held-out frames, split into needle and haystack frames (the training log mixes them
half and half): colour and shape accuracy on needle frames, and how often a haystack frame is called a needle.

    python docs/results/video-training/vision-stage/needle_frame_accuracy.py runs/video-train-v [videos]
"""

import json
import sys
from pathlib import Path

import torch

from namm_transfer.video.frame_probe import NO_NEEDLE, FrameProbe, pooled_features, probe_batch
from namm_transfer.video.model import load_embedded_video_model


@torch.no_grad()
def main(run: str, videos: int = 256) -> None:
    video = load_embedded_video_model(run, merge=False)
    probe = FrameProbe(video.vision.hidden_size)
    probe.load_state_dict(torch.load(Path(run) / "train_state.pt", weights_only=False)["probe"])
    result = {"run": run, "videos_per_length": videos}
    for frames in (16, 32):
        batch = probe_batch("heldout", 0, videos, frames, video.vision.image_size, seed=0)
        colour, shape = (logits.argmax(-1) for logits in probe(pooled_features(video.model, batch.pixels)))
        needle = batch.colours != NO_NEEDLE
        result[f"{frames}_frames"] = {
            "needle_frames": int(needle.sum()),
            "needle_colour_accuracy": (colour[needle] == batch.colours[needle]).float().mean().item(),
            "needle_shape_accuracy": (shape[needle] == batch.shapes[needle]).float().mean().item(),
            "haystack_called_needle": (colour[~needle] != NO_NEEDLE).float().mean().item(),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))

"""Which shape the trained model names on the first 16 held-out shape questions (16 frames): pairs (right option,
the greedy tokens under teacher forcing, joined), counted. Run from the repository root on a run folder:
``python docs/results/video-training/joint-qa/shape_confusion.py runs/video-train-c``."""

import collections
import json
import sys

import torch

from namm_transfer.video.model import load_embedded_video_model
from namm_transfer.video.train import make_example, target_logits

torch.set_num_threads(1)
video = load_embedded_video_model(sys.argv[1])
pairs = collections.Counter()
with torch.no_grad():
    for item in range(16):
        example = make_example(video, "heldout", 1 + 4 * item, 16)  # kinds in turn: index 4k + 1 is a shape question
        greedy = target_logits(video, example).argmax(-1)
        pairs[f"{video.tokenizer.decode(example.target_ids[:-1])} -> {video.tokenizer.decode(greedy[:-1])}"] += 1
print(json.dumps(dict(sorted(pairs.items())), indent=1))

"""Held-out video accuracy of trained-parts folders on questions that no training run evaluated: held-out tasks 64 to
64 + N - 1 (training evaluates tasks 0-63 and picks its checkpoints on them), 16 frames, exact option under teacher
forcing (:func:`namm_transfer.video.train.heldout_hits`), every folder on the same questions, with bootstrap 95%
intervals, per kind, and each folder's paired difference against the first. Run from the repository root:
``python docs/results/video-training/fresh-heldout/compare.py 128 weights/video runs/video-train-s/best``;
prints one JSON object."""

import json
import sys

from namm_transfer.evals.stats import mean_interval, paired_difference
from namm_transfer.video.model import load_embedded_video_model
from namm_transfer.video.train import accuracy_by_kind, heldout_hits

FIRST_FRESH, FRAMES = 64, 16


def main(questions: int, folders: list[str]) -> dict:
    indices = range(FIRST_FRESH, FIRST_FRESH + questions)
    hits = {folder: heldout_hits(load_embedded_video_model(folder), indices, FRAMES) for folder in folders}
    report = {"tasks": [indices.start, indices.stop - 1], "frames": FRAMES, "folders": {}}
    for folder, right in hits.items():
        scores = [100.0 * hit for hit in right]
        by_kind = {kind: 100.0 * share for kind, share in accuracy_by_kind(indices, right)[1].items()}
        entry = {"accuracy": mean_interval(scores), "by_kind": by_kind}
        if folder != folders[0]:
            first = {i: 100.0 * hit for i, hit in zip(indices, hits[folders[0]])}
            entry["minus_first"] = paired_difference(dict(zip(indices, scores)), first)
        report["folders"][folder] = entry
    return report


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), sys.argv[2:]), indent=1))

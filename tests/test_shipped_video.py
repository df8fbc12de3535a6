"""The shipped video parts (``weights/video``) are what their log says: loading them assembles the embedded model,
and it scores the held-out accuracy that the training run logged when it saved them (64 held-out 16-frame
questions, exact option under teacher forcing)."""

from __future__ import annotations

import json

import pytest

from namm_transfer.shipped import shipped_names, shipped_weights
from namm_transfer.video.model import load_embedded_video_model
from namm_transfer.video.train import heldout_accuracy

pytestmark = pytest.mark.skipif("video" not in shipped_names(), reason="no shipped video parts (weights/video)")


@pytest.mark.slow
def test_shipped_parts_reproduce_their_logged_heldout_accuracy():
    folder = shipped_weights("video")
    provenance = json.loads((folder / "config.json").read_text())["provenance"]
    logged, settings = provenance["last"], provenance["config"]
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    assert log[-1] == logged and log[-1]["step"] == provenance["steps_done"]  # the log ends where the parts were saved
    video = load_embedded_video_model(folder)
    accuracy, by_kind = heldout_accuracy(video, settings["eval_items"], settings["frames"][0])  # under no_grad
    one_question = 1 / settings["eval_items"]  # a borderline argmax may flip with another CPU's arithmetic
    assert accuracy == pytest.approx(logged["heldout_accuracy"], abs=2 * one_question)
    assert set(by_kind) == set(logged["heldout_accuracy_by_kind"])

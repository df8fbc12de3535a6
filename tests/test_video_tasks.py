"""Built-in long-video tasks (namm_transfer.evals.video_tasks): deterministic from their seed, disjoint train and
held-out seeds, needles that really are where the answer says, and real small mp4 files that decord decodes back to
the frames written (up to codec loss)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from namm_transfer.evals.video_tasks import (
    COLOURS,
    KINDS,
    LETTERS,
    SPLITS,
    TaskConfig,
    make_task,
    shape_mask,
    write_split,
)
from namm_transfer.video.frames import read_frames


def saturation(frames: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 -> (...) max minus min channel."""
    return frames.max(axis=-1).astype(int) - frames.min(axis=-1).astype(int)


@pytest.mark.parametrize("kind", KINDS)
def test_tasks_are_deterministic_and_splits_differ(kind):
    task, frames = make_task("train", kind, 24, 3)
    again, frames_again = make_task("train", kind, 24, 3)
    assert task == again and np.array_equal(frames, frames_again)
    held, held_frames = make_task("heldout", kind, 24, 3)
    assert held.seed != task.seed and not np.array_equal(frames, held_frames)
    assert frames.shape == (24, 64, 64, 3) and frames.dtype == np.uint8


def test_train_and_heldout_never_share_a_seed():
    seeds = {split: {tuple(make_task(split, kind, 16, i)[0].seed) for kind in KINDS for i in range(3)}
             for split in SPLITS}
    assert not seeds["train"] & seeds["heldout"]
    assert all(len(s) == 12 for s in seeds.values())


@pytest.mark.parametrize("kind", KINDS)
def test_needles_are_where_the_answer_says(kind):
    for index in range(4):
        task, frames = make_task("heldout", kind, 48, index)
        assert task.answer in LETTERS and len(task.options) == 4 and len(set(task.options)) == 4
        needle_frames = {t for n in task.needles for t in range(n.start, n.start + n.length)}
        for needle in task.needles:
            mask = shape_mask(needle.shape, needle.extent)
            patch = frames[needle.start, needle.y : needle.y + needle.extent, needle.x : needle.x + needle.extent]
            assert (patch[mask] == COLOURS[needle.colour]).all()
        # only needle frames hold saturated pixels: the haystack is grey and weakly tinted
        vivid = saturation(frames) > 100
        assert {int(t) for t in np.nonzero(vivid.any(axis=(1, 2)))[0]} <= needle_frames
        chosen = task.options[LETTERS.index(task.answer)]
        first = task.needles[0]
        expected = {"colour": first.colour, "shape": first.shape, "count": str(len(task.needles)),
                    "order": f"the {first.colour} {first.shape}"}[kind]
        assert chosen == expected
        starts = [n.start for n in task.needles]
        assert starts == sorted(starts) and all(b - a > 1 for a, b in zip(starts, starts[1:]))


def test_depth_places_the_first_needle():
    assert make_task("train", "colour", 64, 0, TaskConfig(depth=0.0))[0].needles[0].start == 0
    assert make_task("train", "colour", 64, 0, TaskConfig(depth=1.0))[0].needles[0].start == 63
    assert make_task("train", "colour", 64, 0, TaskConfig(depth=0.5, needle_length=4))[0].needles[0].start == 30
    order = make_task("train", "order", 64, 0, TaskConfig(depth=1.0))[0]
    assert [n.start for n in order.needles] == [61, 63]  # the second still fits after the first


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="size"):
        TaskConfig(size=33)
    with pytest.raises(ValueError, match="depth"):
        TaskConfig(depth=1.5)
    with pytest.raises(ValueError, match="kind"):
        make_task("train", "smell", 16, 0)
    with pytest.raises(ValueError, match="split"):
        make_task("test", "colour", 16, 0)


def test_written_mp4_files_decode_to_the_frames_written(tmp_path):
    tasks = write_split(tmp_path, "heldout", lengths=[16, 256], per_kind=1, kinds=("colour", "count"))
    lines = [json.loads(line) for line in (tmp_path / "questions.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == [task.id for task in tasks]
    assert {"video", "question", "options", "answer", "kind", "num_frames", "needles", "seed"} <= set(lines[0])
    for task, line in zip(tasks, lines):
        video = tmp_path / line["video"]
        assert video.stat().st_size < 100_000  # small files: 256 frames well under 100 kB
        _, written = make_task(task.split, task.kind, task.num_frames, task.index)
        decoded = read_frames(video, task.num_frames)  # linspace over all frames = every frame
        assert decoded.shape == written.shape
        error = np.abs(decoded.astype(int) - written.astype(int))
        assert error.mean() < 3.0
        for needle in task.needles:  # the needle's colour survives the codec
            mask = shape_mask(needle.shape, needle.extent)
            patch = decoded[needle.start, needle.y : needle.y + needle.extent, needle.x : needle.x + needle.extent]
            assert np.abs(patch[mask].mean(axis=0) - COLOURS[needle.colour]).max() < 25

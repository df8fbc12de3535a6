"""The vision stage's frame labels and probe: labels mark exactly the frames a needle is drawn on; a batch holds
every needle frame and as many haystack frames; the probe reads exactly the features the projector receives; a few
steps on the tower and probe lower the loss."""

from __future__ import annotations

import numpy as np
import torch

from namm_transfer.evals.video_tasks import COLOURS, SHAPES, TaskConfig, make_task
from namm_transfer.video.frame_probe import NO_NEEDLE, FrameProbe, frame_labels, pooled_features, probe_batch, probe_loss
from namm_transfer.video.model import load_embedded_video_model


def test_labels_mark_exactly_the_frames_with_a_needle():
    for kind in ("count", "order"):
        task, frames = make_task("train", kind, 32, 3, TaskConfig(size=64))
        colours, shapes = frame_labels(task)
        assert sorted(np.flatnonzero(colours)) == sorted(n.start for n in task.needles)
        assert np.array_equal(colours != NO_NEEDLE, shapes != NO_NEEDLE)
        for t in range(task.num_frames):
            saturated = {name for name, rgb in COLOURS.items() if (frames[t] == rgb).all(-1).any()}
            if colours[t] == NO_NEEDLE:
                assert not saturated  # the haystack never shows a needle colour
            else:
                assert saturated == {list(COLOURS)[colours[t] - 1]}
        needle = task.needles[0]
        assert shapes[needle.start] == 1 + SHAPES.index(needle.shape)


def test_batch_holds_every_needle_frame_and_as_many_others():
    batch = probe_batch("train", 8, 4, 16, 64, seed=0)
    needles = sum(len(make_task("train", kind, 16, 2, TaskConfig(size=64))[0].needles)
                  for kind in ("colour", "shape", "count", "order"))
    assert batch.pixels.shape == (2 * needles, 3, 64, 64)
    assert int((batch.colours != NO_NEEDLE).sum()) == needles == int((batch.colours == NO_NEEDLE).sum())
    again = probe_batch("train", 8, 4, 16, 64, seed=0)
    assert torch.equal(batch.pixels, again.pixels) and torch.equal(batch.shapes, again.shapes)


def test_probe_reads_the_projector_input_and_learns():
    video = load_embedded_video_model(seed=0)
    batch = probe_batch("train", 0, 4, 16, 64, seed=0)
    with torch.no_grad():
        features = pooled_features(video.model, batch.pixels)
        expected = video.model.model.get_video_features(pixel_values_videos=batch.pixels[None]).pooler_output
    assert features.shape == (len(batch.pixels), video.vision.tokens_per_frame, video.vision.hidden_size)
    projected = video.model.model.multi_modal_projector(features).flatten(0, 1)
    torch.testing.assert_close(projected, expected[0], rtol=1e-5, atol=1e-5)
    probe = FrameProbe(video.vision.hidden_size)
    parameters = list(video.model.model.vision_tower.parameters()) + list(probe.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-3)
    video.model.train()
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss, _, _ = probe_loss(video.model, probe, batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_captions_name_the_needle_or_nothing():
    from namm_transfer.video.frame_caption import (
        NOTHING, PADDING, CaptionBatch, caption_batch, caption_loss, caption_text, captions_right)

    assert caption_text(NO_NEEDLE, NO_NEEDLE) == NOTHING
    assert caption_text(1 + list(COLOURS).index("green"), 1 + SHAPES.index("circle")) == "a green circle"
    video = load_embedded_video_model(seed=0)
    frames = probe_batch("train", 0, 1, 16, 64, seed=0)
    batch = caption_batch(video, frames)
    assert batch.pixels.shape == (len(frames.pixels), 1, 3, 64, 64)
    assert ((batch.input_ids == video.model.config.video_token_id).sum(1) == video.vision.tokens_per_frame).all()
    for ids, target, colour, shape in zip(batch.input_ids, batch.targets, frames.colours.tolist(),
                                          frames.shapes.tolist()):
        words = target[target != PADDING]
        assert words[-1] == video.tokenizer.eos_token_id
        assert video.tokenizer.decode(words[:-1]) == caption_text(colour, shape)
        assert torch.equal(ids[-len(target):][: len(words)], words)
    # the batched loss is the mean of each frame's own loss computed alone, without padding
    with torch.no_grad():
        together = caption_loss(video.model, batch)
        alone = []
        for row in range(len(batch.targets)):
            width = int((batch.targets[row] != PADDING).sum())
            prompt = batch.input_ids.shape[1] - batch.targets.shape[1]
            single = CaptionBatch(batch.input_ids[row : row + 1, : prompt + width], batch.pixels[row : row + 1],
                                  batch.targets[row : row + 1, :width])
            alone.append(caption_loss(video.model, single))
            assert captions_right(video.model, single).item() == captions_right(video.model, batch)[row].item()
    torch.testing.assert_close(together, torch.stack(alone).mean(), rtol=1e-4, atol=1e-4)

"""The embedded video model (namm_transfer.video.model): SmolLM2's own modules as the language model of a
LLaVA-NeXT-Video with a small fresh CLIP tower (field-notes §4), its question prompt, trained parts that reload to the
same outputs, one-line errors for bad parts folders, and one built-in question answered end to end through the
evicting runtime."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from namm_transfer.adapters.base import adapter_for
from namm_transfer.adapters.llava_next_video import embed_video_prompt, tokens_per_frame
from namm_transfer.evals.video_qa import load_video_dataset
from namm_transfer.evals.video_tasks import write_split
from namm_transfer.models import load_model
from namm_transfer.runtime.cache import CacheConfig
from namm_transfer.runtime.runner import RunnerConfig
from namm_transfer.video.answer import RetentionRunner, answer_video
from namm_transfer.video.frames import FrameConfig, load_video
from namm_transfer.video.model import (
    CONFIG_FILE,
    PARTS_FILE,
    VIDEO_TOKEN,
    VideoPartsError,
    VisionTowerConfig,
    load_embedded_video_model,
    parameter_count,
    save_trained_parts,
    trained_state,
)
from namm_transfer.video.prompt import render_video_prompt, video_prompt_ids


@pytest.fixture(scope="module")
def video():
    return load_embedded_video_model(seed=0)


def last_logits(video_model, question="What colour is it?", frames=2, seed=0):
    ids = video_prompt_ids(video_model.tokenizer, video_model.model.config, question, frames)
    pixels = torch.randn(1, frames, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return video_model.model(input_ids=ids, pixel_values_videos=pixels, logits_to_keep=1).logits[0, -1]


def test_language_model_is_smollm2_and_the_vision_part_is_small(video):
    model = video.model
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert tokens_per_frame(model.config) == video.vision.tokens_per_frame == 16
    assert parameter_count(model) == 3_707_072  # about 3.7 M outside the language model (field-notes §4)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # SmolLM2 ties them
    smollm2 = load_model(None, dtype="float32").model
    for name, tensor in smollm2.model.state_dict().items():
        assert torch.equal(model.model.language_model.state_dict()[name], tensor), name
    assert model.config.video_token_id == video.tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
    assert {k.split(".")[1] for k in trained_state(model)} == {"vision_tower", "multi_modal_projector"}


def test_prompt_holds_the_video_tokens_in_the_chat_template(video):
    ids = video_prompt_ids(video.tokenizer, video.model.config, "Which shape?\nA. circle\nB. square", 5)
    assert (ids == video.model.config.video_token_id).sum() == 5 * 16
    text = video.tokenizer.decode(ids[0])
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert "\nWhich shape?\nA. circle\nB. square<|im_end|>" in text

    class Plain:  # a tokenizer without a chat template falls back to LLaVA's conversation format
        chat_template = None

    assert render_video_prompt(Plain(), "Why?", "<video>") == ("USER: <video>\nWhy? ASSISTANT:", False)


def test_trained_parts_reload_to_the_same_outputs(video, tmp_path):
    untrained = last_logits(video)
    with torch.no_grad():  # stand-in for training: move every trained tensor
        for tensor in trained_state(video.model).values():
            tensor.add_(0.01 * torch.randn(tensor.shape, generator=torch.Generator().manual_seed(tensor.numel())))
    before = last_logits(video)
    save_trained_parts(video, tmp_path, {"command": "test"})
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["parameters"] == 3_707_072 - 576  # image_newline unsaved
    reloaded = load_embedded_video_model(tmp_path)
    assert reloaded.parts == tmp_path and reloaded.vision == video.vision
    torch.testing.assert_close(last_logits(reloaded), before, atol=1e-5, rtol=0)
    assert not torch.allclose(untrained, before, atol=1e-3)  # the reload carried the change


def test_bad_parts_folders_are_one_line_errors(video, tmp_path):
    with pytest.raises(VideoPartsError, match="does not exist"):
        load_embedded_video_model(tmp_path / "absent")
    with pytest.raises(VideoPartsError, match=f"missing {PARTS_FILE}, {CONFIG_FILE}"):
        load_embedded_video_model(tmp_path)
    save_trained_parts(video, tmp_path, {})
    with pytest.raises(VideoPartsError, match="trained with"):
        load_embedded_video_model(tmp_path, vision=VisionTowerConfig(num_layers=2))
    state = load_file(str(tmp_path / PARTS_FILE))
    name = next(iter(state))
    save_file({**state, name: state[name] * float("nan")}, str(tmp_path / PARTS_FILE))
    with pytest.raises(VideoPartsError, match="NaN"):
        load_embedded_video_model(tmp_path)
    save_file({k: v for k, v in state.items() if k != name}, str(tmp_path / PARTS_FILE))
    with pytest.raises(VideoPartsError, match="does not fit"):
        load_embedded_video_model(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(VideoPartsError, match="format_version"):
        load_embedded_video_model(tmp_path)
    with pytest.raises(ValueError, match="patch_size"):
        VisionTowerConfig(image_size=60)


def test_a_builtin_question_end_to_end_through_the_runtime(video, tmp_path):
    write_split(tmp_path, "heldout", lengths=[16], per_kind=1, kinds=("colour",))
    question = load_video_dataset("builtin", tmp_path)[0]
    pixels = load_video(question.video, FrameConfig(num_frames=question.num_frames, size=video.vision.image_size))
    ids = video_prompt_ids(video.tokenizer, video.model.config, question.prompt(), question.num_frames)
    prompt = embed_video_prompt(video.model, ids, pixels[None])
    runner = RetentionRunner(adapter_for(video.model), video.model, None,
                             RunnerConfig(chunk_size=64, max_new_tokens=3, cache=CacheConfig(update_every=64)))
    answer = answer_video(runner, prompt, eos_token_id=video.tokenizer.eos_token_id, return_logits=True)
    with torch.no_grad():
        reference = video.model(input_ids=ids, pixel_values_videos=pixels[None], logits_to_keep=1).logits[:, -1]
    torch.testing.assert_close(answer.result.logits[:, 0], reference, atol=2e-4, rtol=0)
    assert answer.frame_retention[:, :16].eq(16).all()  # full cache: every frame's 16 tokens kept in every layer
    assert isinstance(question.parse(video.tokenizer.decode(answer.result.new_tokens[0])), str)

"""The LLaVA-NeXT-Video adapter on a tiny random model (field-notes §4: CLIP 2 layers, image 32, patch 4; Llama 2
layers, hidden 64, 4 heads, 2 KV heads; 16 tokens per frame), fp32 on CPU.

What is shown: the spliced prompt holds exactly frames x tokens-per-frame video tokens, each frame's tokens contiguous
and mapped to their frame; the splice equals the model's own (``pixel_values_videos``) forward; a keep-everything
NAMM run through the evicting runtime reproduces transformers' own greedy decoding and logits; only the language
model's attention is routed through the evicting cache; per-frame retention sums to the slots each layer kept, and a
recency rule keeps the last frames.
"""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

from namm_transfer.adapters.base import adapter_for
from namm_transfer.adapters.llava_next_video import (
    TEXT_SOURCE,
    LlavaNextVideoAdapter,
    embed_video_prompt,
    expand_video_token,
    tokens_per_frame,
)
from namm_transfer.namm.baselines import make_baseline
from namm_transfer.namm.budget import FixedRatioBudget
from namm_transfer.namm.config import NammConfig
from namm_transfer.namm.features import NormalisationStats
from namm_transfer.namm.policy import NammPolicy
from namm_transfer.runtime.attention import ATTENTION_NAME
from namm_transfer.runtime.cache import CacheConfig
from namm_transfer.runtime.runner import RunnerConfig
from namm_transfer.video.answer import RetentionRunner, answer_video
from namm_transfer.video.retention import frame_counts, frame_fraction

VIDEO_TOKEN, IMAGE_TOKEN = 100, 101
FRAMES = 6


@pytest.fixture(scope="module")
def tiny_video_model() -> LlavaNextVideoForConditionalGeneration:
    torch.manual_seed(0)
    config = LlavaNextVideoConfig(
        text_config=LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096,
        ),
        vision_config=CLIPVisionConfig(
            image_size=32, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2,
        ),
        video_token_index=VIDEO_TOKEN, image_token_index=IMAGE_TOKEN, spatial_pool_stride=2,
        vision_feature_select_strategy="default", vision_feature_layer=-1, image_grid_pinpoints=[[32, 32]],
    )
    return LlavaNextVideoForConditionalGeneration(config).eval()


def video_inputs(model, frames: int = FRAMES, seed: int = 0):
    """A prompt (1, L) with text around F x T video tokens, and (1, F, 3, 32, 32) pixel values."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 90, (1, 12), generator=generator)
    ids = torch.cat([text[:, :5], torch.tensor([[VIDEO_TOKEN]]), text[:, 5:]], dim=1)
    ids = expand_video_token(ids, VIDEO_TOKEN, frames * tokens_per_frame(model.config))
    return ids, torch.randn(1, frames, 3, 32, 32, generator=generator)


def runner(model, policy, every=32, chunk=16, new_tokens=6) -> RetentionRunner:
    config = RunnerConfig(chunk_size=chunk, max_new_tokens=new_tokens,
                          cache=CacheConfig(update_every=every, attention_dtype="float32"))
    return RetentionRunner(adapter_for(model), model, policy, config)


def test_spliced_prompt_holds_frames_times_tokens_per_frame(tiny_video_model):
    ids, pixels = video_inputs(tiny_video_model)
    per_frame = tokens_per_frame(tiny_video_model.config)
    assert per_frame == 16  # ((32 / 4) / 2)^2
    prompt = embed_video_prompt(tiny_video_model, ids, pixels)
    assert (prompt.input_ids == VIDEO_TOKEN).sum() == FRAMES * per_frame
    assert prompt.inputs_embeds.shape == (1, 12 + FRAMES * per_frame, 64)
    assert (prompt.num_frames, prompt.tokens_per_frame) == (FRAMES, per_frame)
    source = prompt.frame_of_token
    assert torch.equal(source[:5], torch.full((5,), TEXT_SOURCE)) and torch.equal(source[-7:], torch.full((7,), -1))
    assert torch.equal(source[5 : 5 + FRAMES * per_frame], torch.arange(FRAMES).repeat_interleave(per_frame))
    # text positions keep their token embeddings; video positions hold the features
    embedded = tiny_video_model.get_input_embeddings()(ids)
    assert torch.equal(prompt.inputs_embeds[0, source < 0], embedded[0, source < 0])
    assert not torch.allclose(prompt.inputs_embeds[0, source >= 0], embedded[0, source >= 0])


def test_splice_equals_the_models_own_video_forward(tiny_video_model):
    ids, pixels = video_inputs(tiny_video_model)
    prompt = embed_video_prompt(tiny_video_model, ids, pixels)
    with torch.no_grad():
        own = tiny_video_model(input_ids=ids, pixel_values_videos=pixels).logits
        spliced = tiny_video_model(inputs_embeds=prompt.inputs_embeds).logits
    torch.testing.assert_close(spliced, own, atol=1e-5, rtol=0)


def test_token_count_mismatch_is_refused(tiny_video_model):
    ids, pixels = video_inputs(tiny_video_model, frames=FRAMES)
    with pytest.raises(ValueError, match="Video features and video tokens do not match"):
        embed_video_prompt(tiny_video_model, ids, pixels[:, :-1])
    with pytest.raises(ValueError, match="exactly once"):
        expand_video_token(torch.tensor([[1, 2, 3]]), VIDEO_TOKEN, 4)


def test_keep_everything_namm_reproduces_the_full_cache(tiny_video_model):
    ids, pixels = video_inputs(tiny_video_model)
    prompt = embed_video_prompt(tiny_video_model, ids, pixels)
    config = NammConfig(update_every=32)
    stats = NormalisationStats(torch.full((config.spectrogram_bins,), 0.01),
                               torch.full((config.spectrogram_bins,), 1e-4))
    policy = NammPolicy(config, torch.zeros(config.num_params), stats)  # zero weights: every score 0, all kept
    answer = answer_video(runner(tiny_video_model, policy), prompt, return_logits=True)
    reference = tiny_video_model.generate(
        ids, pixel_values_videos=pixels, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0,
    )
    assert len(answer.result.retention) == 2 * (prompt.length // 32)  # policy steps ran on both layers
    assert all(record.kept == record.slots_before for record in answer.result.retention)
    assert torch.equal(answer.result.new_tokens, reference.sequences[:, ids.shape[1]:])
    torch.testing.assert_close(answer.result.logits, torch.stack(reference.logits, dim=1), atol=1e-4, rtol=0)
    fed = prompt.length + 5  # the last generated token is never fed
    expected = torch.tensor([16.0] * FRAMES + [fed - FRAMES * 16])
    assert torch.equal(answer.frame_retention, expected.expand(2, -1))


def test_only_the_language_model_is_routed_through_the_evicting_cache(tiny_video_model):
    adapter = adapter_for(tiny_video_model)
    assert isinstance(adapter, LlavaNextVideoAdapter)
    assert adapter.decoder(tiny_video_model) is tiny_video_model.model.language_model
    geometry = adapter.geometry(tiny_video_model)
    assert (geometry.num_layers, geometry.num_q_heads, geometry.num_kv_heads, geometry.head_dim) == (2, 4, 2, 16)
    vision_before = tiny_video_model.model.vision_tower.config._attn_implementation
    restore = adapter.attach(tiny_video_model)
    try:
        assert tiny_video_model.model.language_model.config._attn_implementation == ATTENTION_NAME
        assert tiny_video_model.model.vision_tower.config._attn_implementation == vision_before
    finally:
        restore()
    assert tiny_video_model.model.language_model.config._attn_implementation != ATTENTION_NAME


@pytest.mark.parametrize("rule", ["recency", "h2o"])
def test_frame_retention_sums_to_the_kept_counts(tiny_video_model, rule):
    ids, pixels = video_inputs(tiny_video_model, seed=1)
    prompt = embed_video_prompt(tiny_video_model, ids, pixels)
    policy = make_baseline(rule, FixedRatioBudget(0.4))
    answer = answer_video(runner(tiny_video_model, policy), prompt)
    retention = answer.frame_retention  # (layers, F + 1)
    assert retention.shape == (2, FRAMES + 1)
    assert any(r.kept < r.slots_before for r in answer.result.retention)  # something was evicted
    torch.testing.assert_close(retention.sum(dim=1), answer.result.visible_per_layer.mean(dim=0))
    assert torch.equal(retention.sum(dim=1), torch.tensor(answer.result.kept_per_layer, dtype=torch.float))
    fraction = frame_fraction(retention, prompt.frame_of_token, FRAMES)
    assert ((fraction >= 0) & (fraction <= 1)).all()
    if rule == "recency":  # sinks are text; among frames the rolling window keeps the newest
        assert (fraction[:, 0] == 0).all() and (fraction[:, -1] == 1).all()
        assert (fraction.diff(dim=1) >= 0).all()


def test_frame_counts_by_hand():
    frame_of_token = torch.tensor([-1, 0, 0, 1, 1, -1])  # text, frame 0 x2, frame 1 x2, text; then generated
    arrival = torch.tensor([[[0, 2, 3, 6, 7], [1, 2, 4, 5, 6]]])  # (B=1, H=2, N=5)
    attendable = torch.tensor([[[True, True, True, True, False], [True, True, True, True, True]]])
    counts = frame_counts(arrival, attendable, frame_of_token, num_frames=2)
    assert torch.equal(counts, torch.tensor([[[1, 1, 2], [2, 1, 2]]]))
    assert torch.equal(counts.sum(-1), attendable.sum(-1))

"""Low-rank adapters of the embedded video model's language model (namm_transfer.video.lora): a fresh adapter
changes nothing, a merged adapter computes what the wrapped one did, the adapters travel with the trained parts
and reload (merged) to the same outputs, and only they train in stage 0 (text descriptions)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from namm_transfer.evals.video_tasks import TaskConfig, make_task
from namm_transfer.video.lora import LoraConfig, LoraLinear, attach_lora, lora_parameters, merge_lora
from namm_transfer.video.model import CONFIG_FILE, VideoPartsError, load_embedded_video_model, save_trained_parts
from namm_transfer.video.train import describe_task, make_example

from test_video_model import last_logits


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(6, 4)
        self.block = nn.Sequential(nn.Linear(4, 4))
        self.block.add_module("v_proj", nn.Linear(4, 3, bias=False))

    def forward(self, x):
        return self.block.v_proj(self.block[0](self.q_proj(x)))


def test_fresh_adapters_change_nothing_and_merge_exactly():
    torch.manual_seed(0)
    model, x = TwoLayers(), torch.randn(5, 6)
    plain = model(x)
    wrappers = attach_lora(model, LoraConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj")), seed=1)
    assert [type(w) for w in wrappers] == [LoraLinear, LoraLinear] and isinstance(model.block[0], nn.Linear)
    assert torch.equal(model(x), plain)  # B starts at zero
    assert len(lora_parameters(model)) == 4 and all(p.requires_grad for p in lora_parameters(model))
    with torch.no_grad():
        for wrapper in wrappers:
            wrapper.lora_b.normal_()
    adapted = model(x)
    q = wrappers[0]  # the q_proj update, then the adapted v_proj, by hand
    hidden = model.block[0](q.base(x) + 2.0 * x @ q.lora_a.T @ q.lora_b.T)
    v = wrappers[1]
    by_hand = v.base(hidden) + 2.0 * hidden @ v.lora_a.T @ v.lora_b.T
    torch.testing.assert_close(adapted, by_hand)
    assert not torch.allclose(adapted, plain)
    assert merge_lora(model) == 2
    assert type(model.q_proj) is nn.Linear and type(model.block.v_proj) is nn.Linear
    torch.testing.assert_close(model(x), adapted, atol=1e-6, rtol=1e-5)


def test_bad_lora_settings_are_refused():
    for bad in ({"rank": -1}, {"rank": 2, "alpha": 0.0}, {"rank": 2, "targets": ()}):
        with pytest.raises(ValueError, match="invalid LoraConfig"):
            LoraConfig(**bad)
    with pytest.raises(ValueError, match="no nn.Linear named"):
        attach_lora(TwoLayers(), LoraConfig(rank=1, targets=("gate_proj",)))


def test_adapters_travel_with_the_trained_parts(tmp_path):
    lora = LoraConfig(rank=2)
    video = load_embedded_video_model(seed=0, lora=lora, merge=False)
    with torch.no_grad():  # stand-in for training: move the adapters
        for parameter in lora_parameters(video.model.model.language_model):
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(7)))
    before = last_logits(video)
    save_trained_parts(video, tmp_path, {"command": "test"})
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["lora"]["rank"] == 2
    reloaded = load_embedded_video_model(tmp_path)  # merged
    assert reloaded.lora == lora and not any(isinstance(m, LoraLinear) for m in reloaded.model.modules())
    torch.testing.assert_close(last_logits(reloaded), before, atol=1e-4, rtol=0)
    plain = load_embedded_video_model(seed=0)
    assert not torch.allclose(last_logits(plain), before, atol=1e-3)  # the adapters made the difference
    with pytest.raises(ValueError, match="merged"):
        save_trained_parts(reloaded, tmp_path / "again", {})
    with pytest.raises(VideoPartsError, match="trained with"):
        load_embedded_video_model(tmp_path, lora=LoraConfig(rank=4))


def test_text_examples_describe_the_needles():
    video = load_embedded_video_model(seed=0)
    task, _ = make_task("train", "order", 16, 0, TaskConfig())
    first, second = sorted(task.needles, key=lambda n: n.start)
    assert describe_task(task) == (f"Video: frame {first.start}: a {first.colour} {first.shape}; "
                                   f"frame {second.start}: a {second.colour} {second.shape}.")
    example = make_example(video, "train", 3, 16, text=True)  # index 3: an order question
    assert example.pixels is None
    assert not (example.input_ids == video.model.config.video_token_id).any()
    text = video.tokenizer.decode(example.input_ids)
    assert text.count("Video: frame") == 1 and "Which object appears first" in text

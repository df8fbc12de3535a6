"""The dense score: teacher-forced log-probabilities of a continuation through the evicting cache.

Shown on a tiny random GQA Llama: with the full cache they equal a hand computation from the plain model's logits
over the whole sequence; under eviction (a step falling inside the continuation) they equal feeding the same
tokens one at a time through an evicting cache with the same policy. On the embedded SmolLM2: the reference answer
of a built-in item is scored token by token, more likely with the full cache than after evicting the needle.
"""

from __future__ import annotations

import pytest
import torch

from namm_transfer.adapters.causal_lm import CausalLMAdapter
from namm_transfer.answer_likelihood import answer_ids, answer_likelihood
from namm_transfer.evals.text_tasks import make_item, token_counter
from namm_transfer.namm.baselines import make_baseline
from namm_transfer.namm.budget import FixedRatioBudget
from namm_transfer.runtime.cache import CacheConfig
from namm_transfer.runtime.runner import EvictingRunner, RunnerConfig, prefill_chunks

from conftest import LowestPolicy


def runner_for(model, policy, chunk=8, every=16):
    return EvictingRunner(CausalLMAdapter(), model, policy,
                          RunnerConfig(chunk_size=chunk, cache=CacheConfig(update_every=every)))


def test_full_cache_log_probs_equal_the_plain_models(tiny_llama):
    torch.manual_seed(1)
    prompt, answer = torch.randint(0, 128, (2, 37)), torch.randint(0, 128, (2, 6))
    scored = runner_for(tiny_llama, None).score_continuation(prompt, answer)
    with torch.no_grad():
        logits = tiny_llama(torch.cat([prompt, answer], dim=1)).logits
    by_hand = torch.log_softmax(logits[:, 36:42].float(), dim=-1).gather(-1, answer[..., None]).squeeze(-1)
    assert scored.log_probs.shape == (2, 6)
    torch.testing.assert_close(scored.log_probs, by_hand, atol=1e-5, rtol=1e-5)
    assert scored.tokens_seen == 43 and (scored.log_probs < 0).all()


def test_evicted_log_probs_equal_feeding_the_answer_token_by_token(tiny_llama):
    torch.manual_seed(2)
    prompt, answer = torch.randint(0, 128, (1, 44)), torch.randint(0, 128, (1, 9))  # a step at 48: inside
    policy = LowestPolicy({0: 10, 1: 7, 2: 12})
    runner = runner_for(tiny_llama, policy)
    scored = runner.score_continuation(prompt, answer[0])
    assert {record.step for record in scored.retention} == {0, 1, 2}  # steps at 16, 32, 48

    cache, adapter = runner.new_cache(), CausalLMAdapter()
    cache.begin(prompt_length=torch.tensor([44]))
    restore = adapter.attach(tiny_llama)
    try:
        with torch.no_grad():
            positions = torch.arange(53)[None]
            for a, b in prefill_chunks(0, 44, 8, 16):
                logits = adapter.forward_chunk(tiny_llama, cache, input_ids=prompt[:, a:b], position_ids=positions[:, a:b])
            rows = [logits[:, -1]]
            for t in range(8):
                rows.append(adapter.forward_chunk(tiny_llama, cache, input_ids=answer[:, t:t + 1],
                                                  position_ids=positions[:, 44 + t:45 + t])[:, -1])
    finally:
        restore()
    by_hand = torch.log_softmax(torch.stack(rows, dim=1).float(), dim=-1).gather(-1, answer[..., None]).squeeze(-1)
    torch.testing.assert_close(scored.log_probs, by_hand, atol=1e-5, rtol=1e-5)
    full = runner_for(tiny_llama, None).score_continuation(prompt, answer)
    assert not torch.allclose(full.log_probs, scored.log_probs)  # eviction changed the answer's likelihood


def test_bad_shapes_are_refused(tiny_llama):
    runner = runner_for(tiny_llama, None)
    with pytest.raises(ValueError, match="continuation_ids"):
        runner.score_continuation(torch.zeros(2, 5, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="continuation_ids"):
        runner.score_continuation(torch.zeros(1, 5, dtype=torch.long), torch.zeros(0, dtype=torch.long))


@pytest.fixture(scope="module")
def smollm2_generator():
    from namm_transfer.models import load_model
    from namm_transfer.text_eval import TextGenerator

    loaded = load_model("smollm2", dtype="float32")
    return TextGenerator(loaded.model, loaded.tokenizer, CacheConfig(update_every=128))


def test_reference_answer_is_scored_and_loses_likelihood_when_the_needle_is_gone(smollm2_generator):
    item = make_item("passkey", 3, 384, 0.3, token_counter(smollm2_generator.tokenizer), "heldout")
    ids = answer_ids(smollm2_generator, item, max_tokens=4)
    assert 1 <= ids.numel() <= 4
    assert smollm2_generator.tokenizer.decode(ids).strip() in item.answers[0]
    full = answer_likelihood(smollm2_generator, item, None, max_tokens=4)
    recent = answer_likelihood(smollm2_generator, item, make_baseline("recency", FixedRatioBudget(0.2)), max_tokens=4)
    assert full.kv_retained == [pytest.approx(1.0)] and recent.kv_retained[0] < 0.35
    assert full.mean_log_prob[0] > recent.mean_log_prob[0]  # the passkey sits at depth 0.3: recency drops it
    two = answer_likelihood(smollm2_generator, item, None, rows=2, max_tokens=4)
    assert two.mean_log_prob == pytest.approx([full.mean_log_prob[0]] * 2, abs=1e-4)

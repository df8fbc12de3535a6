"""The NAMM and the baselines inside the runtime, on a tiny random Llama with GQA (fp32, CPU).

What is shown: zero NAMM weights keep every token and reproduce the plain model's logits over chunked prefill and
50 decoded tokens; an evicting NAMM's outputs equal attention over only the kept tokens (poisoned evicted values
change nothing); matched-budget baselines reproduce the NAMM's per-layer counts; population members batched in
one forward behave exactly as each member alone; the NAMM also manages a plain-PyTorch model through its adapter.
The poisoned-value check of eviction lives in test_runner.py; here the reference is an independent DynamicCache.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

from namm_transfer.adapters.base import adapter_for, cache_argument
from namm_transfer.adapters.causal_lm import CausalLMAdapter
from namm_transfer.methods import MATCHED, Method, build_policy
from namm_transfer.namm.config import NammConfig
from namm_transfer.namm.features import NormalisationStats
from namm_transfer.namm.policy import NammPolicy
from namm_transfer.runtime.cache import CacheConfig, EvictingCache
from namm_transfer.runtime.runner import EvictingRunner, RunnerConfig

from test_runner import decode_forced, hf_greedy, prefill

CONFIG = NammConfig(update_every=64)
# Spectrogram EMA values of a tiny model's attention are ~1e-2; these statistics make the normalised features O(1).
STATS = NormalisationStats(torch.full((CONFIG.spectrogram_bins,), 0.01), torch.full((CONFIG.spectrogram_bins,), 1e-4))


def evicting_params(seed: int, bias: float = 0.0) -> torch.Tensor:
    """A random parameter vector that evicts a good share of tokens (read-out bias = last entry)."""
    params = 0.3 * torch.randn(CONFIG.num_params, generator=torch.Generator().manual_seed(seed))
    params[-1] = bias
    return params


def namm(params: torch.Tensor) -> NammPolicy:
    return NammPolicy(CONFIG, params, STATS)


def runner(model, policy, new_tokens=8, every=64, chunk=32):
    config = RunnerConfig(chunk_size=chunk, max_new_tokens=new_tokens,
                          cache=CacheConfig(update_every=every, attention_dtype="float32"))
    return EvictingRunner(adapter_for(model), model, policy, config)


def test_zero_weights_keep_everything_and_equal_the_plain_model(tiny_llama):
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (1, 300))
    result = runner(tiny_llama, namm(torch.zeros(CONFIG.num_params)), new_tokens=50, chunk=48).generate(
        ids, return_logits=True)
    tokens, logits = hf_greedy(tiny_llama, ids, 50)
    assert len(result.retention) == 3 * 5  # steps at 64 .. 320 tokens ran on every layer
    assert all(r.kept == r.slots_before for r in result.retention)
    assert torch.equal(result.new_tokens, tokens)
    torch.testing.assert_close(result.logits, logits, atol=1e-4, rtol=0)


def test_an_evicting_namm_never_attends_to_evicted_tokens_again(tiny_llama):
    """After NAMM steps during chunked prefill, decoding equals transformers' own sdpa over a DynamicCache that holds
    only the kept K/V of every (layer, head): evicted tokens are gone for good."""
    torch.manual_seed(1)
    ids, follow = torch.randint(0, 128, (1, 256)), torch.randint(0, 128, (1, 20))
    adapter = CausalLMAdapter()
    evicted = EvictingCache(namm(evicting_params(3, bias=0.3)), 3,
                            config=CacheConfig(update_every=64, attention_dtype="float32"))
    restore = adapter.attach(tiny_llama)
    try:
        with torch.no_grad():
            prefill(adapter, tiny_llama, evicted, ids, 32, 64)
            evicted.flush()
            kept = [layer.num_slots for layer in evicted.layers]
            assert all(k < 256 for k in kept) and len(set(kept)) > 1  # it evicts, and layers differ
            positions_before = [layer.arrival.clone() for layer in evicted.layers]
            reference = DynamicCache()
            for i, layer in enumerate(evicted.layers):
                assert layer.attendable.all()  # NAMM fillers stay visible (namm-spec §4)
                reference.update(layer.keys.clone(), layer.values.clone(), i)
            got = decode_forced(adapter, tiny_llama, evicted, follow, 256)
    finally:
        restore()
    with torch.no_grad():
        ref = [tiny_llama(input_ids=follow[:, t : t + 1], position_ids=torch.tensor([[256 + t]]),
                          **{cache_argument(tiny_llama): reference}).logits[:, -1] for t in range(follow.shape[1])]
    torch.testing.assert_close(got, torch.stack(ref, dim=1), atol=1e-5, rtol=0)
    for before, layer in zip(positions_before, evicted.layers):  # kept tokens keep their arrival index
        assert torch.equal(layer.arrival[..., : before.shape[-1]], before)


def test_matched_budget_baselines_reproduce_the_namm_counts(tiny_llama):
    torch.manual_seed(2)
    ids = torch.randint(0, 128, (1, 200))
    namm_run = runner(tiny_llama, namm(evicting_params(5))).generate(ids)
    counts = {(r.step, r.layer): r.kept for r in namm_run.retention}
    assert any(r.kept < r.slots_before for r in namm_run.retention)
    for rule in ("h2o", "l2", "recency", "random"):
        policy = build_policy(Method(rule, MATCHED), namm_retention=namm_run.retention)
        result = runner(tiny_llama, policy).generate(ids)
        assert {(r.step, r.layer): r.kept for r in result.retention} == counts, rule
        assert result.kept_per_layer == namm_run.kept_per_layer, rule


def test_matched_budget_baselines_answering_longer_than_the_namm_run_to_the_end(tiny_llama):
    """The NAMM stopped after 4 tokens; a baseline decoding 80 reaches steps the NAMM never ran: it keeps the NAMM's
    last share of the tokens seen there and the budget says so (issue 6, fix 4)."""
    torch.manual_seed(2)
    ids = torch.randint(0, 128, (1, 200))
    namm_run = runner(tiny_llama, namm(evicting_params(5)), new_tokens=4).generate(ids)
    recorded = {(r.step, r.layer) for r in namm_run.retention}
    for rule in ("h2o", "recency"):
        policy = build_policy(Method(rule, MATCHED), namm_retention=namm_run.retention)
        result = runner(tiny_llama, policy, new_tokens=80).generate(ids)
        extended = {(r.step, r.layer) for r in result.retention} - recorded
        assert extended and policy.budget.extended == extended, rule  # steps at 256 tokens, on every layer
        for record in result.retention:
            if (record.step, record.layer) in extended:
                share = policy.budget.last_shares[record.layer]
                assert record.kept == min(record.slots_before, math.ceil(round(share * record.tokens_seen, 9)))


@pytest.mark.parametrize("length", [96, 100])
def test_generate_with_a_namm_steps_on_schedule_and_protects_the_prompt_tail(tiny_llama, length):
    """model.generate with the cache and a one-shot prefill: any prompt length works (a 100-token prompt is no
    multiple of the STFT hop), and the prompt tail the NAMM protects is taken from the first forward (issue 6,
    fixes 1 and 3). Every score is -1, so only the newest token and the protected tail survive each step."""
    config = NammConfig(update_every=16, protect_prompt_tail=8)
    params = torch.zeros(config.num_params)
    params[-1] = -1.0
    policy = NammPolicy(config, params, STATS)
    adapter = CausalLMAdapter()
    restore = adapter.attach(tiny_llama)
    try:
        cache = EvictingCache(policy, 3)
        ids = torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(length))
        hf_greedy(tiny_llama, ids, 20, **{cache_argument(tiny_llama): cache})
    finally:
        restore()
    assert cache.update_every == 16  # declared by the NAMM
    assert {r.tokens_seen for r in cache.retention} == set(range(16, length + 20, 16))
    tail = set(range(length - 8, length))
    for layer in cache.layers:
        assert tail <= set(layer.arrival[0, 0].tolist())


def test_steps_of_all_layers_in_one_call_keep_what_per_layer_steps_keep(tiny_llama):
    """The cache hands the NAMM every due layer at once (step_layers: layers stacked, padded to the longest); the
    kept sets, counts, states and logits equal one step call per layer (issue 6, item 9)."""
    torch.manual_seed(12)
    ids = torch.randint(0, 128, (2, 256))
    results, caches = [], []
    for group in (1, 3):
        policy = namm(torch.stack([evicting_params(3, bias=0.3), evicting_params(9)]))
        policy.set_members(torch.tensor([0, 1]))
        config = RunnerConfig(chunk_size=32, max_new_tokens=70,
                              cache=CacheConfig(update_every=64, attention_dtype="float32", layers_per_step=group))
        runner_ = EvictingRunner(adapter_for(tiny_llama), tiny_llama, policy, config)
        results.append(runner_.generate(ids, return_logits=True))
        caches.append(policy)
    per_layer, together = results
    assert len({r.slots_before for r in together.retention}) > 3  # layers held different counts at the steps
    assert together.retention == per_layer.retention and together.kept_per_layer == per_layer.kept_per_layer
    assert torch.equal(together.new_tokens, per_layer.new_tokens) and torch.equal(together.logits, per_layer.logits)
    for layer in range(3):
        a, b = (policy.layer_state(layer) for policy in caches)
        assert torch.equal(a.ema, b.ema) and torch.equal(a.tail, b.tail)


def test_population_members_batched_behave_as_each_member_alone(tiny_llama):
    torch.manual_seed(3)
    ids = torch.randint(0, 128, (1, 200))
    members = torch.stack([evicting_params(7), evicting_params(8, bias=0.5)])
    policy = namm(members)
    policy.set_members(torch.tensor([0, 1]))
    batched = runner(tiny_llama, policy, new_tokens=12).generate(ids.expand(2, -1), return_logits=True)
    for row in range(2):
        alone = runner(tiny_llama, namm(members[row]), new_tokens=12).generate(ids, return_logits=True)
        assert torch.equal(batched.new_tokens[row], alone.new_tokens[0])
        torch.testing.assert_close(batched.logits[row], alone.logits[0], atol=1e-4, rtol=0)
        assert torch.equal(batched.visible_per_layer[row], alone.visible_per_layer[0])
    assert not torch.equal(batched.visible_per_layer[0], batched.visible_per_layer[1])  # they kept different counts


def test_the_same_namm_manages_a_plain_pytorch_model():
    from test_custom_adapter import make_model

    model = make_model()
    ids = torch.randint(0, 64, (1, 128), generator=torch.Generator().manual_seed(4))
    kept = runner(model, namm(torch.zeros(CONFIG.num_params)), new_tokens=6).generate(ids, return_logits=True)
    plain = runner(model, None, new_tokens=6).generate(ids, return_logits=True)
    torch.testing.assert_close(kept.logits, plain.logits, atol=1e-5, rtol=0)
    evicting = runner(model, namm(evicting_params(6)), new_tokens=6).generate(ids)
    assert max(evicting.kept_per_layer) < 128 + 5
    assert evicting.retention and all(r.kept <= r.slots_before for r in evicting.retention)


@pytest.mark.parametrize("bad", [torch.zeros(10), torch.full((CONFIG.num_params,), float("nan"))])
def test_a_namm_with_bad_parameters_is_refused(bad):
    with pytest.raises(ValueError, match="params"):
        namm(bad)

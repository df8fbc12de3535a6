"""EvictingRunner and the causal-LM adapter on tiny random transformers models (fp32, CPU).

What is shown: a keep-everything policy reproduces the plain model exactly; after an eviction every later output
equals attention over only the kept tokens (poisoned evicted values change nothing; an independent DynamicCache
holding only the kept K/V gives the same logits); kept tokens keep their arrival index; layers may hold different
lengths; left padding; ``model.generate`` with the cache; exact byte accounting; adapter look-up errors.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    DynamicCache,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from namm_transfer.adapters.base import ModelGeometry, adapter_for, cache_argument, known_model_types
from namm_transfer.adapters.causal_lm import CausalLMAdapter
from namm_transfer.namm.baselines import make_baseline
from namm_transfer.namm.budget import FixedRatioBudget
from namm_transfer.runtime.cache import CacheConfig, EvictingCache
from namm_transfer.runtime.runner import EvictingRunner, RunnerConfig, prefill_chunks

from conftest import POISON


def runner_for(model, policy, chunk, every, new_tokens=8):
    config = RunnerConfig(chunk_size=chunk, max_new_tokens=new_tokens, cache=CacheConfig(update_every=every))
    return EvictingRunner(CausalLMAdapter(), model, policy, config)


def hf_greedy(model, ids, new_tokens, **kwargs):
    """Plain transformers greedy decoding: (tokens (B, T), logits (B, T, V))."""
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, output_logits=True,
        return_dict_in_generate=True, pad_token_id=0, **kwargs,
    )
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, dim=1)


def prefill(adapter, model, cache, ids, chunk, every):
    """Chunked prefill through the adapter; returns the last position's logits (B, V)."""
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    for a, b in prefill_chunks(0, ids.shape[1], chunk, every):
        logits = adapter.forward_chunk(model, cache, input_ids=ids[:, a:b], position_ids=positions[:, a:b])
    return logits[:, -1]


def decode_forced(adapter, model, cache, tokens, first_position):
    """Feed ``tokens`` (B, T) one by one; returns the logits after each (B, T, V)."""
    out = []
    for t in range(tokens.shape[1]):
        position = torch.full((tokens.shape[0], 1), first_position + t)
        out.append(adapter.forward_chunk(model, cache, input_ids=tokens[:, t : t + 1], position_ids=position)[:, -1])
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("use_policy", [True, False])
def test_full_budget_runner_equals_the_plain_model(tiny_llama, policies, use_policy):
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (1, 300))
    policy = policies["full"]() if use_policy else None
    result = runner_for(tiny_llama, policy, chunk=64, every=64, new_tokens=50).generate(ids, return_logits=True)
    ref_tokens, ref_logits = hf_greedy(tiny_llama, ids, 50)
    assert torch.equal(result.new_tokens, ref_tokens)
    torch.testing.assert_close(result.logits, ref_logits, atol=1e-4, rtol=0)
    assert result.tokens_seen == 300 + 49
    assert tiny_llama.config._attn_implementation == "sdpa"  # restored after the run
    if use_policy:
        # the paper's schedule: a step at every multiple of 64 tokens, each over exactly 64 new queries
        assert [v.n_new for v in policy.views] == [64] * 15
        assert [int(v.arrival.max()) + 1 for v in policy.views] == [64] * 3 + [128] * 3 + [192] * 3 + [
            256
        ] * 3 + [320] * 3
        assert [(r.step, r.layer) for r in result.retention] == [(s, l) for s in range(5) for l in range(3)]
    else:
        assert result.retention == []
    assert result.kept_per_layer == [349] * 3


def test_after_eviction_outputs_equal_attention_over_kept_tokens_only(tiny_llama, policies, masked_twin):
    """Ragged per-head eviction; the twin keeps every token but masks the evicted ones and poisons their values."""
    torch.manual_seed(1)
    adapter = CausalLMAdapter()
    ids = torch.randint(0, 128, (2, 32))
    forced = torch.randint(0, 128, (2, 4))
    config = CacheConfig(update_every=32, attention_dtype="float32")
    policy = policies["top_attention"](k=12)
    evicted = EvictingCache(policy, 3, config=config)
    full = EvictingCache(None, 3, config=config)
    restore = adapter.attach(tiny_llama)
    try:
        prefill(adapter, tiny_llama, evicted, ids, chunk=16, every=32)
        prefill(adapter, tiny_llama, full, ids, chunk=16, every=32)
        evicted.flush()
        assert evicted.kept_per_layer() == [12, 12, 12]
        layer0 = evicted.layers[0].arrival
        assert not torch.equal(layer0[:, 0], layer0[:, 1])  # heads keep different tokens
        twin = masked_twin(full, evicted)
        got = decode_forced(adapter, tiny_llama, evicted, forced, 32)
        ref = decode_forced(adapter, tiny_llama, twin, forced, 32)
        unpruned = decode_forced(adapter, tiny_llama, full, forced, 32)
    finally:
        restore()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert (got - unpruned).abs().max() > 1e-3  # the eviction did change the outputs
    assert (twin.layers[1].values.abs() == POISON).any()


def test_decode_after_eviction_matches_a_dynamic_cache_of_the_kept_tokens(tiny_llama, policies):
    """Independent reference: transformers' own sdpa over a DynamicCache filled with only the kept K/V, layers of
    different lengths."""
    torch.manual_seed(2)
    adapter = CausalLMAdapter()
    ids = torch.randint(0, 128, (1, 96))
    forced = torch.randint(0, 128, (1, 5))
    cache = EvictingCache(policies["lowest"]({0: 10, 1: 20, 2: 40}), 3, config=CacheConfig(update_every=32))
    restore = adapter.attach(tiny_llama)
    try:
        prefill(adapter, tiny_llama, cache, ids, chunk=20, every=32)
        cache.flush()
        reference = DynamicCache()
        for i, layer in enumerate(cache.layers):
            reference.update(layer.keys.clone(), layer.values.clone(), i)
        got = decode_forced(adapter, tiny_llama, cache, forced, 96)
    finally:
        restore()
    assert cache.kept_per_layer() == [10 + 5, 20 + 5, 40 + 5]
    ref = []
    for t in range(forced.shape[1]):
        step = {"input_ids": forced[:, t : t + 1], "position_ids": torch.tensor([[96 + t]])}
        out = tiny_llama(**step, **{cache_argument(tiny_llama): reference})
        ref.append(out.logits[:, -1])
    torch.testing.assert_close(got, torch.stack(ref, dim=1), atol=1e-5, rtol=0)


def test_kept_tokens_keep_their_arrival_index_and_layers_differ_in_length(tiny_llama, policies):
    torch.manual_seed(3)
    keep = {0: 8, 1: 16, 2: 24}
    policy = policies["lowest"](keep)
    ids = torch.randint(0, 128, (1, 300))
    result = runner_for(tiny_llama, policy, chunk=48, every=64, new_tokens=40).generate(ids, return_logits=True)
    assert torch.isfinite(result.logits).all()
    last = {}
    for view, decision in policy.calls:
        if view.layer in last:
            old_index, old_decision = last[view.layer]
            kept = old_decision.indices.shape[-1]
            assert torch.equal(view.arrival[..., :kept], old_index.gather(2, old_decision.indices))
        last[view.layer] = (view.arrival, decision)
        assert view.n_new == 64
    assert [(r.layer, r.kept) for r in result.retention[:3]] == [(0, 8), (1, 16), (2, 24)]
    tail = result.tokens_seen - 320  # tokens since the last step (at 320)
    assert result.kept_per_layer == [keep[l] + tail for l in range(3)]


def test_left_padded_batch_gives_each_row_its_own_tokens(tiny_llama, policies):
    torch.manual_seed(4)
    short, long_ = torch.randint(1, 128, (1, 50)), torch.randint(1, 128, (1, 75))
    batch = torch.cat([torch.cat([torch.zeros(1, 25, dtype=torch.long), short], 1), long_])
    mask = torch.cat([torch.cat([torch.zeros(1, 25), torch.ones(1, 50)], 1), torch.ones(1, 75)]).long()
    runner = runner_for(tiny_llama, policies["full"](), chunk=24, every=32, new_tokens=20)
    together = runner.generate(batch, attention_mask=mask, return_logits=True)
    for row, ids in enumerate((short, long_)):
        alone = runner.generate(ids, return_logits=True)
        assert torch.equal(together.new_tokens[row], alone.new_tokens[0])
        torch.testing.assert_close(together.logits[row], alone.logits[0], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="left-padded"):
        runner.generate(batch, attention_mask=mask.flip(1))


@pytest.mark.parametrize("rule", ["recency", "h2o"])
def test_an_evicting_rows_result_does_not_depend_on_its_batch(tiny_llama, rule):
    """recency and H2O at half the tokens seen: a left-padded row gets the tokens, logits and kept sets it gets alone,
    because padding never counts as arrivals for the period or the budget (issue 6, fix 5)."""
    torch.manual_seed(10)
    short, long_ = torch.randint(1, 128, (1, 50)), torch.randint(1, 128, (1, 75))
    batch = torch.cat([torch.cat([torch.zeros(1, 25, dtype=torch.long), short], 1), long_])
    mask = torch.cat([torch.cat([torch.zeros(1, 25), torch.ones(1, 50)], 1), torch.ones(1, 75)]).long()

    def run(ids, attention_mask=None):
        policy = make_baseline(rule, FixedRatioBudget(0.5))
        return runner_for(tiny_llama, policy, chunk=24, every=16, new_tokens=30).generate(
            ids, attention_mask=attention_mask, return_logits=True)

    together = run(batch, mask)
    assert any(r.kept < r.slots_before for r in together.retention)
    for row, ids in enumerate((short, long_)):
        alone = run(ids)
        assert torch.equal(together.new_tokens[row], alone.new_tokens[0])
        torch.testing.assert_close(together.logits[row], alone.logits[0], atol=1e-4, rtol=0)


def test_padding_slots_are_never_attended(tiny_llama):
    torch.manual_seed(5)
    adapter = CausalLMAdapter()
    ids = torch.randint(1, 128, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :5] = 0
    cache = EvictingCache(None, 3)
    cache.begin(mask)
    restore = adapter.attach(tiny_llama)
    try:
        prefill(adapter, tiny_llama, cache, ids, chunk=12, every=12)
        token = torch.tensor([[7], [9]])
        before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        clean = decode_forced(adapter, tiny_llama, cache, token, 12)
        for layer, (keys, values) in zip(cache.layers, before):  # roll back, then poison the padding
            layer.keys, layer.values = keys, values.masked_fill(~layer.attendable[:, :, :12, None], POISON)
            layer.attendable, layer.arrival, layer.tokens_seen = layer.attendable[:, :, :12], layer.arrival[:, :, :12], 12
        poisoned = decode_forced(adapter, tiny_llama, cache, token, 12)
    finally:
        restore()
    torch.testing.assert_close(poisoned, clean, atol=1e-6, rtol=0)


def test_hf_generate_with_the_cache_matches_the_runner(tiny_llama, policies):
    torch.manual_seed(6)
    ids = torch.randint(0, 128, (1, 100))
    keep = {0: 12, 1: 12, 2: 12}
    result = runner_for(tiny_llama, policies["lowest"](keep), chunk=16, every=32, new_tokens=40).generate(ids)
    adapter = CausalLMAdapter()
    restore = adapter.attach(tiny_llama)
    try:
        chunked = EvictingCache(policies["lowest"](keep), 3, config=CacheConfig(update_every=32))
        tokens, _ = hf_greedy(tiny_llama, ids, 40, prefill_chunk_size=32, **{cache_argument(tiny_llama): chunked})
        one_shot_policy = policies["lowest"](keep)
        one_shot = EvictingCache(one_shot_policy, 3, config=CacheConfig(update_every=32))
        hf_greedy(tiny_llama, ids, 40, **{cache_argument(tiny_llama): one_shot})
    finally:
        restore()
    assert torch.equal(tokens, result.new_tokens)
    assert chunked.retention == result.retention


def test_hf_generate_one_shot_prefill_steps_on_the_period_schedule(tiny_llama, policies):
    """generate feeds the whole prompt in one forward: the cache still steps at every multiple of the period with
    exactly that many queries, so tokens, logits and kept sets equal the runner's chunked prefill (issue 6, fix 1)."""
    torch.manual_seed(6)
    ids = torch.randint(0, 128, (1, 100))
    result = runner_for(tiny_llama, policies["top_attention"](10), chunk=16, every=32, new_tokens=40).generate(
        ids, return_logits=True)
    adapter = CausalLMAdapter()
    restore = adapter.attach(tiny_llama)
    try:
        policy = policies["top_attention"](10)
        one_shot = EvictingCache(policy, 3, config=CacheConfig(update_every=32))
        tokens, logits = hf_greedy(tiny_llama, ids, 40, **{cache_argument(tiny_llama): one_shot})
    finally:
        restore()
    assert [view.n_new for view, _ in policy.calls] == [32] * len(policy.calls)
    # layer by layer inside the one forward, instead of forward by forward: the same records in another order
    assert sorted(one_shot.retention, key=lambda r: (r.step, r.layer)) == result.retention
    assert len(result.retention) == 3 * 4  # steps at 32, 64, 96 and 128 tokens
    assert torch.equal(tokens, result.new_tokens)
    torch.testing.assert_close(logits, result.logits, atol=1e-5, rtol=0)


def test_hf_generate_reads_left_padding_from_the_attention_mask(tiny_llama):
    """Under generate the cache learns the padding from the model's 2-D attention mask, without begin(): a left-padded
    batch gives the logits of stock sdpa generate (issue 6, fix 2)."""
    torch.manual_seed(8)
    ids = torch.randint(1, 128, (2, 20))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    ids[0, :7] = 0
    options = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
                   return_dict_in_generate=True, pad_token_id=0)
    reference = tiny_llama.generate(ids, **options)
    adapter = CausalLMAdapter()
    restore = adapter.attach(tiny_llama)
    try:
        cache = EvictingCache(None, 3)
        got = tiny_llama.generate(ids, **options, **{cache_argument(tiny_llama): cache})
    finally:
        restore()
    assert torch.equal(got.sequences, reference.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(reference.logits), atol=1e-5, rtol=0)
    layer = cache.layers[0]
    assert layer.attendable[0, :, :7].eq(False).all() and layer.attendable[0, :, 7:].all() and layer.attendable[1].all()


def test_peak_and_final_kv_bytes_are_exact(tiny_llama, policies):
    torch.manual_seed(7)
    ids = torch.randint(0, 128, (2, 64))
    policy = policies["lowest"]({0: 8, 1: 8, 2: 8})
    result = runner_for(tiny_llama, policy, chunk=32, every=32, new_tokens=1).generate(ids)
    per_token = 2 * 2 * 16 * 2 * 4  # rows x KV heads x head dim x (K and V) x fp32 bytes, one layer
    # chunk 2: each layer steps (32 -> 8) then appends 32; the peak is reached after the last layer: 3 x 40 tokens
    assert result.kv_bytes_peak == 3 * 40 * per_token
    # the step due at 64 tokens runs on the final flush: 8 kept tokens per layer
    assert result.kept_per_layer == [8, 8, 8]
    assert result.kv_bytes_final == 3 * 8 * per_token
    # policy bytes: validity (1 byte) and int32 arrival index (4 bytes) per row, KV head and slot; no queries are
    # buffered after the final step, and this policy holds no state
    assert result.policy_bytes_final == 3 * 8 * 2 * 2 * (1 + 4)
    assert result.total_bytes_final == result.kv_bytes_final + result.policy_bytes_final
    # at the peak, right before the step at 64 tokens, each layer buffers 32 queries: 2 rows x 4 heads x 16 x 4 bytes
    queries = 2 * 4 * 32 * 16 * 4
    assert result.policy_bytes_peak == 3 * (40 * 2 * 2 * (1 + 4) + queries)
    assert result.total_bytes_peak == result.kv_bytes_peak + result.policy_bytes_peak


def test_prompt_embeddings_prefill_equals_token_ids(tiny_llama, policies):
    torch.manual_seed(8)
    ids = torch.randint(0, 128, (1, 40))
    runner = runner_for(tiny_llama, policies["lowest"]({0: 6, 1: 6, 2: 6}), chunk=8, every=16, new_tokens=10)
    from_ids = runner.generate(ids, return_logits=True)
    from_embeds = runner.generate(inputs_embeds=tiny_llama.get_input_embeddings()(ids), return_logits=True)
    assert torch.equal(from_ids.new_tokens, from_embeds.new_tokens)
    torch.testing.assert_close(from_ids.logits, from_embeds.logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="exactly one"):
        runner.generate()


def test_eos_ends_a_row_and_the_run(tiny_llama):
    torch.manual_seed(9)
    ids = torch.randint(0, 128, (1, 20))
    runner = runner_for(tiny_llama, None, chunk=8, every=16, new_tokens=12)
    free = runner.generate(ids).new_tokens[0]
    eos = int(free[3])
    first = int((free == eos).nonzero()[0])
    stopped = runner.generate(ids, eos_token_id=eos).new_tokens[0]
    assert torch.equal(stopped, free[: first + 1])


def test_model_left_on_namm_attention_without_the_cache_is_plain_sdpa(tiny_llama):
    torch.manual_seed(10)
    ids = torch.randint(1, 128, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, :4] = 0
    ref = tiny_llama(input_ids=ids, attention_mask=mask).logits
    restore = CausalLMAdapter().attach(tiny_llama)
    try:
        assert tiny_llama.config._attn_implementation == "namm_evicting"
        got = tiny_llama(input_ids=ids, attention_mask=mask).logits
    finally:
        restore()
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], atol=1e-6, rtol=0)


def tiny(config_cls, model_cls, **extra):
    torch.manual_seed(11)
    config = config_cls(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, attn_implementation="sdpa", **extra,
    )
    return model_cls(config).eval()


@pytest.mark.parametrize(
    "build, managed",
    [
        (lambda: tiny(Qwen2Config, Qwen2ForCausalLM), {0, 1, 2}),
        (lambda: tiny(Qwen3Config, Qwen3ForCausalLM), {0, 1, 2}),
        (lambda: tiny(MistralConfig, MistralForCausalLM, sliding_window=12), set()),
        (
            lambda: tiny(
                Gemma3TextConfig, Gemma3ForCausalLM, sliding_window=8,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            ),
            {1},
        ),
    ],
    ids=["qwen2", "qwen3", "mistral-sliding", "gemma3-text"],
)
def test_model_families_at_full_budget_equal_the_plain_model(build, managed, policies):
    model = build()
    ids = torch.randint(0, 96, (1, 40))
    adapter = adapter_for(model)
    geometry = adapter.geometry(model)
    assert geometry.managed_layers == managed and (geometry.num_q_heads, geometry.num_kv_heads) == (4, 2)
    policy = policies["full"]()
    config = RunnerConfig(chunk_size=12, max_new_tokens=8, cache=CacheConfig(update_every=16))
    result = EvictingRunner(adapter, model, policy, config).generate(ids, return_logits=True)
    ref_tokens, ref_logits = hf_greedy(model, ids, 8)
    assert torch.equal(result.new_tokens, ref_tokens)
    torch.testing.assert_close(result.logits, ref_logits, atol=1e-4, rtol=0)
    assert {v.layer for v in policy.views} == managed
    if model.config.model_type == "gemma3_text":  # unmanaged sliding layers hold window - 1 + the last token
        assert [result.kept_per_layer[i] for i in (0, 2)] == [8, 8] and result.kept_per_layer[1] == 47
    if model.config.model_type == "mistral":  # every layer is a sliding layer: none holds more than the window
        assert result.kept_per_layer == [12, 12, 12]


def test_mistral_full_cache_holds_only_its_window(policies):
    """Mistral (no layer_types, a sliding_window): the full cache trims every layer to its window and still equals the
    plain model (issue 6, fix 6)."""
    torch.manual_seed(9)
    model = tiny(MistralConfig, MistralForCausalLM, sliding_window=12)
    ids = torch.randint(0, 96, (1, 40))
    config = RunnerConfig(chunk_size=12, max_new_tokens=8)
    result = EvictingRunner(adapter_for(model), model, None, config).generate(ids, return_logits=True)
    ref_tokens, ref_logits = hf_greedy(model, ids, 8)
    assert torch.equal(result.new_tokens, ref_tokens)
    torch.testing.assert_close(result.logits, ref_logits, atol=1e-4, rtol=0)
    assert result.kept_per_layer == [12, 12, 12]  # window - 1 old tokens + the last one, not the 47 seen


def test_unknown_model_type_gives_a_one_line_error():
    class Config:
        model_type = "xyz"

    model = torch.nn.Linear(2, 2)
    model.config = Config()
    with pytest.raises(ValueError) as error:
        adapter_for(model)
    message = str(error.value)
    assert "\n" not in message and message.startswith("no adapter for model type 'xyz'; known: ")
    assert "llama" in message and "gemma3_text" in message
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma3_text"} <= set(known_model_types())
    with pytest.raises(ValueError, match="must be a multiple of num_kv_heads"):
        ModelGeometry(2, 3, 2, 8, frozenset({0}))
    with pytest.raises(ValueError, match="managed_layers"):
        ModelGeometry(2, 4, 2, 8, frozenset({5}))


def test_runner_config_and_chunk_bounds():
    assert prefill_chunks(0, 300, 128, 512) == [(0, 128), (128, 256), (256, 300)]
    assert prefill_chunks(0, 300, 100, 128) == [(0, 100), (100, 128), (128, 228), (228, 256), (256, 300)]
    assert prefill_chunks(30, 40, 8, 32) == [(30, 32), (32, 40)]
    assert RunnerConfig().cache == CacheConfig() and RunnerConfig().chunk_size == 128
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        RunnerConfig(chunk_size=0)
    with pytest.raises(ValueError, match="cache must be a CacheConfig"):
        RunnerConfig(cache={"update_every": 4})

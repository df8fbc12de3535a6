"""The warm start by gradient (issue 8): the oracle of future attention, the keep targets, the recorded features,
and the fit.

Shown: the oracle keeps the smallest top-mass set; the recency target keeps exactly the tokens younger than its
window and the union both sets; the future mass is read from the model's own attention and the model's attention
implementation is restored; the recorder sees every step of every layer with the features the NAMM would score;
the fit lowers its loss and its kept sets follow the target better than the initial scorer's, on a synthetic rule
and on a recency window learnt from a real model's recorded features.
"""

from __future__ import annotations

import pytest
import torch

from namm_transfer.adapters.causal_lm import CausalLMAdapter
from namm_transfer.evolve.feature_recorder import FeatureRecorder, recorded_features
from namm_transfer.evolve.keep_target import KeepTarget
from namm_transfer.evolve.oracle import OracleConfig, future_attention, oracle_keep
from namm_transfer.evolve.scorer_fit import Example, FitConfig, evaluate, fit_scorer, initial_params, make_examples
from namm_transfer.namm.config import NammConfig
from namm_transfer.runtime.cache import CacheConfig
from namm_transfer.runtime.runner import EvictingRunner, RunnerConfig


def test_oracle_keeps_the_smallest_set_holding_the_coverage():
    mass = torch.tensor([[0.05, 0.5, 0.15, 0.3], [1.0, 0.0, 0.0, 0.0]])
    keep = oracle_keep(mass, 0.9)
    assert keep.tolist() == [[False, True, True, True], [True, False, False, False]]
    assert oracle_keep(mass, 1.0)[0].all() and oracle_keep(mass, 0.4)[0].tolist() == [False, True, False, False]
    with pytest.raises(ValueError, match="answer_weight"):
        OracleConfig(answer_weight=-1.0)


def test_keep_targets_recency_window_oracle_and_union():
    mass = torch.tensor([[0.6, 0.0, 0.1, 0.0, 0.3], [0.0, 0.0, 0.0, 0.0, 1.0]])
    positions = torch.tensor([[0, 3, 7, 8, 9], [2, 4, 5, 6, 10]])  # ages [9, 6, 2, 1, 0] and [8, 6, 5, 4, 0]
    recency = KeepTarget(kind="recency", recency_window=5).labels(mass, positions)
    assert recency.tolist() == [[False, False, True, True, True], [False, False, False, True, True]]
    oracle = KeepTarget(kind="oracle", coverage=0.8).labels(mass, positions)
    assert torch.equal(oracle, oracle_keep(mass, 0.8))
    assert oracle.tolist() == [[True, False, False, False, True], [False, False, False, False, True]]
    union = KeepTarget(kind="union", coverage=0.8, recency_window=5).labels(mass, positions)
    assert torch.equal(union, oracle | recency)
    for bad, field in (({"kind": "newest"}, "kind"), ({"coverage": 1.5}, "coverage"),
                       ({"recency_window": 0}, "recency_window")):
        with pytest.raises(ValueError, match=field):
            KeepTarget(**bad)


def test_future_attention_sums_the_later_queries_and_restores_the_model(tiny_llama):
    torch.manual_seed(0)
    sequence = torch.randint(0, 128, (1, 40))
    masses = future_attention(tiny_llama, sequence, 34, [16, 32], [0, 2], answer_weight=0.0)
    assert set(masses) == {(0, 16), (0, 32), (2, 16), (2, 32)}
    assert masses[(0, 16)].shape == (2, 16) and (masses[(0, 16)] >= 0).all()
    assert tiny_llama.config._attn_implementation == "sdpa"
    tiny_llama.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            weights = tiny_llama(sequence, output_attentions=True).attentions[2][0]  # (4 heads, 40, 40)
    finally:
        tiny_llama.set_attn_implementation("sdpa")
    by_hand = weights.view(2, 2, 40, 40).mean(dim=1)[:, 16:33, :16].mean(dim=1)  # prompt queries 16 .. 32
    torch.testing.assert_close(masses[(2, 16)], by_hand)
    answer_only = future_attention(tiny_llama, sequence, 34, [32], [2], answer_weight=1.0)[(2, 32)]
    answer = weights.view(2, 2, 40, 40).mean(dim=1)[:, 33:39, :32].mean(dim=1)
    torch.testing.assert_close(answer_only - masses[(2, 32)], answer, atol=1e-6, rtol=1e-5)


def test_recorder_sees_every_step_and_keeps_everything(tiny_llama):
    config = NammConfig(update_every=16)
    recorder = FeatureRecorder(config)
    runner = EvictingRunner(CausalLMAdapter(), tiny_llama, recorder,
                            RunnerConfig(chunk_size=8, cache=CacheConfig(update_every=16)))
    torch.manual_seed(1)
    scored = runner.score_continuation(torch.randint(0, 128, (1, 40)), torch.randint(0, 128, (1, 8)))
    assert [(r.layer, r.tokens_seen) for r in recorder.records] == [(l, t) for t in (16, 32, 48) for l in range(3)]
    assert all(record.kept == record.slots_before for record in scored.retention)  # nothing evicted
    stats = recorder.accumulator.freeze()
    record = recorder.records[-1]
    features = recorded_features(record, stats, config)
    assert features.shape == (2, 48, config.feature_dim) and torch.isfinite(features).all()
    assert torch.equal(record.arrival[0], torch.arange(48))


def synthetic_examples(count: int, seed: int, config: NammConfig) -> list[Example]:
    """Examples whose oracle keeps the slots with a positive feature 10: a rule the BAM can learn."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        features = torch.randn(2, 24, config.feature_dim, generator=generator)
        valid = torch.ones(2, 24, dtype=torch.bool)
        trained = valid.clone()
        trained[:, -1] = False
        examples.append(Example(features, valid, features[..., 10] > 0.3, trained))
    return examples


def test_fit_lowers_the_loss_and_follows_the_oracle_better():
    config, fit = NammConfig(), FitConfig(epochs=40, learning_rate=1e-2, batch_examples=8)
    train, held = synthetic_examples(32, 0, config), synthetic_examples(16, 1, config)
    before = evaluate(initial_params(config, fit), held, config, fit)
    params, history = fit_scorer(train, config, fit)
    after = evaluate(params, held, config, fit)
    assert history[-1]["train_loss"] < history[0]["train_loss"] and after["loss"] < before["loss"]
    f1 = lambda r: 2 * r["precision"] * r["recall"] / (r["precision"] + r["recall"])  # noqa: E731
    assert f1(after) > f1(before) + 0.2 and f1(after) > 0.8


def test_make_examples_leaves_protected_and_newest_slots_out_of_the_loss(tiny_llama):
    config = NammConfig(update_every=16, protect_sink=2, protect_prompt_tail=4)
    recorder = FeatureRecorder(config)
    runner = EvictingRunner(CausalLMAdapter(), tiny_llama, recorder,
                            RunnerConfig(chunk_size=8, cache=CacheConfig(update_every=16)))
    sequence = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    runner.score_continuation(sequence[:, :30], sequence[:, 30:])
    masses = future_attention(tiny_llama, sequence, 30, [16, 32], [0, 1, 2], answer_weight=1.0)
    examples = make_examples(recorder.records, masses, recorder.accumulator.freeze(), config, 30, KeepTarget())
    assert len(examples) == 6  # steps at 16 and 32 have later queries; none at 48 (the sequence ends at 40)
    late = examples[-1]  # step at 32: slots 0-1 are sinks, 26-29 the prompt tail, 31 the newest
    assert late.trained[0].nonzero().flatten().tolist() == [*range(2, 26), 30]


def test_fit_learns_a_recency_window_from_recorded_features(tiny_llama):
    """The NAMM's age embedding (namm-spec §2.5) lets the scorer learn "keep the newest tokens"."""
    config = NammConfig(update_every=16, protect_sink=0, protect_prompt_tail=0)
    target = KeepTarget(kind="recency", recency_window=12)
    examples = []
    for seed in range(3):
        recorder = FeatureRecorder(config)
        runner = EvictingRunner(CausalLMAdapter(), tiny_llama, recorder,
                                RunnerConfig(chunk_size=8, cache=CacheConfig(update_every=16)))
        sequence = torch.randint(0, 128, (1, 72), generator=torch.Generator().manual_seed(seed))
        runner.score_continuation(sequence[:, :64], sequence[:, 64:])
        masses = future_attention(tiny_llama, sequence, 64, [16, 32, 48, 64], [0, 1, 2], answer_weight=1.0)
        examples += make_examples(recorder.records, masses, recorder.accumulator.freeze(), config, 64, target)
    for example in examples:  # the label is the age rule, whatever the attention
        age = example.features.shape[1] - 1 - torch.arange(example.features.shape[1])
        assert torch.equal(example.target, (age < 12).expand_as(example.target))
    fit = FitConfig(epochs=60, learning_rate=1e-2, batch_examples=4)
    before = evaluate(initial_params(config, fit), examples, config, fit)
    params, _ = fit_scorer(examples, config, fit)
    after = evaluate(params, examples, config, fit)
    assert after["loss"] < before["loss"]
    assert after["precision"] > 0.9 and after["recall"] > 0.9 and after["precision"] > before["precision"] + 0.3

"""Evolution hygiene (issue 8): the mean validated every N generations with the best one kept and exported, the
signal measure of a generation's fitness, and a run started from a given mean (a warm start)."""

from __future__ import annotations

import numpy as np
import pytest

from namm_transfer.evolve.__main__ import export
from namm_transfer.evolve.loop import FitnessResult, Stage, evolve
from namm_transfer.evolve.signal import fitness_signal
from namm_transfer.evolve.state import BEST_DIR, best_validation, namm_mean_saver, read_log, read_validation, resume
from namm_transfer.evolve.strategy import CmaEs, EvolutionConfig
from namm_transfer.namm.checkpoint import load_namm
from namm_transfer.namm.config import NammConfig

NAMM = NammConfig(n_fft=4, hop=2, recency_dim=2, hidden_dim=1)  # 44 parameters
CONFIG = EvolutionConfig(num_params=NAMM.num_params, population_size=4, sigma0=0.1, seed=3)
STATISTICS = {"norm_mean": np.arange(3.0), "norm_var": np.ones(3)}


def fitness(members, generation, stage, statistics):
    return FitnessResult(-(members**2).sum(axis=1))


def test_best_validated_mean_is_kept_and_exported(tmp_path):
    scripted = {0: 0.1, 2: 0.7, 4: 0.3, 5: 0.2}  # validation fitness by completed generations
    seen_means = {}

    def validate(mean, statistics):
        completed = len(seen_means)
        completed = sorted(scripted)[completed]
        seen_means[completed] = mean.copy()
        return {"fitness": scripted[completed], "dense": -scripted[completed], "kv_retained": 0.5}

    run = tmp_path / "run"
    evolve(fitness, CONFIG, run, [Stage("s", ["passkey"], 5)], estimate_statistics=lambda: STATISTICS,
           save_mean=namm_mean_saver(NAMM, {"seed": 3}), progress=False, validate=validate, validate_every=2)
    assert [r["generations"] for r in read_validation(run)] == [0, 2, 4, 5]  # before gen 0, every 2, the last
    assert best_validation(run)["generations"] == 2
    best = load_namm(run / BEST_DIR)
    assert np.array_equal(best.params.numpy(), seen_means[2].astype(np.float32))
    assert best.provenance["generations"] == 2
    assert not np.array_equal(best.params.numpy(), resume(run).strategy.mean.astype(np.float32))

    exported = load_namm(export(run, tmp_path / "exported", {"command": "test"}, NAMM))
    assert np.array_equal(exported.params.numpy(), best.params.numpy())
    assert "after 2 generations" in exported.provenance["exported"]
    assert [r["generations"] for r in exported.provenance["validation_history"]] == [0, 2, 4, 5]

    # a resumed run validates only what is new
    evolve(fitness, CONFIG, run, [Stage("s", ["passkey"], 5)], progress=False, validate=validate, validate_every=2)
    assert len(read_validation(run)) == 4


def test_a_validation_without_finite_fitness_is_refused(tmp_path):
    with pytest.raises(ValueError, match="finite 'fitness'"):
        evolve(fitness, CONFIG, tmp_path / "run", [Stage("s", ["t"], 1)], estimate_statistics=lambda: STATISTICS,
               progress=False, validate=lambda mean, stats: {"dense": 0.0})


def test_signal_measures_agreement_between_prompt_halves():
    members = np.linspace(0.0, 1.0, 8)
    same = fitness_signal(members, members + 0.01)
    assert same["rank_correlation"] == pytest.approx(1.0)
    assert same["member_spread"] == pytest.approx(np.std(members + 0.005))
    assert same["prompt_noise"] == pytest.approx(0.0, abs=1e-12)
    reversed_order = fitness_signal(members, -members)
    assert reversed_order["rank_correlation"] == pytest.approx(-1.0)
    assert np.isnan(fitness_signal(np.zeros(4), members[:4])["rank_correlation"])  # a half with no order
    with pytest.raises(ValueError, match="P >= 2"):
        fitness_signal(np.zeros(1), np.zeros(1))


def test_the_log_records_the_signal_when_the_fitness_gives_half_scores(tmp_path):
    def halves(members, generation, stage, statistics):
        score = -(members**2).sum(axis=1)
        return FitnessResult(score, {"half_a": score, "half_b": score + 0.1})

    evolve(halves, CONFIG, tmp_path / "run", [Stage("s", ["t"], 1)], progress=False)
    assert read_log(tmp_path / "run")[0]["signal"]["rank_correlation"] == pytest.approx(1.0)


def test_a_run_starts_from_the_given_mean(tmp_path):
    start = np.linspace(-1.0, 1.0, NAMM.num_params)
    assert np.array_equal(CmaEs(CONFIG, start).mean, start)
    with pytest.raises(ValueError, match="initial_mean"):
        CmaEs(CONFIG, start[:-1])
    first = []

    def record(members, generation, stage, statistics):
        first.append(members.mean(axis=0))
        return FitnessResult(-(members**2).sum(axis=1))

    evolve(record, CONFIG, tmp_path / "run", [Stage("s", ["t"], 1)], progress=False, initial_mean=start)
    assert np.abs(first[0] - start).max() < 0.5  # sampled around the given mean, not around zero
    assert np.abs(first[0]).mean() > 0.3


def test_a_time_limited_stop_validates_the_mean_it_leaves(tmp_path):
    calls = []

    def validate(mean, statistics):
        calls.append(mean.copy())
        return {"fitness": float(-np.abs(mean).sum())}

    run, stages = tmp_path / "run", [Stage("s", ["t"], 6)]
    evolve(fitness, CONFIG, run, stages, progress=False, validate=validate, validate_every=5,
           stop_after_seconds=1e-9)  # one generation, then out of time
    assert [r["generations"] for r in read_validation(run)] == [0, 1]
    assert np.array_equal(calls[-1], resume(run).strategy.mean)
    evolve(fitness, CONFIG, run, stages, progress=False, validate=validate, validate_every=5)
    assert [r["generations"] for r in read_validation(run)] == [0, 1, 5, 6]

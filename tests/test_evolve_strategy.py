"""CMA-ES wrapper (namm_transfer.evolve.strategy): namm-spec.md §5.1 on small toy problems."""

import pickle

import numpy as np
import pytest

from namm_transfer.evolve.strategy import CmaEs, EvolutionConfig

TARGET = np.linspace(-1.0, 1.0, 20)


def toy_fitness(population: np.ndarray) -> np.ndarray:
    """(P, 20) -> (P,) = -||x - target||^2, maximal (0) at the target."""
    return -((population - TARGET) ** 2).sum(axis=1)


def test_config_defaults_are_the_paper_settings():
    config = EvolutionConfig()
    assert (config.num_params, config.population_size, config.sigma0, config.mu) == (4172, 32, 0.065, 16)
    assert not config.diagonal and config.init_score == 0.0


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"population_size": 1}, "population_size"),
        ({"population_size": 3}, "population_size"),
        ({"sigma0": 0.0}, "sigma0"),
        ({"sigma0": float("nan")}, "sigma0"),
        ({"elite_ratio": 0.0}, "elite_ratio"),
        ({"elite_ratio": 1.5}, "elite_ratio"),
        ({"num_params": 1}, "num_params"),
        ({"init_score": float("inf")}, "init_score"),
        ({"seed": -1}, "seed"),
    ],
)
def test_config_rejects_bad_values(kwargs, word):
    with pytest.raises(ValueError, match=word):
        EvolutionConfig(**kwargs)


def test_mean_update_is_weighted_recombination_of_the_best_half():
    """§5.1 with λ = 32: w'_i = ln(33/2) - ln(i), the 16 positive ones normalised, c_m = 1, best first."""
    es = CmaEs(EvolutionConfig(num_params=20, population_size=32, seed=5))
    population = es.ask()
    fitness = toy_fitness(population)
    es.tell(population, fitness)
    raw = np.log(33 / 2) - np.log(np.arange(1, 17))
    weights = raw / raw.sum()
    spec = [0.1977, 0.1488, 0.1202, 0.0999, 0.0842, 0.0713, 0.0605, 0.0510,
            0.0427, 0.0353, 0.0286, 0.0225, 0.0168, 0.0116, 0.0067, 0.0022]
    np.testing.assert_allclose(weights, spec, atol=6e-5)
    best_first = population[np.argsort(-fitness, kind="stable")[:16]]
    np.testing.assert_allclose(es.mean, weights @ best_first, rtol=0, atol=1e-12)
    assert es.generation == 1


def test_initial_mean_is_the_score_initializer_and_population_is_centred_on_it():
    es = CmaEs(EvolutionConfig(num_params=20, population_size=8, init_score=0.25, sigma0=0.01))
    expected = np.zeros(20)
    expected[-1] = 0.25  # the read-out bias: every token scores 0.25
    assert np.array_equal(es.mean, expected)
    population = es.ask()
    assert population.shape == (8, 20) and population.dtype == np.float64
    assert np.abs(population - expected).max() < 0.1


@pytest.mark.parametrize("diagonal", [False, True])
def test_toy_fitness_improves_and_best_is_tracked(diagonal):
    es = CmaEs(EvolutionConfig(num_params=20, population_size=8, sigma0=0.3, seed=2, diagonal=diagonal))
    start = toy_fitness(es.mean[None])[0]
    best_seen, best_member = -np.inf, None
    for _ in range(60):
        population = es.ask()
        fitness = toy_fitness(population)
        es.tell(population, fitness)
        if fitness.max() > best_seen:
            best_seen, best_member = fitness.max(), population[fitness.argmax()]
    assert start == pytest.approx(-((TARGET) ** 2).sum())
    assert toy_fitness(es.mean[None])[0] > start / 50  # -7.4 -> better than -0.15
    member, value = es.best
    assert value == best_seen and np.array_equal(member, best_member)
    assert es.sigma < 0.3 and es.generation == 60


def test_best_is_none_before_any_tell():
    assert CmaEs(EvolutionConfig(num_params=5, population_size=4)).best is None


def test_sampling_is_seeded_and_leaves_global_numpy_rng_alone():
    config = EvolutionConfig(num_params=20, population_size=8, seed=11)
    before = np.random.get_state()[1].copy()
    first, second = CmaEs(config).ask(), CmaEs(config).ask()
    assert np.array_equal(np.random.get_state()[1], before)
    assert np.array_equal(first, second)
    other = CmaEs(EvolutionConfig(num_params=20, population_size=8, seed=12)).ask()
    assert not np.array_equal(first, other)


def test_pickle_round_trip_continues_bit_identically():
    es = CmaEs(EvolutionConfig(num_params=20, population_size=8, seed=3))
    for _ in range(3):
        population = es.ask()
        es.tell(population, toy_fitness(population))
    copy = pickle.loads(pickle.dumps(es))
    for _ in range(3):
        a, b = es.ask(), copy.ask()
        assert np.array_equal(a, b)
        es.tell(a, toy_fitness(a))
        copy.tell(b, toy_fitness(b))
    assert np.array_equal(es.mean, copy.mean) and es.sigma == copy.sigma


def test_diagonal_state_is_linear_in_n_and_full_state_is_quadratic():
    n = 300
    full = len(pickle.dumps(CmaEs(EvolutionConfig(num_params=n, population_size=8))))
    diagonal = len(pickle.dumps(CmaEs(EvolutionConfig(num_params=n, population_size=8, diagonal=True))))
    assert full > 2 * n * n * 8  # C and B, float64
    assert diagonal < n * n * 8 / 10


def test_tell_rejects_bad_shapes_and_non_finite_fitness():
    es = CmaEs(EvolutionConfig(num_params=6, population_size=4))
    population = es.ask()
    with pytest.raises(ValueError, match="solutions have shape"):
        es.tell(population[:3], np.zeros(3))
    with pytest.raises(ValueError, match="fitness has shape"):
        es.tell(population, np.zeros(5))
    with pytest.raises(ValueError, match="finite"):
        es.tell(population, np.array([0.0, np.nan, 1.0, 2.0]))
    assert es.generation == 0


def test_generations_of_equal_fitness_do_not_stop_the_search():
    # a NAMM population often scores all-equal (every member answers, or none does); cma must keep going
    es = CmaEs(EvolutionConfig(num_params=100, population_size=4, diagonal=True, seed=3))
    for _ in range(4):
        es.tell(es.ask(), np.zeros(4))
    assert es.generation == 4 and np.isfinite(es.mean).all()

"""CMA-ES over the flat NAMM parameter vector: a thin ask/tell wrapper around the ``cma`` package.

namm-spec.md §5.1: population λ = 32, μ = λ/2 (elite ratio 0.5, log-linear recombination weights with
active negative weights), σ0 = 0.065, c_m = 1, mean initialised at 0, C0 = I, and the CMA-ES **mean** (not
the best sample) is "the model" (``prefer_mean_to_best: true``). ``cma`` (Hansen's reference
implementation) computes the same default constants as the official code (c1 = 1.148e-7 for n = 4172,
λ = 32; its cμ = 8.65e-7 differs from the spec's 8.37e-7 by its α_cov convention). Two differences from the
official code, both documented choices of ``cma``: the covariance is eigendecomposed lazily (every
``1 / (c1 + cμ) / n / 10`` generations, about 24 at λ = 32 and 93 at λ = 8, instead of every generation),
and the generation-0 jitter of 1e-6 on every entry of C is not applied.

Fitness is **maximised** (higher = better, as in namm-spec §5.2). ``cma`` minimises, so :meth:`CmaEs.tell`
hands it the negated fitness and :attr:`CmaEs.best` negates back.

Full covariance versus ``diagonal`` (sep-CMA-ES, ``cma``'s ``CMA_diagonal``), measured at n = 4172 on the
project's 2-core CPU (numpy 2.4, cma 4.5):

* full: tell 0.2-0.5 s (λ = 8 to 32); ask 0.05-0.1 s, plus one 4172² eigendecomposition of 7-15 s inside
  ``ask`` every ~24 (λ = 32) or ~93 (λ = 8) generations, i.e. < 1 s per generation on average; the pickled
  state (C and B, 4172² float64 each) is 270 MB, checkpointed in about 0.8 s. This is the spec's algorithm
  and :class:`EvolutionConfig`'s default (``diagonal=False``).
* diagonal: ask and tell < 0.01 s, pickled state 1-4 MB; learning rates are raised by (n + 1.5) / 3, so
  per-coordinate step sizes adapt much faster, but no correlation between parameters is learnt. The program
  ``python -m namm_transfer.evolve`` defaults to it (``--full-covariance`` switches to the full one): with the
  few generations a CPU affords, the full covariance barely moves (c1 + cμ ≈ 1e-6 per generation).

Randomness: every normal sample comes from a private ``numpy.random.Generator`` seeded with
``EvolutionConfig.seed`` and stored inside the pickled strategy, so pickling then unpickling gives
bit-identical later populations, and the global ``numpy.random`` state is never read nor seeded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cma
import numpy as np


@dataclass(frozen=True)
class EvolutionConfig:
    """Settings of the CMA-ES run (namm-spec.md §5.1, §8).

    Attributes:
        num_params: length n of the parameter vector (4172 for the default NAMM, ``NammConfig.num_params``).
        population_size: λ, members per generation.
        sigma0: initial step size σ0.
        elite_ratio: μ = max(1, floor(λ · elite_ratio)) members get positive recombination weights
            (``cma`` option ``CMA_mu``).
        init_score: the score initializer (namm-spec §3.2, ``scoring_initializer``): m0 is zero except its
            last entry, the BAM read-out bias, which is ``init_score``; the initial mean therefore scores every
            token exactly ``init_score`` (0.0 in the paper: keep everything). field-notes §7 reports that a
            positive value helps threshold-mode NAMMs on small models, where a small perturbation of zero
            weights can evict almost every token.
        seed: seed of the private normal generator.
        diagonal: sep-CMA-ES (diagonal covariance) instead of full covariance; see the module docstring.
    """

    num_params: int = 4172
    population_size: int = 32
    sigma0: float = 0.065
    elite_ratio: float = 0.5
    init_score: float = 0.0
    seed: int = 1337
    diagonal: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.num_params < 2:
            problems.append(f"num_params must be >= 2 (cma has no 1-D CMA-ES), got {self.num_params}")
        if self.population_size < 4:
            # cma injects two mean-shift samples per generation (TPA step-size control); with fewer than 4
            # members a generation of equal fitness leaves injections unused and cma refuses to continue
            problems.append(f"population_size must be >= 4, got {self.population_size}")
        if not (math.isfinite(self.sigma0) and self.sigma0 > 0):
            problems.append(f"sigma0 must be a finite number > 0, got {self.sigma0}")
        if not 0.0 < self.elite_ratio <= 1.0:
            problems.append(f"elite_ratio must be in (0, 1], got {self.elite_ratio}")
        if not math.isfinite(self.init_score):
            problems.append(f"init_score must be finite, got {self.init_score}")
        if not 0 <= self.seed < 2**63:
            problems.append(f"seed must be in [0, 2**63), got {self.seed}")
        if problems:
            raise ValueError("invalid EvolutionConfig: " + "; ".join(problems))

    @property
    def mu(self) -> int:
        """Number of parents μ (16 for λ = 32)."""
        return max(1, int(self.population_size * self.elite_ratio))


class _StandardNormal:
    """``randn(*shape)`` callable for ``cma``'s ``randn`` option, drawing from a private Generator.

    A module-level class (not a lambda) so the strategy pickles, Generator state included.
    """

    def __init__(self, seed: int) -> None:
        self.generator = np.random.default_rng(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.generator.standard_normal(shape)


class CmaEs:
    """Ask/tell CMA-ES that maximises fitness. Picklable (``pickle.dumps``) with its full state.

    Shapes: P = ``config.population_size``, n = ``config.num_params``.
    """

    def __init__(self, config: EvolutionConfig, initial_mean: np.ndarray | None = None) -> None:
        """``initial_mean``: (n,) finite starting mean (e.g. a warm start); default zeros but the read-out bias,
        ``config.init_score``."""
        self.config = config
        options = {
            "popsize": config.population_size,
            "CMA_mu": config.mu,
            "CMA_diagonal": config.diagonal,
            "randn": _StandardNormal(config.seed),
            "seed": math.nan,  # nan: cma neither seeds nor reads the global numpy RNG
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,  # no outcmaes/ files
        }
        if initial_mean is None:
            x0 = np.zeros(config.num_params, dtype=np.float64)
            x0[-1] = config.init_score
        else:
            x0 = np.array(initial_mean, dtype=np.float64)
            if x0.shape != (config.num_params,) or not np.isfinite(x0).all():
                raise ValueError(f"initial_mean must be ({config.num_params},) finite values, got shape {x0.shape}")
        self._es = cma.CMAEvolutionStrategy(x0, config.sigma0, options)

    def ask(self) -> np.ndarray:
        """Sample the next population: (P, n) float64, one member per row."""
        return np.stack(self._es.ask()).astype(np.float64, copy=False)

    def tell(self, solutions: np.ndarray, fitness: np.ndarray) -> None:
        """Update the distribution with the members of the last :meth:`ask` and their fitness.

        Args:
            solutions: (P, n) the population as returned by :meth:`ask`.
            fitness: (P,) finite values, higher is better (negated before ``cma``, which minimises).
        """
        solutions = np.asarray(solutions, dtype=np.float64)
        fitness = np.asarray(fitness, dtype=np.float64)
        expected = (self.config.population_size, self.config.num_params)
        if solutions.shape != expected:
            raise ValueError(f"solutions have shape {solutions.shape}, expected {expected}")
        if fitness.shape != (self.config.population_size,):
            raise ValueError(f"fitness has shape {fitness.shape}, expected ({self.config.population_size},)")
        if not np.isfinite(fitness).all():
            raise ValueError(f"fitness must be finite, got non-finite values at members {np.flatnonzero(~np.isfinite(fitness)).tolist()}")
        self._es.tell(list(solutions), (-fitness).tolist())

    @property
    def mean(self) -> np.ndarray:
        """(n,) the CMA-ES mean m: the parameters evaluated and saved as the model (§5.1)."""
        return np.array(self._es.mean, dtype=np.float64, copy=True)

    @property
    def best(self) -> tuple[np.ndarray, float] | None:
        """Best-ever member (n,) and its fitness; None before the first :meth:`tell`."""
        if self._es.best.x is None:
            return None
        return np.array(self._es.best.x, dtype=np.float64, copy=True), -float(self._es.best.f)

    @property
    def sigma(self) -> float:
        """Current overall step size σ."""
        return float(self._es.sigma)

    @property
    def generation(self) -> int:
        """Number of completed generations (tells)."""
        return int(self._es.countiter)

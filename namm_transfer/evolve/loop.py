"""The evolution loop: incremental stages, frozen normalisation, checkpoint and resume, ranks.

docs/algorithm.md §5.3: stages run one after another on **one** CMA-ES whose whole state (m, C, σ, paths,
counter) carries across stage boundaries, and the generation counter is shared by all stages: stage s runs
generations ``sum(g_0..g_{s-1})`` to ``sum(g_0..g_s) - 1``. §5.6: normalisation statistics are estimated
once, before generation 0 of stage 0, and frozen. Unlike the official code, stages chain through the latest
state, not a best-evaluation checkpoint. §5.4 evaluates the mean every 10 generations: given a ``validate``
function, the mean is validated when a run starts or resumes, every ``validate_every`` generations, after the last and
when a time limit stops the run, each result appended to ``validation.jsonl``, and the best validated mean kept in ``best/``
(:mod:`namm_transfer.evolve.state`).

:func:`evolve` checkpoints after every generation (:mod:`namm_transfer.evolve.state`); calling it again on
the same ``run_dir`` skips the completed generations and continues bit-identically. A rerun may append
stages or lengthen the current one, since the stage of every completed generation must stay the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from namm_transfer.evolve.distributed import World
from namm_transfer.evolve.state import (
    CheckpointError,
    MeanSaver,
    RunState,
    append_log,
    append_validation,
    generation_record,
    resume,
    save_state,
    trim_log,
    validated_generations,
)
from namm_transfer.evolve.strategy import CmaEs, EvolutionConfig


@dataclass(frozen=True)
class Stage:
    """One incremental stage (docs/algorithm.md §5.3).

    Attributes:
        name: label written to the log.
        tasks: task identifiers handed to the fitness function (opaque here).
        generations: number of CMA-ES generations of this stage (>= 1).
    """

    name: str
    tasks: tuple[str, ...]
    generations: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if not self.name:
            raise ValueError("Stage name must be a non-empty string")
        if self.generations < 1:
            raise ValueError(f"Stage {self.name!r}: generations must be >= 1, got {self.generations}")


@dataclass
class FitnessResult:
    """Fitness of K population members (K = the members handed to the fitness function).

    Attributes:
        fitness: (K,) finite float, higher is better.
        extra: name -> (K,) per-member metrics to log (e.g. retained KV fraction); the same names on
            every call and every rank.
    """

    fitness: np.ndarray
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fitness = np.asarray(self.fitness, dtype=np.float64)
        if self.fitness.ndim != 1:
            raise ValueError(f"FitnessResult.fitness must be 1-D, got shape {self.fitness.shape}")
        if not np.isfinite(self.fitness).all():
            raise ValueError("FitnessResult.fitness has non-finite values")
        self.extra = {name: np.asarray(values, dtype=np.float64) for name, values in self.extra.items()}
        for name, values in self.extra.items():
            if values.shape != self.fitness.shape:
                raise ValueError(f"FitnessResult.extra[{name!r}] has shape {values.shape}, expected {self.fitness.shape}")


ValidateFn = Callable[[np.ndarray, "dict[str, np.ndarray] | None"], dict]
"""``validate(mean (n,), statistics) -> {"fitness": float, ...}``: higher is better; every other key is logged."""

FitnessFn = Callable[[np.ndarray, int, Stage, "dict[str, np.ndarray] | None"], FitnessResult]
"""``fitness_fn(members (K, n) float64, generation, stage, statistics) -> FitnessResult`` of K members.

Every rank calls it on its own contiguous slice of the population. For a bit-identical resume it must be
a deterministic function of its arguments (e.g. draw the generation's prompts from a seed and
``generation``), and every rank must draw the same prompts (docs/algorithm.md §5.2: one prompt set per generation).
"""


def _stage_of(stages: list[Stage], generation: int) -> int:
    ends = np.cumsum([stage.generations for stage in stages])
    return int(np.searchsorted(ends, generation, side="right"))


def _start_state(
    config: EvolutionConfig, run_dir: Path, stages: list[Stage], total: int,
    estimate_statistics: Callable[[], dict] | None, save_mean: MeanSaver | None, initial_mean: np.ndarray | None,
) -> RunState:
    """Rank 0: the state to continue from (a fresh one or the checkpoint), statistics estimated if due."""
    run_dir.mkdir(parents=True, exist_ok=True)
    state = resume(run_dir)
    if state is None:
        state = RunState(CmaEs(config, initial_mean))
    else:
        if state.strategy.config != config:
            raise CheckpointError(
                f"{run_dir} was started with {state.strategy.config}, not the requested {config}"
            )
        done = state.generation
        if done > total:
            raise CheckpointError(f"{run_dir} already has {done} generations, more than the {total} the stages ask for")
        if done > 0 and _stage_of(stages, done - 1) != state.stage_index:
            raise CheckpointError(
                f"{run_dir}: generation {done - 1} ran in stage {state.stage_index}, but the given stages put it "
                f"in stage {_stage_of(stages, done - 1)}"
            )
        trim_log(run_dir, done)
    if state.statistics is None and estimate_statistics is not None:
        if state.generation > 0:
            raise CheckpointError(
                f"{run_dir} ran {state.generation} generations without normalisation statistics; they cannot be added now"
            )
        statistics = estimate_statistics()
        if not isinstance(statistics, dict):
            raise ValueError(f"estimate_statistics must return a dict of arrays, got {type(statistics).__name__}")
        state.statistics = {name: np.asarray(value) for name, value in statistics.items()}
        save_state(run_dir, state, save_mean)  # frozen from here on, even if killed before generation 0 ends
    return state


def evolve(
    fitness_fn: FitnessFn,
    config: EvolutionConfig,
    run_dir: str | Path,
    stages: list[Stage],
    *,
    estimate_statistics: Callable[[], dict] | None = None,
    save_mean: MeanSaver | None = None,
    world: World | None = None,
    progress: bool = True,
    stop_after_seconds: float | None = None,
    initial_mean: np.ndarray | None = None,
    validate: ValidateFn | None = None,
    validate_every: int = 10,
) -> RunState | None:
    """Run (or continue) CMA-ES over ``stages``, checkpointing into ``run_dir`` after every generation.

    Args:
        fitness_fn: see :data:`FitnessFn`.
        config: the CMA-ES settings; must equal the checkpoint's when ``run_dir`` is resumed.
        run_dir: the run folder (only rank 0 reads or writes it).
        stages: the incremental stages, in order.
        estimate_statistics: called once on rank 0 before generation 0 of a fresh run; its dict (e.g.
            ``{"norm_mean": (17,), "norm_var": (17,)}``) is stored, frozen, and given to every later
            ``fitness_fn`` call on every rank, also after a resume. None = no statistics.
        save_mean: writes the mean as a model file each generation (:func:`~namm_transfer.evolve.state.namm_mean_saver`).
        world: the ranks; default :meth:`World.from_env`.
        progress: show a tqdm bar over generations (rank 0).
        stop_after_seconds: stop cleanly after the first generation that ends this long after the call
            began (the run resumes later from its checkpoint); None = run every generation of ``stages``.
        initial_mean: (n,) the CMA-ES mean of a fresh run (e.g. a warm start); default: zeros but the read-out
            bias, ``config.init_score``. Ignored when the run resumes.
        validate: see :data:`ValidateFn` (rank 0 only); None = no validation.
        validate_every: generations between validations.

    Returns:
        The final :class:`RunState` on rank 0, None on other ranks.
    """
    stages = list(stages)
    if not stages:
        raise ValueError("evolve needs at least one Stage")
    run_dir = Path(run_dir)
    world = world or World.from_env()
    population_size, num_params = config.population_size, config.num_params
    members = world.member_slice(population_size)
    total = sum(stage.generations for stage in stages)

    if validate_every < 1:
        raise ValueError(f"validate_every must be >= 1, got {validate_every}")
    state = (_start_state(config, run_dir, stages, total, estimate_statistics, save_mean, initial_mean)
             if world.is_main else None)
    start, statistics = world.broadcast_object((state.generation, state.statistics) if world.is_main else None)

    def validate_if_due(completed: int, due: bool) -> None:  # rank 0: the mean after ``completed`` generations
        due = due or completed % validate_every == 0 or completed == total
        if validate is not None and due and completed not in validated_generations(run_dir):
            append_validation(run_dir, completed, validate(state.strategy.mean, statistics), state, save_mean)

    if world.is_main:
        validate_if_due(start, due=True)  # the mean a run starts or resumes from

    bar = tqdm(total=total, initial=start, unit="gen", desc="evolve", disable=not (progress and world.is_main))
    called = time.perf_counter()
    try:
        for generation in range(start, total):
            if stop_after_seconds is not None and generation > start:
                out_of_time = time.perf_counter() - called >= stop_after_seconds
                if world.broadcast_object(out_of_time if world.is_main else None):
                    if world.is_main:
                        validate_if_due(generation, due=True)  # the mean a stopped run leaves
                    break
            began = time.perf_counter()
            stage_index = _stage_of(stages, generation)
            stage = stages[stage_index]
            population = world.broadcast_population(
                state.strategy.ask() if world.is_main else None, (population_size, num_params)
            )
            result = fitness_fn(population[members], generation, stage, statistics)
            if not isinstance(result, FitnessResult) or result.fitness.shape != (members.stop - members.start,):
                raise ValueError(
                    f"fitness_fn must return a FitnessResult of {members.stop - members.start} members, got {result!r:.200}"
                )
            fitness = world.gather_members(result.fitness, population_size)
            extra = {name: world.gather_members(result.extra[name], population_size) for name in sorted(result.extra)}
            if world.is_main:
                state.strategy.tell(population, fitness)
                state.stage_index = stage_index
                record = generation_record(generation, stage_index, stage.name, fitness, extra, state.strategy,
                                           time.perf_counter() - began)
                append_log(run_dir, record)
                save_state(run_dir, state, save_mean)
                validate_if_due(generation + 1, due=False)
                bar.set_postfix(stage=stage.name, best=f"{fitness.max():.4g}", sigma=f"{state.strategy.sigma:.3g}")
            bar.update(1)
    finally:
        bar.close()
    return state

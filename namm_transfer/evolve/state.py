"""The run folder of an evolution: checkpoint every generation, resume bit-identically, JSONL log.

Layout of ``run_dir`` (docs/algorithm.md §5.4 keeps the same information in ``latest.pt`` + ``rng_ckpt.pt``):

* ``es_state.pkl``: pickle of ``{"format_version", "strategy", "stage_index", "statistics"}``. The
  :class:`~namm_transfer.evolve.strategy.CmaEs` pickles the whole ``cma`` object (mean, C, B, D, σ, paths,
  iteration counter, best-ever) together with its private normal generator, so the next population asked
  after :func:`resume` is bit-identical to an uninterrupted run. ``statistics`` is the frozen
  normalisation result (e.g. ``{"norm_mean": (17,), "norm_var": (17,)}``, docs/algorithm.md §5.6) or None.
  About 280 MB at n = 4172 with full covariance, 1-4 MB with the diagonal one.
* ``weights/gen-<k>-<suffix>/``: the CMA-ES mean after k completed generations (the mean around which
  generation k is sampled), written by a :data:`MeanSaver` (:func:`namm_mean_saver` writes a NAMM file);
  ``mean`` is a symlink to the newest one. Older folders are removed.
* ``log.jsonl``: one JSON object per generation (see :func:`generation_record`).
* ``validation.jsonl``: one JSON object per validation of the mean (``generations`` completed before it, the
  validation's ``fitness`` and metrics; :func:`append_validation`), and ``best/`` the best validated mean,
  written by the same :data:`MeanSaver`; the export takes it (namm-spec §5.4 evaluates every 10 generations).

Writes are atomic: files are written under a temporary name and moved with ``os.replace``; the weights
folder gets a fresh unique name and the ``mean`` symlink is swapped with ``os.replace``. A process killed
at any point leaves the last committed ``es_state.pkl`` intact. The log line of a generation is appended
before its state is committed; :func:`trim_log` drops lines of uncommitted generations (and a cut last
line, with a warning naming the file) when a run resumes.

Pickles run code when loaded: resume only run folders you wrote yourself.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from namm_transfer.atomic import atomic_write
from namm_transfer.evolve.signal import fitness_signal
from namm_transfer.evolve.strategy import CmaEs
from namm_transfer.jsonl import JsonlFile
from namm_transfer.namm.checkpoint import save_namm
from namm_transfer.namm.config import NammConfig

FORMAT_VERSION = 1
STATE_NAME = "es_state.pkl"
LOG_NAME = "log.jsonl"
MEAN_LINK = "mean"
WEIGHTS_DIR = "weights"
VALIDATION_NAME = "validation.jsonl"
BEST_DIR = "best"

MeanSaver = Callable[[Path, np.ndarray, "dict[str, np.ndarray] | None", int], None]
"""``save(folder, mean (n,), statistics, completed_generations)``: writes the mean into a new ``folder``."""


class CheckpointError(ValueError):
    """A run folder that cannot be resumed (unreadable, wrong format, or not matching the run asked)."""


@dataclass
class RunState:
    """Everything needed to continue a run.

    Attributes:
        strategy: the CMA-ES, with its RNG and generation counter.
        stage_index: index of the stage of the last completed generation (0 before any).
        statistics: frozen normalisation statistics (name -> array), or None.
    """

    strategy: CmaEs
    stage_index: int = 0
    statistics: dict[str, np.ndarray] | None = None

    @property
    def generation(self) -> int:
        """Completed generations, counted across all stages (the shared counter of docs/algorithm.md §5.3)."""
        return self.strategy.generation


def save_state(run_dir: str | Path, state: RunState, save_mean: MeanSaver | None = None) -> None:
    """Checkpoint ``state`` into ``run_dir`` (created if needed): weights of the mean first, then the state.

    Args:
        run_dir: the run folder.
        state: what to save.
        save_mean: writes the mean as a model file (e.g. :func:`namm_mean_saver`); None writes no weights.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    keep = None
    if save_mean is not None:
        weights = run_dir / WEIGHTS_DIR
        weights.mkdir(exist_ok=True)
        keep = Path(tempfile.mkdtemp(prefix=f"gen-{state.generation:06d}-", dir=weights))
        keep.chmod(0o755)  # mkdtemp makes it private
        save_mean(keep, state.strategy.mean, state.statistics, state.generation)
        link_tmp = run_dir / f".{MEAN_LINK}.tmp-{os.getpid()}"
        link_tmp.unlink(missing_ok=True)
        os.symlink(Path(WEIGHTS_DIR) / keep.name, link_tmp)
        os.replace(link_tmp, run_dir / MEAN_LINK)
    payload = {
        "format_version": FORMAT_VERSION,
        "strategy": state.strategy,
        "stage_index": state.stage_index,
        "statistics": state.statistics,
    }
    atomic_write(run_dir / STATE_NAME, pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
    if keep is not None:
        for old in (run_dir / WEIGHTS_DIR).iterdir():
            if old != keep:
                shutil.rmtree(old)


def resume(run_dir: str | Path) -> RunState | None:
    """The last committed state of ``run_dir``, or None when it has no checkpoint yet.

    Raises CheckpointError when the checkpoint exists but cannot be read.
    """
    path = Path(run_dir) / STATE_NAME
    if not path.exists():
        return None
    try:
        with open(path, "rb") as handle:
            payload = pickle.load(handle)
    except Exception as error:  # any unpickling failure means the same thing to the caller
        raise CheckpointError(f"{path} is not a readable evolution checkpoint: {type(error).__name__}: {error}") from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        found = payload.get("format_version") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} has format version {found!r}, expected {FORMAT_VERSION}")
    if not isinstance(payload.get("strategy"), CmaEs):
        raise CheckpointError(f"{path} holds no CmaEs strategy")
    return RunState(payload["strategy"], payload["stage_index"], payload["statistics"])


def _stats(values: np.ndarray) -> dict[str, float]:
    return {"mean": float(values.mean()), "max": float(values.max()), "min": float(values.min()), "std": float(values.std())}


def generation_record(
    generation: int,
    stage_index: int,
    stage_name: str,
    fitness: np.ndarray,
    extra: dict[str, np.ndarray],
    strategy: CmaEs,
    wall_s: float,
) -> dict:
    """One log line: the generation just told to ``strategy``.

    Args:
        generation: 0-based index of the evaluated population (shared counter across stages).
        fitness: (P,) member fitness.
        extra: name -> (P,) per-member metrics (e.g. retained KV fraction); logged as mean/max/min/std. When it
            holds ``half_a`` and ``half_b`` (each member's score on two disjoint halves of the prompts), the
            record also gets their ``signal`` (:func:`namm_transfer.evolve.signal.fitness_signal`).
        strategy: the CMA-ES after the tell (σ and the mean's L2 norm are logged).
        wall_s: seconds spent on ask, fitness and tell (the checkpoint write comes after).
    """
    record = {
        "generation": generation,
        "stage_index": stage_index,
        "stage": stage_name,
        "fitness": _stats(fitness),
        "member_fitness": fitness.tolist(),
        "extra": {name: _stats(values) for name, values in sorted(extra.items())},
        "sigma": strategy.sigma,
        "mean_norm": float(np.linalg.norm(strategy.mean)),
        "wall_s": wall_s,
        "time": time.time(),
    }
    if "half_a" in extra and "half_b" in extra:
        record["signal"] = fitness_signal(extra["half_a"], extra["half_b"])
    return record


def _log(run_dir: str | Path) -> JsonlFile:
    return JsonlFile(Path(run_dir) / LOG_NAME, key="generation")


def append_log(run_dir: str | Path, record: dict) -> None:
    """Append one JSON line to ``run_dir/log.jsonl`` and flush it to disk."""
    _log(run_dir).append(record)


def read_log(run_dir: str | Path) -> list[dict]:
    """All complete log records of ``run_dir`` (a cut last line, left by a kill, is ignored with a warning
    naming the file; a damaged line before it raises a ValueError naming the file and the line)."""
    return _log(run_dir).records()


def trim_log(run_dir: str | Path, generations: int) -> None:
    """Keep only the log records of the first ``generations`` generations (atomic rewrite; a cut last line
    is dropped with a warning naming the file)."""
    log = _log(run_dir)
    if not log.path.exists():
        return
    log.rewrite(record for record in log.records() if record["generation"] < generations)


def namm_mean_saver(namm_config: NammConfig, provenance: dict) -> MeanSaver:
    """A :data:`MeanSaver` writing the mean as a NAMM file with
    :func:`namm_transfer.namm.checkpoint.save_namm`; needs statistics ``norm_mean`` and ``norm_var``.

    ``provenance`` gets ``generations`` (completed generations) added to it.
    """

    def save(folder: Path, mean: np.ndarray, statistics: dict[str, np.ndarray] | None, generations: int) -> None:
        missing = [key for key in ("norm_mean", "norm_var") if key not in (statistics or {})]
        if missing:
            raise ValueError(f"saving a NAMM needs normalisation statistics {missing}; pass estimate_statistics to evolve")
        save_namm(folder, mean, statistics["norm_mean"], statistics["norm_var"], namm_config,
                  {**provenance, "generations": generations})

    return save


def _validation_log(run_dir: str | Path) -> JsonlFile:
    return JsonlFile(Path(run_dir) / VALIDATION_NAME, key="generations")


def read_validation(run_dir: str | Path) -> list[dict]:
    """Every validation record of ``run_dir`` in order (empty when the run validates nothing)."""
    return _validation_log(run_dir).records()


def validated_generations(run_dir: str | Path) -> set[int]:
    """The completed-generation counts whose mean has been validated."""
    return {record["generations"] for record in read_validation(run_dir)}


def best_validation(run_dir: str | Path) -> dict | None:
    """The validation record with the highest fitness (the earliest among equals), or None."""
    records = read_validation(run_dir)
    return max(records, key=lambda r: (r["fitness"], -r["generations"])) if records else None


def append_validation(run_dir: str | Path, generations: int, result: dict, state: RunState,
                      save_mean: MeanSaver | None) -> None:
    """Log the validation of the mean after ``generations`` and, when it beats every earlier one, save that mean
    as ``best/`` (atomically: written beside it, then moved in place)."""
    if not isinstance(result, dict) or not np.isfinite(result.get("fitness", np.nan)):
        raise ValueError(f"validate must return a dict with a finite 'fitness', got {result!r:.200}")
    best = best_validation(run_dir)
    record = {"generations": generations, **result, "time": time.time()}
    if save_mean is not None and (best is None or result["fitness"] > best["fitness"]):
        run_dir = Path(run_dir)
        fresh = Path(tempfile.mkdtemp(prefix=f".{BEST_DIR}-", dir=run_dir))
        save_mean(fresh, state.strategy.mean, state.statistics, generations)
        old = run_dir / BEST_DIR
        if old.exists():
            retired = old.with_name(f".{BEST_DIR}-old-{os.getpid()}")
            os.replace(old, retired)
            shutil.rmtree(retired)
        os.replace(fresh, old)
    _validation_log(run_dir).append(record)

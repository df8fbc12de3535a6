"""The learning curve of an evolution run: what its log and validations say per generation, and its plot.

Issue 8 asks every evolution to show whether it learns: the population's fitness and retained KV by generation,
the validated mean's score and retention (namm-spec §5.4 evaluates the mean every 10 generations), and the signal
measure of each generation's fitness (:mod:`namm_transfer.evolve.signal`). :func:`learning_curve` reads them from
the run folder's records (:mod:`namm_transfer.evolve.state`); :func:`plot_learning_curve` draws them as
``learning_curve.png`` in three panels that share the generation axis. The evolution program draws it into its run
folder at the end of every call; ``python -m namm_transfer.evolve.learning_curve RUN_DIR`` draws it for any run
folder (e.g. the logs committed under ``docs/results/text-namm-training/``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from namm_transfer.cli import ArgumentParser, InputError, check_output_dir, check_readable_dir, run_program
from namm_transfer.evals.report import save_figure
from namm_transfer.evolve.state import LOG_NAME, read_log, read_validation

PLOT_NAME = "learning_curve.png"


@dataclass(frozen=True)
class LearningCurve:
    """Per-generation series of one run (lists of equal length within each group).

    Attributes:
        generations: 0-based index of each logged generation.
        fitness_mean, fitness_max: the population's mean and best fitness in that generation.
        kv_mean, kv_min, kv_max: the population's retained KV share (0-1) in that generation (None where the
            fitness logged no ``kv_retained``).
        signal_generations, rank_correlation: generations whose fitness logged a signal measure, and its rank
            correlation between the two halves of the prompts.
        validated_after: completed generations before each validation of the mean (0 = the starting mean).
        validation_fitness: the validation fitness of that mean (the dense score minus the memory penalty).
        validation_kv: its retained KV share (None where the validation logged none).
    """

    generations: list[int]
    fitness_mean: list[float]
    fitness_max: list[float]
    kv_mean: list[float | None]
    kv_min: list[float | None]
    kv_max: list[float | None]
    signal_generations: list[int]
    rank_correlation: list[float]
    validated_after: list[int]
    validation_fitness: list[float]
    validation_kv: list[float | None]


def learning_curve(log: Sequence[Mapping], validation: Sequence[Mapping] = ()) -> LearningCurve:
    """The series of a run from its ``log.jsonl`` records (:func:`~namm_transfer.evolve.state.generation_record`)
    and ``validation.jsonl`` records (:func:`~namm_transfer.evolve.state.append_validation`), in generation order."""
    log = sorted(log, key=lambda r: r["generation"])
    validation = sorted(validation, key=lambda r: r["generations"])
    kv = [r.get("extra", {}).get("kv_retained") for r in log]
    signalled = [r for r in log if r.get("signal") is not None]
    return LearningCurve(
        generations=[r["generation"] for r in log],
        fitness_mean=[r["fitness"]["mean"] for r in log],
        fitness_max=[r["fitness"]["max"] for r in log],
        kv_mean=[k["mean"] if k else None for k in kv],
        kv_min=[k["min"] if k else None for k in kv],
        kv_max=[k["max"] if k else None for k in kv],
        signal_generations=[r["generation"] for r in signalled],
        rank_correlation=[r["signal"]["rank_correlation"] for r in signalled],
        validated_after=[r["generations"] for r in validation],
        validation_fitness=[r["fitness"] for r in validation],
        validation_kv=[r.get("kv_retained") for r in validation],
    )


def _percent(values: Sequence[float | None]) -> list[float]:
    return [float("nan") if v is None else 100 * v for v in values]


def plot_learning_curve(curve: LearningCurve, path: str | Path, title: str | None = None) -> Path:
    """Three panels against the generation: fitness (population mean and best; the validated mean, plotted at the
    number of generations completed before it), retained KV % (population mean with its min-max band; the
    validated mean's) and the signal's rank correlation (a note in its panel when no generation logged one)."""
    if not curve.generations and not curve.validated_after:
        raise ValueError("plot_learning_curve needs at least one logged generation or validation")
    figure = Figure(figsize=(7, 8))
    fitness_axes, kv_axes, signal_axes = figure.subplots(3, 1, sharex=True)
    fitness_axes.plot(curve.generations, curve.fitness_mean, marker=".", label="population mean")
    fitness_axes.plot(curve.generations, curve.fitness_max, linestyle="--", label="population best")
    if curve.validated_after:
        fitness_axes.plot(curve.validated_after, curve.validation_fitness, marker="s", label="validated mean")
    fitness_axes.set_ylabel("fitness")
    kv_axes.plot(curve.generations, _percent(curve.kv_mean), marker=".", label="population mean")
    kv_axes.fill_between(curve.generations, _percent(curve.kv_min), _percent(curve.kv_max), alpha=0.2,
                         label="population min-max")
    if curve.validated_after:
        kv_axes.plot(curve.validated_after, _percent(curve.validation_kv), marker="s", label="validated mean")
    kv_axes.set_ylabel("retained KV (%)")
    signal_axes.plot(curve.signal_generations, curve.rank_correlation, marker="o", label="rank correlation")
    if not curve.signal_generations:
        signal_axes.text(0.5, 0.5, "no signal logged (it needs two or more prompts per generation)",
                         transform=signal_axes.transAxes, ha="center", fontsize=8)
    signal_axes.axhline(0.0, color="grey", linewidth=0.8)
    signal_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    signal_axes.set_ylim(-1.05, 1.05)
    signal_axes.set_ylabel("signal: rank corr.\nbetween prompt halves")
    signal_axes.set_xlabel("generation")
    for axes in (fitness_axes, kv_axes, signal_axes):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    if title:
        fitness_axes.set_title(title)
    return save_figure(figure, path, dpi=110)


def draw(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """Draw the learning curve of the run folder ``run_dir`` into ``path`` (default ``run_dir/learning_curve.png``)."""
    run_dir = Path(run_dir)
    return plot_learning_curve(learning_curve(read_log(run_dir), read_validation(run_dir)),
                               run_dir / PLOT_NAME if path is None else path, title=str(run_dir))


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m namm_transfer.evolve.learning_curve",
                       description="Draw the learning curve (fitness, retained KV and signal by generation; the "
                                   "validated mean's score and retention) of an evolution run folder.")
    p.add_argument("run_dir", help="a folder written by python -m namm_transfer.evolve (its log.jsonl)")
    p.add_argument("--out", default=None, help=f"PNG file to write (default: RUN_DIR/{PLOT_NAME})")
    args = p.parse_args(argv)
    run_dir = check_readable_dir(args.run_dir, "run folder")
    if not (run_dir / LOG_NAME).is_file():
        raise InputError(f"run folder {run_dir}: no {LOG_NAME}, so not an evolution run folder")
    out = Path(args.out) if args.out is not None else run_dir / PLOT_NAME
    if out.suffix.lower() != ".png":
        raise InputError(f"--out {out}: expected a .png file")
    check_output_dir(out.parent, "--out", 2**20)
    print(f"learning curve: {draw(run_dir, out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_program(main))

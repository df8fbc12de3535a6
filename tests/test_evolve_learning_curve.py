"""The learning curve of an evolution run (issue 8): the series read from its log and validations, and its plot."""

from __future__ import annotations

import json

import numpy as np
import pytest

from namm_transfer.cli import run_program
from namm_transfer.evolve import learning_curve as program
from namm_transfer.evolve.learning_curve import PLOT_NAME, learning_curve, plot_learning_curve
from namm_transfer.evolve.loop import FitnessResult, Stage, evolve
from namm_transfer.evolve.strategy import EvolutionConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def stats(mean, low, high):
    return {"mean": mean, "max": high, "min": low, "std": 0.0}


LOG = [  # written out of order, as a reader must not assume
    {"generation": 1, "fitness": stats(-0.5, -0.9, -0.2), "extra": {"kv_retained": stats(0.4, 0.3, 0.6)},
     "signal": {"rank_correlation": 0.75, "member_spread": 0.2, "prompt_noise": 0.1}},
    {"generation": 0, "fitness": stats(-1.0, -1.5, -0.7), "extra": {"kv_retained": stats(0.8, 0.5, 1.0)}},
    {"generation": 2, "fitness": stats(-0.25, -0.4, 0.1), "extra": {}},
]
VALIDATION = [{"generations": 3, "fitness": -0.3, "kv_retained": 0.35},
              {"generations": 0, "fitness": -1.2, "kv_retained": 0.9}]


def test_the_series_follow_the_log_and_validations_in_generation_order():
    curve = learning_curve(LOG, VALIDATION)
    assert curve.generations == [0, 1, 2]
    assert curve.fitness_mean == [-1.0, -0.5, -0.25] and curve.fitness_max == [-0.7, -0.2, 0.1]
    assert curve.kv_mean == [0.8, 0.4, None] and curve.kv_min == [0.5, 0.3, None] and curve.kv_max == [1.0, 0.6, None]
    assert curve.signal_generations == [1] and curve.rank_correlation == [0.75]
    assert curve.validated_after == [0, 3] and curve.validation_fitness == [-1.2, -0.3]
    assert curve.validation_kv == [0.9, 0.35]


def test_the_plot_is_written_with_or_without_validations_and_signal(tmp_path):
    with_all = plot_learning_curve(learning_curve(LOG, VALIDATION), tmp_path / "a" / PLOT_NAME, title="run")
    bare = plot_learning_curve(learning_curve(LOG[1:2]), tmp_path / "b.png")
    for path in (with_all, bare):
        assert path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="at least one"):
        plot_learning_curve(learning_curve([]), tmp_path / "c.png")


def test_the_program_draws_a_real_run_folder_and_refuses_other_folders(tmp_path, capsys):
    config = EvolutionConfig(num_params=6, population_size=4, sigma0=0.1, seed=1)
    run = tmp_path / "run"

    def fitness(members, generation, stage, statistics):
        return FitnessResult(-(members**2).sum(axis=1), {"kv_retained": np.full(len(members), 0.5)})

    evolve(fitness, config, run, [Stage("s", ["t"], 2)], progress=False,
           validate=lambda mean, statistics: {"fitness": float(-(mean**2).sum()), "kv_retained": 0.5},
           validate_every=1)
    assert run_program(program.main, [str(run)]) == 0
    assert (run / PLOT_NAME).read_bytes()[:8] == PNG_MAGIC
    assert f"learning curve: {run / PLOT_NAME}" in capsys.readouterr().out
    assert [json.loads(line)["generations"] for line in (run / "validation.jsonl").read_text().splitlines()] == [0, 1, 2]

    empty = tmp_path / "empty"
    empty.mkdir()
    for argv, message in (([str(empty)], "no log.jsonl"), ([str(tmp_path / "missing")], "no such folder"),
                          ([str(run), "--out", str(tmp_path / "curve.txt")], "expected a .png file")):
        assert run_program(program.main, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not (tmp_path / "curve.txt").exists() and list(empty.iterdir()) == []

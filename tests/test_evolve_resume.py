"""Run folder, checkpoint and resume (namm_transfer.evolve.state / loop): namm-spec.md §5.3, §5.4, §5.6.

Run as a script (``python test_evolve_resume.py RUN_DIR POP_DIR BLOCK_AT``) it is the process that the
kill test starts and SIGKILLs.
"""

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from namm_transfer.evolve.loop import FitnessResult, Stage, evolve
from namm_transfer.evolve.state import (
    MEAN_LINK,
    STATE_NAME,
    WEIGHTS_DIR,
    CheckpointError,
    namm_mean_saver,
    read_log,
    resume,
)
from namm_transfer.evolve.strategy import EvolutionConfig
from namm_transfer.namm.checkpoint import load_namm
from namm_transfer.namm.config import NammConfig

CONFIG = EvolutionConfig(num_params=12, population_size=6, sigma0=0.3, seed=7)
STAGES = [Stage("first", ["task_a"], 2), Stage("second", ["task_a", "task_b"], 2)]
STATISTICS = {"scale": np.array(0.5)}


class Recorder:
    """Toy fitness -||x - scale * target||^2 that saves every population it sees to ``pop_dir``; with
    ``block_at`` it announces and then sleeps forever (until killed) at that generation."""

    def __init__(self, pop_dir: Path, block_at: int = -1, fail_at: int = -1) -> None:
        self.pop_dir, self.block_at, self.fail_at = Path(pop_dir), block_at, fail_at
        self.pop_dir.mkdir(parents=True, exist_ok=True)
        self.calls = []

    def __call__(self, members, generation, stage, statistics):
        if generation == self.fail_at:
            raise RuntimeError("simulated crash")
        np.save(self.pop_dir / f"gen-{generation}.npy", members)
        self.calls.append((generation, stage.name, stage.tasks))
        if generation == self.block_at:
            (self.pop_dir / "blocked").touch()
            time.sleep(600)
        target = statistics["scale"] * np.linspace(-1.0, 1.0, members.shape[1])
        return FitnessResult(-((members - target) ** 2).sum(axis=1), {"kv_fraction": np.abs(members).mean(axis=1)})


class CountingHook:
    """estimate_statistics that appends one line to a file per call."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __call__(self):
        with open(self.path, "a") as handle:
            handle.write("called\n")
        return STATISTICS

    @property
    def calls(self) -> int:
        return len(self.path.read_text().splitlines()) if self.path.exists() else 0


def run(run_dir, pop_dir, hook_file, stages=STAGES, block_at=-1, fail_at=-1, save_mean=None, config=CONFIG):
    recorder = Recorder(pop_dir, block_at, fail_at)
    state = evolve(recorder, config, run_dir, stages, estimate_statistics=CountingHook(hook_file),
                   save_mean=save_mean, progress=False)
    return state, recorder


def populations(pop_dir, generations):
    return [np.load(Path(pop_dir) / f"gen-{g}.npy") for g in generations]


def test_sigkill_then_resume_asks_the_same_populations(tmp_path):
    reference, ref_recorder = run(tmp_path / "ref", tmp_path / "ref_pops", tmp_path / "ref_hook")
    assert [call[0] for call in ref_recorder.calls] == [0, 1, 2, 3]

    run_dir, hook = tmp_path / "run", tmp_path / "hook"
    child = subprocess.Popen(
        [sys.executable, __file__, str(run_dir), str(tmp_path / "killed_pops"), str(hook), "2"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        deadline = time.monotonic() + 25
        while not (tmp_path / "killed_pops" / "blocked").exists():
            assert child.poll() is None, "the child process exited early"
            assert time.monotonic() < deadline, "the child process never reached generation 2"
            time.sleep(0.05)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert resume(run_dir).generation == 2  # generations 0 and 1 were committed before the kill

    state, recorder = run(run_dir, tmp_path / "resumed_pops", hook)
    assert [call[0] for call in recorder.calls] == [2, 3]  # finished generations are skipped
    assert [call[1] for call in recorder.calls] == ["second", "second"]
    for got, want in zip(populations(tmp_path / "killed_pops", [0, 1, 2]), populations(tmp_path / "ref_pops", [0, 1, 2])):
        assert np.array_equal(got, want)
    for got, want in zip(populations(tmp_path / "resumed_pops", [2, 3]), populations(tmp_path / "ref_pops", [2, 3])):
        assert np.array_equal(got, want)
    assert np.array_equal(state.strategy.mean, reference.strategy.mean)
    assert state.statistics["scale"] == 0.5
    assert hook.read_text() == "called\n"  # the normalisation hook ran exactly once, before the kill
    log, ref_log = read_log(run_dir), read_log(tmp_path / "ref")
    assert [r["generation"] for r in log] == [0, 1, 2, 3]
    assert [r["member_fitness"] for r in log] == [r["member_fitness"] for r in ref_log]


def test_crash_in_fitness_then_resume_keeps_statistics_frozen(tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "run", tmp_path / "pops", tmp_path / "hook", fail_at=0)
    saved = resume(tmp_path / "run")
    assert saved.generation == 0 and saved.statistics == STATISTICS  # checkpointed right after estimating
    state, recorder = run(tmp_path / "run", tmp_path / "pops", tmp_path / "hook")
    assert CountingHook(tmp_path / "hook").calls == 1
    assert [call[0] for call in recorder.calls] == [0, 1, 2, 3]
    reference, _ = run(tmp_path / "ref", tmp_path / "ref_pops", tmp_path / "ref_hook")
    assert np.array_equal(state.strategy.mean, reference.strategy.mean)


def test_log_has_one_record_per_generation_with_stats(tmp_path):
    state, _ = run(tmp_path / "run", tmp_path / "pops", tmp_path / "hook")
    log = read_log(tmp_path / "run")
    assert [(r["generation"], r["stage_index"], r["stage"]) for r in log] == [
        (0, 0, "first"), (1, 0, "first"), (2, 1, "second"), (3, 1, "second")]
    for record in log:
        fitness = np.array(record["member_fitness"])
        pop = np.load(tmp_path / "pops" / f"gen-{record['generation']}.npy")
        assert fitness.shape == (6,)
        assert record["fitness"]["max"] == fitness.max() and record["fitness"]["min"] == fitness.min()
        assert record["fitness"]["mean"] == pytest.approx(fitness.mean())
        assert record["fitness"]["std"] == pytest.approx(fitness.std())
        assert record["extra"]["kv_fraction"]["mean"] == pytest.approx(np.abs(pop).mean())
        assert record["sigma"] > 0 and record["wall_s"] >= 0
    assert log[-1]["sigma"] == state.strategy.sigma
    assert log[-1]["mean_norm"] == pytest.approx(np.linalg.norm(state.strategy.mean))


def test_stage_boundary_keeps_the_whole_cma_state_and_stages_can_be_appended(tmp_path):
    one_stage = [Stage("only", ["task_a"], 4)]
    reference, _ = run(tmp_path / "ref", tmp_path / "ref_pops", tmp_path / "ref_hook", stages=one_stage)
    run(tmp_path / "run", tmp_path / "pops", tmp_path / "hook", stages=STAGES[:1])
    assert resume(tmp_path / "run").generation == 2
    state, recorder = run(tmp_path / "run", tmp_path / "pops", tmp_path / "hook", stages=STAGES)
    assert recorder.calls == [(2, "second", ("task_a", "task_b")), (3, "second", ("task_a", "task_b"))]
    for g in range(4):
        assert np.array_equal(np.load(tmp_path / "pops" / f"gen-{g}.npy"), np.load(tmp_path / "ref_pops" / f"gen-{g}.npy"))
    assert np.array_equal(state.strategy.mean, reference.strategy.mean)
    assert state.stage_index == 1 and state.generation == 4


def test_resume_refuses_a_different_run(tmp_path):
    run(tmp_path / "run", tmp_path / "pops", tmp_path / "hook")
    other = EvolutionConfig(num_params=12, population_size=8, sigma0=0.3, seed=7)
    with pytest.raises(CheckpointError, match="was started with"):
        run(tmp_path / "run", tmp_path / "pops", tmp_path / "hook", config=other)
    with pytest.raises(CheckpointError, match="more than the 3"):
        run(tmp_path / "run", tmp_path / "pops", tmp_path / "hook", stages=[Stage("first", ["a"], 3)])
    with pytest.raises(CheckpointError, match="ran in stage 1"):
        run(tmp_path / "run", tmp_path / "pops", tmp_path / "hook", stages=[Stage("first", ["a"], 4), Stage("x", ["b"], 1)])
    (tmp_path / "run" / STATE_NAME).write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="not a readable evolution checkpoint"):
        resume(tmp_path / "run")
    (tmp_path / "run" / STATE_NAME).write_bytes(pickle.dumps({"format_version": 99}))
    with pytest.raises(CheckpointError, match="format version 99"):
        resume(tmp_path / "run")


def test_partial_log_line_and_uncommitted_records_are_dropped_on_resume(tmp_path):
    run(tmp_path / "run", tmp_path / "pops", tmp_path / "hook", stages=STAGES[:1])
    log_path = tmp_path / "run" / "log.jsonl"
    uncommitted = log_path.read_text().splitlines()[-1].replace('"generation": 1', '"generation": 2')
    with open(log_path, "a") as handle:
        handle.write(uncommitted + "\n" + '{"generation": 3, "trunc')
    assert [r["generation"] for r in read_log(tmp_path / "run")] == [0, 1, 2]
    run(tmp_path / "run", tmp_path / "pops", tmp_path / "hook")
    assert [r["generation"] for r in read_log(tmp_path / "run")] == [0, 1, 2, 3]
    assert log_path.read_text().endswith("}\n")


def test_failed_weights_write_leaves_the_last_checkpoint_usable(tmp_path):
    namm_config = NammConfig(n_fft=4, hop=2, recency_dim=2, hidden_dim=1)  # 44 parameters
    config = EvolutionConfig(num_params=namm_config.num_params, population_size=4, sigma0=0.1, seed=1)
    good = namm_mean_saver(namm_config, {"seed": 1})
    statistics = {"norm_mean": np.arange(3.0), "norm_var": np.ones(3)}
    failed = []

    def flaky(folder, mean, stats, generations):
        if generations == 2 and not failed:
            failed.append(folder)
            (folder / "namm.safetensors").write_bytes(b"half a file")
            raise OSError("disk full")
        good(folder, mean, stats, generations)

    def fitness(members, generation, stage, stats):
        return FitnessResult(-(members**2).sum(axis=1))

    kwargs = dict(estimate_statistics=lambda: statistics, save_mean=flaky, progress=False)
    with pytest.raises(OSError, match="disk full"):
        evolve(fitness, config, tmp_path / "run", [Stage("s", ["t"], 3)], **kwargs)
    saved = resume(tmp_path / "run")
    assert saved.generation == 1
    weights = load_namm(tmp_path / "run" / MEAN_LINK)
    assert torch_equal(weights.params, saved.strategy.mean) and weights.provenance["generations"] == 1
    assert weights.norm_mean.tolist() == [0.0, 1.0, 2.0]

    state = evolve(fitness, config, tmp_path / "run", [Stage("s", ["t"], 3)], **kwargs)
    weights = load_namm(tmp_path / "run" / MEAN_LINK)
    assert torch_equal(weights.params, state.strategy.mean) and weights.provenance["generations"] == 3
    assert len(list((tmp_path / "run" / WEIGHTS_DIR).iterdir())) == 1  # the failed folder was cleaned up
    assert not failed[0].exists()


def test_namm_mean_saver_needs_statistics(tmp_path):
    save = namm_mean_saver(NammConfig(n_fft=4, hop=2, recency_dim=2, hidden_dim=1), {})
    with pytest.raises(ValueError, match="norm_var"):
        save(tmp_path / "w", np.zeros(44), {"norm_mean": np.zeros(3)}, 0)


def torch_equal(params, mean):
    return np.array_equal(params.numpy(), mean.astype(np.float32))


if __name__ == "__main__":
    run_dir, pop_dir, hook_file, block_at = sys.argv[1:]
    run(Path(run_dir), Path(pop_dir), Path(hook_file), block_at=int(block_at))


def test_time_limit_stops_after_a_whole_generation_and_the_run_resumes_identically(tmp_path):
    uninterrupted, _ = run(tmp_path / "a", tmp_path / "pa", tmp_path / "ha")
    recorder = Recorder(tmp_path / "pb")
    state = evolve(recorder, CONFIG, tmp_path / "b", STAGES, estimate_statistics=CountingHook(tmp_path / "hb"),
                   progress=False, stop_after_seconds=0.0)
    assert state.generation == 1 and len(read_log(tmp_path / "b")) == 1  # one generation, then out of time
    resumed, _ = run(tmp_path / "b", tmp_path / "pb", tmp_path / "hb")
    assert resumed.generation == 4
    assert np.array_equal(resumed.strategy.mean, uninterrupted.strategy.mean)

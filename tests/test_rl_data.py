"""``python -m namm_transfer.rl.data`` on a tiny budget: a real Minari dataset read back by ``minari.load_dataset``,
with the right episode ends and reference scores; deterministic from the seed; one-line errors.

Everything happens under a temporary ``MINARI_DATASETS_PATH`` and behaviour cache; PPO trains for one update.
"""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest

pytest.importorskip("stable_baselines3")
minari = pytest.importorskip("minari")

from namm_transfer.cli import run_program  # noqa: E402
from namm_transfer.evals.control import control_env  # noqa: E402
from namm_transfer.rl import data  # noqa: E402
from namm_transfer.rl.behaviour import random_policy  # noqa: E402
from namm_transfer.rl.dataset import load_trajectories, provenance  # noqa: E402
from namm_transfer.rl.episodes import run_episodes  # noqa: E402

TINY = ["--ppo-steps", "2048", "--checkpoint-every", "1024", "--steps", "150", "--eval-episodes", "2",
        "--ref-episodes", "3", "--batch", "3"]
DATASET = "namm-transfer/hopper/medium-v0"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The tiny hopper-medium dataset, made once; yields (minari root, behaviour cache)."""
    root, cache = tmp_path_factory.mktemp("minari"), tmp_path_factory.mktemp("behaviour")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MINARI_DATASETS_PATH", str(root))
        env.setenv("HF_HUB_OFFLINE", "1")
        assert run_program(data.main, ["--env", "hopper", "--quality", "medium", "--cache", str(cache), *TINY]) == 0
        yield root, cache


@pytest.fixture
def minari_root(made, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(made[0]))
    return made[0]


def test_dataset_reads_back_with_episode_ends_and_references(made, minari_root):
    dataset = minari.load_dataset(DATASET)
    assert dataset.env_spec.id == "Hopper-v5"
    assert dataset.total_steps >= 150
    for episode in dataset.iterate_episodes():
        assert episode.observations.shape == (len(episode.actions) + 1, 11)
        assert not episode.terminations[:-1].any() and not episode.truncations[:-1].any()
        assert episode.terminations[-1] != episode.truncations[-1]
    record = provenance(DATASET)
    metadata = dataset.storage.metadata
    assert metadata["ref_min_score"] == pytest.approx(record["reference"]["random_mean"])
    assert metadata["ref_max_score"] == pytest.approx(record["reference"]["expert_mean"])
    assert record["command"].startswith("python -m namm_transfer.rl.data --env hopper --quality medium")
    assert record["behaviour_training_command"].startswith("python -m namm_transfer.rl.data --env hopper --seed 0")
    assert str(record["checkpoint_steps"]) in record["checkpoint_returns"]
    returns = [float(np.sum(e.rewards)) for e in dataset.iterate_episodes()]
    assert record["dataset_return_mean"] == pytest.approx(np.mean(returns))
    trajectories = load_trajectories(DATASET)
    assert trajectories.summary()["steps"] == dataset.total_steps
    assert trajectories.ref_min_score == pytest.approx(metadata["ref_min_score"])


def test_same_seed_same_dataset_from_a_fresh_cache(made, minari_root, tmp_path):
    first = [e.observations for e in minari.load_dataset(DATASET).iterate_episodes()]
    rc = run_program(data.main, ["--env", "hopper", "--cache", str(tmp_path), "--overwrite", *TINY])
    assert rc == 0
    second = [e.observations for e in minari.load_dataset(DATASET).iterate_episodes()]
    assert len(first) == len(second)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_terminations_and_truncations_are_kept_apart(minari_root):
    env = control_env("hopper")
    space = gym.make(env.gym_id).action_space
    cut = run_episodes(env.gym_id, random_policy(space, 0), 0, episodes=2, max_episode_steps=5)
    fell = run_episodes(env.gym_id, random_policy(space, 1), 10, episodes=2)
    assert all(e.truncated and not e.terminated and len(e) == 5 for e in cut)
    assert all(e.terminated and not e.truncated and len(e) < 1000 for e in fell)
    reference = {"random_mean": 0.0, "expert_mean": 1.0, "episodes": 2}
    data.write_dataset("namm-transfer/hopper/ends-v0", env, cut + fell, reference, "test", {}, "random")
    episodes = list(minari.load_dataset("namm-transfer/hopper/ends-v0").iterate_episodes())
    assert [bool(e.truncations[-1]) for e in episodes] == [True, True, False, False]
    assert [bool(e.terminations[-1]) for e in episodes] == [False, False, True, True]
    assert [e.id for e in episodes] == [0, 1, 2, 3]


def test_bad_inputs_get_one_line(made, minari_root, capsys):
    assert run_program(data.main, ["--env", "ant"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown env 'ant'; known: hopper, walker2d, halfcheetah"
    assert run_program(data.main, ["--env", "hopper", "--cache", str(made[1]), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already exists" in err and "--overwrite" in err


def test_missing_dataset_says_how_to_make_it(minari_root):
    with pytest.raises(FileNotFoundError, match=r"`python -m namm_transfer\.rl\.data --env walker2d --quality expert`"):
        load_trajectories("namm-transfer/walker2d/expert-v0")
    with pytest.raises(FileNotFoundError, match="downloads nothing"):
        load_trajectories("mujoco/hopper/medium-v0")


def test_a_longer_run_resumes_from_the_latest_checkpoint(tmp_path):
    from namm_transfer.rl.behaviour import CONFIG_FILE, PPO_CONFIGS, BehaviourRun, checkpoint_steps, train_behaviour

    env = control_env("walker2d")
    short = BehaviourRun(env, 2048, 2048, seed=3, ppo=PPO_CONFIGS["walker2d"])
    folder = train_behaviour(short, tmp_path, "short")
    longer = BehaviourRun(env, 4096, 2048, seed=3, ppo=PPO_CONFIGS["walker2d"])
    assert train_behaviour(longer, tmp_path, "longer") == folder
    assert checkpoint_steps(folder) == [2048, 4096] and checkpoint_steps(folder, 3000) == [2048]
    sessions = json.loads((folder / CONFIG_FILE).read_text())["sessions"]
    assert [(s["command"], s["from_steps"], s["to_steps"]) for s in sessions] == [("short", 0, 2048),
                                                                                   ("longer", 2048, 4096)]
    assert train_behaviour(short, tmp_path, "again") == folder  # trained far enough: reused, no new session
    assert len(json.loads((folder / CONFIG_FILE).read_text())["sessions"]) == 2
    other = BehaviourRun(env, 2048, 1024, seed=3, ppo=PPO_CONFIGS["walker2d"])
    with pytest.raises(ValueError, match="other settings"):
        train_behaviour(other, tmp_path, "other")

"""``python -m namm_transfer.rl.train`` and ``load_dt``: a few training steps on a tiny Minari dataset save a DT that
reloads to the same outputs; training is deterministic from the seed; a hub-style snapshot folder (no ``dt.json``)
loads with given state statistics; bad inputs get one line.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("stable_baselines3")
pytest.importorskip("minari")

from namm_transfer.cli import run_program  # noqa: E402
from namm_transfer.rl import data  # noqa: E402
from namm_transfer.rl import train as train_program  # noqa: E402
from namm_transfer.rl.checkpoint import INFO_FILE, load_dt  # noqa: E402
from namm_transfer.rl.dataset import load_trajectories  # noqa: E402
from namm_transfer.rl.segments import SegmentSampler  # noqa: E402
from namm_transfer.rl.train import LOG_FILE, TrainConfig, build_model, train  # noqa: E402

DATASET = "namm-transfer/hopper/medium-v0"
TINY = TrainConfig(steps=3, batch_size=4, log_every=1, eval_every=0, eval_episodes=1, warmup_steps=2)


@pytest.fixture(scope="module")
def minari_root(tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("minari"), tmp_path_factory.mktemp("behaviour")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MINARI_DATASETS_PATH", str(root))
        env.setenv("HF_HUB_OFFLINE", "1")
        argv = ["--env", "hopper", "--cache", str(cache), "--ppo-steps", "2048", "--checkpoint-every", "2048",
                "--steps", "120", "--eval-episodes", "1", "--ref-episodes", "2", "--batch", "2"]
        assert run_program(data.main, argv) == 0
        yield root


@pytest.fixture
def trajectories(minari_root, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(minari_root))
    return load_trajectories(DATASET)


def _outputs(model, batch):
    with torch.no_grad():
        return model(**batch, return_dict=True).action_preds


def test_trained_dt_saves_and_reloads_to_the_same_outputs(trajectories, tmp_path):
    model, info = train(TINY, trajectories, tmp_path / "dt", "python -m namm_transfer.rl.train --dataset x")
    loaded, loaded_info = load_dt(tmp_path / "dt")
    assert loaded_info == info
    assert info.env == "hopper" and info.context == 20 and info.target_returns == (3600.0, 1800.0)
    assert np.allclose(info.state_mean, trajectories.state_mean)
    assert info.ref_min_score == pytest.approx(trajectories.ref_min_score)
    batch = SegmentSampler(trajectories, 20, 1000, 1000.0, seed=5).sample(6)
    assert torch.equal(_outputs(model, batch), _outputs(loaded, batch))
    log = [json.loads(line) for line in (tmp_path / "dt" / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log)
    assert log[-1]["eval"]["episodes"] == 1
    record = json.loads((tmp_path / "dt" / INFO_FILE).read_text())
    assert record["dataset_id"] == DATASET
    assert record["training"]["command"] == "python -m namm_transfer.rl.train --dataset x"
    assert record["training"]["dataset"]["steps"] >= 120
    assert record["training"]["dataset_provenance"]["reference"]["random_mean"] == pytest.approx(info.ref_min_score)


def test_training_is_deterministic_and_learns(trajectories, tmp_path):
    config = TrainConfig(steps=20, batch_size=8, log_every=10, eval_every=0, eval_episodes=1, warmup_steps=1,
                         learning_rate=1e-3, dropout=0.0)
    first, _ = train(config, trajectories, tmp_path / "a", "a")
    second, _ = train(config, trajectories, tmp_path / "b", "b")
    assert all(torch.equal(p, q) for p, q in zip(first.state_dict().values(), second.state_dict().values()))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "a" / LOG_FILE).read_text().splitlines()]
    assert losses[-1] < losses[0]


def test_cli_trains_and_rejects_a_used_folder(minari_root, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(minari_root))
    argv = ["--dataset", DATASET, "--out", str(tmp_path / "dt"), "--steps", "2", "--batch-size", "2",
            "--warmup-steps", "1", "--log-every", "1", "--eval-every", "0", "--eval-episodes", "1"]
    assert run_program(train_program.main, argv) == 0
    assert json.loads((tmp_path / "dt" / INFO_FILE).read_text())["training"]["command"] == (
        "python -m namm_transfer.rl.train " + " ".join(argv))
    capsys.readouterr()
    assert run_program(train_program.main, argv) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'dt'} is not empty; pass --overwrite to replace it"


def test_missing_dataset_is_one_line_with_the_command(minari_root, monkeypatch, capsys):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(minari_root))
    assert run_program(train_program.main, ["--dataset", "namm-transfer/walker2d/medium-v0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "make it with `python -m namm_transfer.rl.data --env walker2d --quality medium`" in err


@pytest.mark.parametrize("program", [data, train_program])
def test_help(program, capsys):
    with pytest.raises(SystemExit) as exit_:
        program.main(["--help"])
    assert exit_.value.code == 0
    assert "python -m namm_transfer.rl." in capsys.readouterr().out


def _snapshot(folder, state_dim=11, act_dim=3):
    """A folder like a hub snapshot of edbeeching/decision-transformer-gym-hopper-medium: HF files only."""
    torch.manual_seed(0)
    model = build_model(TrainConfig(), state_dim, act_dim).eval()
    model.save_pretrained(folder)
    return model


def test_hub_snapshot_loads_with_given_statistics(tmp_path):
    folder = tmp_path / "decision-transformer-gym-hopper-medium"
    model = _snapshot(folder)
    stats = {"state_mean": [0.1] * 11, "state_std": [0.5] * 11}
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    loaded, info = load_dt(folder, tmp_path / "stats.json")
    assert info.env == "hopper" and info.context == 20 and info.dataset_id is None
    assert info.state_std == (0.5,) * 11 and info.target_returns == (3600.0, 1800.0)
    batch = {"states": torch.randn(2, 20, 11), "actions": torch.randn(2, 20, 3),
             "returns_to_go": torch.randn(2, 20, 1), "timesteps": torch.arange(20).expand(2, 20),
             "attention_mask": torch.ones(2, 20, dtype=torch.long)}
    assert torch.equal(_outputs(model, batch), _outputs(loaded, batch))
    assert load_dt(folder, {**stats, "context": 10, "target_returns": [2000]})[1].context == 10


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Decision Transformer folder"):
        load_dt(tmp_path / "nowhere")
    folder = tmp_path / "decision-transformer-gym-hopper-medium"
    _snapshot(folder, state_dim=17, act_dim=6)
    with pytest.raises(ValueError, match=r"^the DT has state_dim 17 and act_dim 6, but Hopper-v5 has 11 and 3$"):
        load_dt(folder, {"state_mean": [0.0] * 17, "state_std": [1.0] * 17})
    with pytest.raises(ValueError, match="give the state mean/std"):
        load_dt(folder)
    other = tmp_path / "my-dt"
    _snapshot(other)
    with pytest.raises(ValueError, match="cannot tell the env"):
        load_dt(other, {"state_mean": [0.0] * 11, "state_std": [1.0] * 11})
    with pytest.raises(ValueError, match="state_std must be positive"):
        load_dt(other, {"env": "hopper", "state_mean": [0.0] * 11, "state_std": [0.0] * 11})


def test_wall_time_limit_stops_saves_and_records_the_steps(trajectories, tmp_path):
    config = TrainConfig(steps=50, batch_size=2, eval_every=0, eval_episodes=1, max_minutes=1e-6)
    train(config, trajectories, tmp_path / "dt", "limited")
    record = json.loads((tmp_path / "dt" / INFO_FILE).read_text())
    assert record["training"]["steps_done"] == 1
    assert record["training"]["final_eval"]["episodes"] == 1
    assert load_dt(tmp_path / "dt")[1].env == "hopper"

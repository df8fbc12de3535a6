"""``python -m namm_transfer.rl`` end to end on a tiny random DT (HalfCheetah-v5, short episodes): results folder,
summary, plots and resume; every bad input answered in one line with exit status 2 and nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import DecisionTransformerConfig, DecisionTransformerModel

from namm_transfer.cli import run_program
from namm_transfer.rl.__main__ import main
from namm_transfer.rl.checkpoint import INFO_FILE, DTInfo

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
CONDITIONS = "window,full,namm,recency@matched,h2o@window"


@pytest.fixture(scope="module")
def cheetah_dt(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dt")
    torch.manual_seed(0)
    config = DecisionTransformerConfig(state_dim=17, act_dim=6, hidden_size=32, n_layer=2, n_head=1,
                                       max_ep_len=1000, action_tanh=True, n_positions=64)
    DecisionTransformerModel(config).save_pretrained(folder)
    info = DTInfo(env="halfcheetah", state_mean=[0.0] * 17, state_std=[1.0] * 17, target_returns=[6000.0, 3000.0],
                  ref_min_score=-300.0, ref_max_score=5000.0)
    (folder / INFO_FILE).write_text(json.dumps(info.to_json()))
    return folder


def files_of(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.exists() else {}


def test_program_runs_end_to_end_and_resumes(cheetah_dt, tmp_path):
    out = tmp_path / "out"
    args = ["--env", "halfcheetah", "--model", str(cheetah_dt), "--episodes", "2", "--seeds", "0,1",
            "--max-episode-steps", "40", "--conditions", CONDITIONS, "--out", str(out)]
    done = subprocess.run([sys.executable, "-m", "namm_transfer.rl", *args], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "recency@matched" in done.stdout and "D4RL score" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    metrics = summary["conditions"]
    assert set(metrics) == set(CONDITIONS.split(","))
    assert all(m["episodes"] == 4 for m in metrics.values())
    assert metrics["full"]["kv_tokens_peak"] == 3 * 40 - 1
    assert metrics["window"]["kv_tokens_peak"] == 3 * 20 - 1
    assert metrics["recency@matched"]["kv_tokens_mean"] == pytest.approx(metrics["namm"]["kv_tokens_mean"], abs=1.0)
    assert metrics["namm"]["total_bytes_mean"] > metrics["namm"]["kv_bytes_mean"] > 0  # policy state counted
    assert metrics["window"]["total_bytes_mean"] == metrics["window"]["kv_bytes_mean"]
    assert "minari_score" in metrics["namm"] and summary["paired_d4rl_difference"]["namm - full"]["episodes"] == 4
    for plot in ("score_vs_kv.png", "cache_size.png", "namm_kept_by_age.png"):
        assert (out / plot).stat().st_size > 0
    lines = (out / "namm" / "predictions.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["item_id"] for line in lines) == ["0-0", "0-1", "1-0", "1-1"]
    before = {p: m for p, m in files_of(out).items() if p.endswith("predictions.jsonl")}
    assert run_program(main, args) == 0  # everything done: nothing is rerun or appended
    assert {p: m for p, m in files_of(out).items() if p.endswith("predictions.jsonl")} == before
    before = files_of(out)
    changed = run_program(main, [*args[:-2], "--target-return", "100", "--out", str(out)])
    assert changed == 2 and files_of(out) == before  # another configuration is refused, nothing touched


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--env", "pong"], "unknown env 'pong'"),
        (["--conditions", "h2o@matched"], "needs 'namm'"),
        (["--conditions", "full,h2o@0.5"], "unknown condition"),
        (["--update-every", "51"], "multiple of 3 and of 16"),
        (["--seeds", "0,x"], "not an integer"),
        (["--episodes", "0"], "out of range"),
        (["--device", "cuda:7"], "device"),
        (["--device", "nonsense"], "device"),
        (["--namm", "/no/such/namm"], "/no/such/namm"),
        (["--model", "/no/such/dt"], "/no/such/dt"),
        (["--env", "hopper"], "not 'hopper'"),
    ],
)
def test_bad_input_gives_one_line_and_writes_nothing(cheetah_dt, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    args = ["--env", "halfcheetah", "--model", str(cheetah_dt), "--episodes", "1", "--max-episode-steps", "20",
            "--out", str(out), *extra]
    try:
        status = run_program(main, args)
    except SystemExit as exit_:  # argparse
        status = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_a_namm_file_that_fails_validation_is_refused(cheetah_dt, tmp_path, capsys):
    broken = tmp_path / "namm"
    broken.mkdir()
    (broken / "namm.json").write_text('{"format_version": 1, "config": {}}')
    (broken / "namm.safetensors").write_bytes(b"not a safetensors file")
    out = tmp_path / "out"
    status = run_program(main, ["--env", "halfcheetah", "--model", str(cheetah_dt), "--namm", str(broken),
                                "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "namm" in err[0], err
    assert not out.exists()


def test_a_dt_of_another_env_is_refused(tmp_path, capsys):
    folder = tmp_path / "dt"
    config = DecisionTransformerConfig(state_dim=11, act_dim=3, hidden_size=16, n_layer=1, n_head=1, max_ep_len=1000)
    DecisionTransformerModel(config).save_pretrained(folder)
    info = DTInfo(env="halfcheetah", state_mean=[0.0] * 11, state_std=[1.0] * 11, target_returns=[6000.0])
    (folder / INFO_FILE).write_text(json.dumps(info.to_json()))
    capsys.readouterr()  # drop what saving printed
    status = run_program(main, ["--env", "halfcheetah", "--model", str(folder), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "state_dim 11" in err[0]
    assert not (tmp_path / "out").exists()

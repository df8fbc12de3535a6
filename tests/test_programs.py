"""The command-line programs end to end on the embedded SmolLM2 (small prompts, CPU): help, one-line errors for
bad input, the text evaluation's results folder and resume, one evolution generation with exact resume, and the
warm start's fit to a chosen target."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from namm_transfer.evolve.state import read_log
from namm_transfer.namm.checkpoint import load_namm, save_namm
from namm_transfer.namm.config import NammConfig

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}


def program(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=ENV, cwd=cwd,
                          timeout=600)


@pytest.mark.parametrize("name", ["namm_transfer.demo", "namm_transfer.text", "namm_transfer.evolve",
                                  "namm_transfer.evolve.warm_start"])
def test_help(name):
    done = program(name, "--help")
    assert done.returncode == 0 and "usage:" in done.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (("namm_transfer.text", "--namm", "/no/such/namm"), "/no/such/namm"),
        (("namm_transfer.text", "--tasks", "passkey,nonsense", "--namm", "none"), "nonsense"),
        (("namm_transfer.text", "--model", "/no/such/model", "--namm", "none"), "/no/such/model"),
        (("namm_transfer.demo", "--namm", "/no/such/namm"), "/no/such/namm"),
        (("namm_transfer.evolve", "--stage", "passkey:many"), "generations must be an integer"),
        (("namm_transfer.evolve", "--stage", "haystack:2"), "unknown task"),
        (("namm_transfer.evolve", "--population", "1"), "--population"),
        (("namm_transfer.evolve", "--update-every", "100"), "update_every"),
        (("namm_transfer.evolve", "--init-from", "/no/such/namm"), "/no/such/namm"),
        (("namm_transfer.evolve.warm_start", "--tasks", "passkey,nonsense"), "nonsense"),
        (("namm_transfer.evolve.warm_start", "--items-per-task", "2", "--held-back", "2"), "--held-back"),
        (("namm_transfer.evolve.warm_start", "--coverage", "1.5"), "--coverage"),
        (("namm_transfer.evolve.warm_start", "--recency-window", "0"), "--recency-window"),
        (("namm_transfer.evolve.warm_start", "--target", "newest"), "--target"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(args, message):
    done = program(*args)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in done.stderr


def test_bad_weights_file_is_named(tmp_path):
    folder = tmp_path / "namm"
    save_namm(folder, torch.zeros(4172), torch.zeros(17), torch.ones(17), NammConfig(), {})
    (folder / "namm.json").write_text("{not json")
    done = program("namm_transfer.text", "--namm", str(folder))
    assert done.returncode == 2 and "namm.json" in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def evicting_namm(tmp_path_factory) -> Path:
    """A random NAMM (period 128) that evicts part of a short prompt."""
    folder = tmp_path_factory.mktemp("namm")
    params = 0.05 * torch.randn(4172, generator=torch.Generator().manual_seed(0))
    params[-1] = 0.05
    save_namm(folder, params, torch.full((17,), 0.01), torch.full((17,), 1e-4), NammConfig(update_every=128),
              {"note": "random test weights"})
    return folder


def test_text_program_writes_results_and_resumes(tmp_path, evicting_namm):
    args = ("namm_transfer.text", "--namm", str(evicting_namm), "--tasks", "passkey", "--items", "1",
            "--length", "320", "--methods", "full,namm,h2o,recency", "--ratios", "0.5", "--out", str(tmp_path))
    first = program(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    methods = {row["method"]: row for row in summary["methods"]}
    assert set(methods) == {"full", "namm", "h2o@matched", "h2o@0.5", "recency@matched", "recency@0.5"}
    assert methods["full"]["kv_retained_pct"] == pytest.approx(100.0)
    assert methods["namm"]["kv_retained_pct"] < 100.0  # the NAMM evicted
    for rule in ("h2o", "recency"):  # matched budget: the same memory as the NAMM
        assert methods[f"{rule}@matched"]["kv_retained_pct"] == pytest.approx(methods["namm"]["kv_retained_pct"])
    assert (tmp_path / "score_vs_kv.png").stat().st_size > 0 and (tmp_path / "retention_per_layer.png").exists()
    folders = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(folders) == 6 and all((f / "metrics.json").exists() for f in folders)
    cut = folders[0] / "predictions.jsonl"
    with cut.open("a") as handle:
        handle.write('{"item_id": "killed mid-wri')  # a run killed while appending
    second = program(*args)  # every item is done: nothing is recomputed, the cut line is removed
    assert second.returncode == 0
    assert f"{cut}:2: removed an incomplete last line" in second.stderr
    assert all(len((f / "predictions.jsonl").read_text().splitlines()) == 1 for f in folders)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_one_evolution_generation_runs_and_resumes_exactly(tmp_path):
    common = ("--population", "4", "--prompts-per-task", "1", "--pool-size", "1", "--length", "256",
              "--update-every", "128", "--members-per-batch", "4", "--init-score", "0.2", "--quiet",
              "--validation-items", "1", "--validate-every", "1")
    straight = program("namm_transfer.evolve", "--run-dir", str(tmp_path / "a"), "--stage", "passkey:2", *common,
                       "--export", str(tmp_path / "exported"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    first = program("namm_transfer.evolve", "--run-dir", str(tmp_path / "b"), "--stage", "passkey:1", *common)
    assert first.returncode == 0, first.stderr[-2000:]
    references = tmp_path / "b" / "references.jsonl"
    with references.open("a") as handle:
        handle.write('{"item_id": "passkey-train-s9')  # killed while caching a reference
    resumed = program("namm_transfer.evolve", "--run-dir", str(tmp_path / "b"), "--stage", "passkey:2", *common)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{references}:" in resumed.stderr and "removed an incomplete last line" in resumed.stderr
    assert references.read_text().endswith("}\n")
    log_a, log_b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert [r["generation"] for r in log_b] == [0, 1]
    assert [r["member_fitness"] for r in log_a] == [r["member_fitness"] for r in log_b]
    a, b = load_namm(tmp_path / "a" / "mean"), load_namm(tmp_path / "b" / "mean")
    assert torch.equal(a.params, b.params) and torch.equal(a.norm_mean, b.norm_mean)
    assert "signal: rank correlation" not in straight.stdout  # one prompt per generation: no halves to compare
    assert f"learning curve: {tmp_path / 'a' / 'learning_curve.png'}" in straight.stdout
    assert (tmp_path / "a" / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    validations = [json.loads(line) for line in (tmp_path / "a" / "validation.jsonl").read_text().splitlines()]
    assert [v["generations"] for v in validations] == [0, 1, 2]
    assert all(v["fitness"] == v["dense"] and 0 < v["kv_retained"] <= 1 for v in validations)  # no memory weight
    best = max(validations, key=lambda v: (v["fitness"], -v["generations"]))
    exported = load_namm(tmp_path / "exported")
    assert torch.equal(exported.params, load_namm(tmp_path / "a" / "best").params)
    provenance = exported.provenance
    assert f"after {best['generations']} generations" in provenance["exported"]
    assert provenance["generations"] == 2 and len(provenance["fitness_history"]) == 2
    assert provenance["command"].startswith("python -m namm_transfer.evolve")
    assert provenance["base_model"] == "smollm2" and np.isfinite(provenance["wall_seconds"])


def test_demo_answers_with_three_methods(evicting_namm):
    done = program("namm_transfer.demo", "--namm", str(evicting_namm), "--length", "320", "--baseline", "l2")
    assert done.returncode == 0, done.stderr[-2000:]
    for label in ("full", "namm", "l2@matched", "KV kept per layer"):
        assert label in done.stdout


def test_warm_start_fits_a_recency_window_and_reuses_collected_items(tmp_path):
    """The warm-start program end to end: it collects, fits the target it is given, writes a NAMM whose
    provenance names that target, and a second fit on the same run folder collects nothing again."""
    common = ("--run-dir", str(tmp_path / "run"), "--tasks", "passkey", "--items-per-task", "2", "--held-back", "1",
              "--length", "256", "--update-every", "64", "--protect-prompt-tail", "16", "--epochs", "30",
              "--learning-rate", "0.02", "--validation-items", "0", "--quiet")
    first = program("namm_transfer.evolve.warm_start", *common, "--target", "oracle")
    assert first.returncode == 0, first.stderr[-2000:]
    collected = sorted((tmp_path / "run" / "collected").rglob("*.pt"))
    assert len(collected) == 2
    stamps = [path.stat().st_mtime_ns for path in collected]
    second = program("namm_transfer.evolve.warm_start", *common, "--target", "recency", "--recency-window", "96",
                     "--export", str(tmp_path / "exported"))
    assert second.returncode == 0, second.stderr[-2000:]
    assert [path.stat().st_mtime_ns for path in collected] == stamps  # reused, not collected again
    record = json.loads((tmp_path / "run" / "warm_start.json").read_text())
    assert record["target"] == {"kind": "recency", "coverage": 0.9, "recency_window": 96}
    held_back = record["agreement"]["fitted"]["held_back"]
    assert held_back["precision"] > 0.9 and held_back["recall"] > 0.9  # the age feature carries the window
    exported = load_namm(tmp_path / "exported")
    assert exported.provenance["target"]["kind"] == "recency"
    assert torch.equal(exported.params, load_namm(tmp_path / "run" / "namm").params)

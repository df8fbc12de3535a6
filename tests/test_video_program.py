"""``python -m namm_transfer.video`` end to end on a tiny budget (embedded model with an untrained tower, two
built-in questions of which one has a corrupt video, 4 frames each): every method answers, the corrupt video is a
failed item with its reason and the run goes on, the table, summary (with K/V, policy and total bytes) and the plots
are written, a rerun resumes
without recomputing, and bad input is one line with exit status 2."""

from __future__ import annotations

import json

import pytest

from namm_transfer.cli import run_program
from namm_transfer.evals.video_tasks import write_split
from namm_transfer.shipped import shipped_names
from namm_transfer.video.__main__ import main


@pytest.mark.skipif("namm" not in shipped_names(), reason="the shipped NAMM (weights/namm) is not installed")
def test_tiny_run_end_to_end_and_resume(tmp_path, capsys):
    data = tmp_path / "data"
    tasks = write_split(data, "heldout", lengths=[16], per_kind=1, kinds=("colour", "count"))
    (data / "videos" / f"{tasks[1].id}.mp4").write_bytes(b"not a video at all" * 10)
    out = tmp_path / "out"
    argv = ["--parts", "none", "--data", str(data), "--frames", "4", "--methods", "full,namm,recency",
            "--ratios", "0.5", "--update-every", "32", "--chunk-size", "32", "--out", str(out)]
    assert run_program(main, argv) == 0
    printed = capsys.readouterr().out
    assert "recency@matched" in printed and "results:" in printed
    summary = json.loads((out / "summary.json").read_text())
    rows = {row["method"]: row for row in summary["methods"]}
    assert set(rows) == {"full", "namm", "recency@matched", "recency@0.5"}
    for row in rows.values():
        assert (row["answered"], row["failed"]) == (1, 1)
        assert 0.0 <= row["acc_low"] <= row["accuracy"] <= row["acc_high"] <= 100.0
        assert row["tokens_per_s"] > 0 and row["kv_mb_peak"] > 0
    assert rows["full"]["kv_retained_pct"] == pytest.approx(100.0)
    assert rows["recency@0.5"]["kv_retained_pct"] < 70.0
    assert rows["recency@matched"]["kv_tokens_mean"] == pytest.approx(rows["namm"]["kv_tokens_mean"], abs=1.0)
    for row in rows.values():  # the total is K/V + policy bytes summed at one moment: between the K/V peak and the sum
        assert row["kv_mb_peak"] < row["total_mb_peak"] <= row["kv_mb_peak"] + row["policy_mb_peak"] + 1e-9
    assert rows["namm"]["policy_mb_peak"] > rows["full"]["policy_mb_peak"] > 0  # the NAMM's queries and state
    paired = {row["comparison"]: row["accuracy"] for row in summary["paired"]}
    assert set(paired) == {"namm - full", "namm - recency@matched"} and paired["namm - full"]["items"] == 1
    assert set(rows["full"]["per_category"]) == {"colour"} and set(rows["full"]["per_frames"]) == {"4"}
    assert (out / "accuracy_vs_kv.png").stat().st_size > 0 and (out / "frame_retention.png").stat().st_size > 0
    assert (out / "accuracy_vs_memory.png").stat().st_size > 0
    full_folder = next(out.glob("*__full__full"))
    records = [json.loads(line) for line in (full_folder / "predictions.jsonl").read_text().splitlines()]
    failed = [r for r in records if "failed" in r]
    assert len(records) == 2 and len(failed) == 1 and "cannot decode video" in failed[0]["failed"]
    answered = next(r for r in records if "failed" not in r)
    assert answered["num_frames"] == 4 and len(answered["frame_retention"]) == 30  # SmolLM2's layers
    assert json.loads((full_folder / "metrics.json").read_text())["method"] == "full"
    assert json.loads((full_folder / "config.json").read_text())["dtype"] == "float32"  # --dtype auto on the CPU

    assert run_program(main, argv) == 0  # resumed: nothing recomputed
    assert "[" not in capsys.readouterr().out.split("method")[0]
    assert len((full_folder / "predictions.jsonl").read_text().splitlines()) == 2


def test_bad_input_is_one_line(tmp_path, capsys):
    not_video = tmp_path / "llama"
    not_video.mkdir()
    (not_video / "config.json").write_text(json.dumps({"model_type": "llama"}))
    wrong_layout = tmp_path / "empty"
    wrong_layout.mkdir()
    cases = [
        (["--model", str(not_video), "--namm", "none", "--methods", "full", "--data", str(wrong_layout)],
         "is not a builtin folder"),
        (["--dataset", "mlvu", "--namm", "none", "--parts", "none"], "needs --data"),
        (["--dataset", "longvideobench", "--data", str(wrong_layout), "--parts", "none", "--namm", "none"],
         "lvb_val.json"),
        (["--methods", "full,magic"], "unknown method"),
        (["--parts", str(tmp_path / "absent"), "--namm", "none"], "no such folder"),
    ]
    for argv, expected in cases:
        assert run_program(main, argv + ["--out", str(tmp_path / "out")]) == 2
        error = capsys.readouterr().err.strip()
        assert expected in error and "\n" not in error, error
    with pytest.raises(SystemExit) as exit_info:  # argparse's own error, in the suite's one-line style
        main(["--device", "tpu"])
    assert exit_info.value.code == 2 and "not a device name" in capsys.readouterr().err
    data = tmp_path / "data"
    write_split(data, "heldout", lengths=[16], per_kind=1, kinds=("colour",))
    assert run_program(main, ["--model", str(not_video), "--namm", "none", "--methods", "full", "--data", str(data),
                              "--out", str(tmp_path / "out")]) == 2
    assert "is not a LLaVA-NeXT-Video model (model_type 'llama')" in capsys.readouterr().err

"""Run folders (resume, torn last line, config check, metrics), text tables and PNG plots."""

import json

import pytest

from namm_transfer.evals.report import (
    RunFolder,
    RunIdentityError,
    format_table,
    plot_retention_per_layer,
    plot_score_vs_memory,
    run_name,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_run_name_is_sanitised_from_dataset_model_policy_budget():
    assert run_name("LongBench/hotpotqa", "HuggingFaceTB/SmolLM2-135M-Instruct", "namm", 0.25) == (
        "LongBench-hotpotqa__SmolLM2-135M-Instruct__namm__b0.25"
    )
    assert run_name("passkey", "/models/llama 3/", "full cache", None) == "passkey__llama-3__full-cache__full"
    assert run_name("passkey", "m", "h2o", "matched") == "passkey__m__h2o__matched"
    with pytest.raises(ValueError, match="budget"):
        run_name("passkey", "m", "h2o", 1.5)
    with pytest.raises(ValueError, match="no usable characters"):
        run_name("???", "m", "h2o")


def test_run_folder_rejects_path_like_names(tmp_path):
    for bad in ("", "a/b", "..", "with space"):
        with pytest.raises(ValueError, match="run folder name"):
            RunFolder(tmp_path, bad)


def test_identity_is_written_with_the_first_item_and_checked_on_resume(tmp_path):
    run = RunFolder(tmp_path, "r1")
    run.start({"model": "m", "budget": 0.5})
    assert not (tmp_path / "r1").exists()  # nothing is written before the first finished item
    RunFolder(tmp_path, "r1").start({"model": "m", "budget": 0.25})  # so a corrected command is not refused
    run.append_prediction({"item_id": "a"})
    assert json.loads((tmp_path / "r1" / "config.json").read_text()) == {"budget": 0.5, "model": "m"}
    RunFolder(tmp_path, "r1").start({"budget": 0.5, "model": "m"})
    with pytest.raises(RunIdentityError, match=r"budget \(was 0.5, now 0.25\)"):
        RunFolder(tmp_path, "r1").start({"model": "m", "budget": 0.25})
    with pytest.raises(RunIdentityError, match=r"seed \(was absent, now 3\)"):
        RunFolder(tmp_path, "r1").start({"model": "m", "budget": 0.5, "seed": 3})


def test_resume_skips_finished_items(tmp_path):
    items = [f"item{i}" for i in range(5)]
    first = RunFolder(tmp_path, "run")
    for item_id in items[:3]:
        first.append_prediction({"item_id": item_id, "prediction": "x", "score": 1.0})
    # a new process opens the same folder
    second = RunFolder(tmp_path, "run")
    done = second.done_ids()
    assert done == {"item0", "item1", "item2"}
    for item_id in items:
        if item_id not in done:
            second.append_prediction({"item_id": item_id, "prediction": "y", "score": 0.0})
    assert [r["item_id"] for r in second.predictions()] == items
    with pytest.raises(ValueError, match="item_id"):
        second.append_prediction({"prediction": "z"})


def test_torn_last_line_is_ignored_with_a_warning_and_repaired(tmp_path):
    run = RunFolder(tmp_path, "run")
    run.append_prediction({"item_id": "a", "prediction": "ok"})
    with run.predictions_path.open("ab") as handle:
        handle.write(b'{"item_id": "b", "predic')  # killed mid-write
    with pytest.warns(UserWarning, match="incomplete last line"):
        assert RunFolder(tmp_path, "run").done_ids() == {"a"}
    resumed = RunFolder(tmp_path, "run")
    with pytest.warns(UserWarning):
        resumed.append_prediction({"item_id": "b", "prediction": "redone"})
    lines = run.predictions_path.read_text().splitlines()
    assert [json.loads(line)["item_id"] for line in lines] == ["a", "b"]


def test_complete_last_line_without_newline_is_kept(tmp_path):
    run = RunFolder(tmp_path, "run")
    run.path.mkdir()
    run.predictions_path.write_text('{"item_id": "a"}')
    run.append_prediction({"item_id": "b"})
    assert run.done_ids() == {"a", "b"}


def test_corrupt_line_before_the_end_is_an_error(tmp_path):
    run = RunFolder(tmp_path, "run")
    run.path.mkdir()
    run.predictions_path.write_text('{"item_id": "a"}\nnot json\n{"item_id": "c"}\n')
    with pytest.raises(ValueError, match=r"predictions.jsonl:2: corrupt line"):
        run.done_ids()


def test_metrics_written_and_updated(tmp_path):
    run = RunFolder(tmp_path, "run")
    assert run.metrics() == {}
    run.write_metrics({"score": 50.0, "n": 10})
    assert run.write_metrics({"score": 60.0}, update=True) == {"score": 60.0, "n": 10}
    assert json.loads(run.metrics_path.read_text()) == {"n": 10, "score": 60.0}
    assert run.write_metrics({"kv": 0.3}) == {"kv": 0.3}
    assert not list(run.path.glob("*.tmp"))


def test_format_table_fixed_width():
    rows = [
        {"method": "namm", "score": 41.234, "kv_pct": 52.0},
        {"method": "h2o", "score": 38.5, "kv_pct": None, "note": "matched"},
    ]
    assert format_table(rows) == (
        "method  score  kv_pct  note\n"
        "------  -----  ------  -------\n"
        "namm    41.23   52.00  -\n"
        "h2o     38.50       -  matched"
    )
    assert format_table(rows, columns=["score"], float_digits=1) == "score\n-----\n 41.2\n 38.5"
    with pytest.raises(ValueError, match="column"):
        format_table([])


def test_plots_write_png_files(tmp_path):
    rows = [
        {"method": "full", "score": 50.0, "kv_retained_pct": 100.0},
        {"method": "namm", "score": 49.0, "kv_retained_pct": 60.0},
        {"method": "h2o", "score": 45.0, "kv_retained_pct": 60.0},
        {"method": "h2o", "score": 30.0, "kv_retained_pct": 25.0},
    ]
    out = plot_score_vs_memory(rows, tmp_path / "plots" / "pareto.png", title="hotpotqa")
    assert out.read_bytes()[:8] == PNG_MAGIC
    out = plot_retention_per_layer({"namm": [80.0, 60.0, 40.0], "h2o": [60.0, 60.0, 60.0]}, tmp_path / "layers.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="lacks kv_retained_pct"):
        plot_score_vs_memory([{"method": "x", "score": 1.0}], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="at least one"):
        plot_retention_per_layer({}, tmp_path / "bad.png")

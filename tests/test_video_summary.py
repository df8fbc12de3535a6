"""What the video program reports from its records: accuracy with its interval, per category and per number of
frames, failures left out of the accuracy, memory columns, and the NAMM's paired differences against full and its
own matched baselines on the questions both answered."""

from pathlib import Path

import pytest

from namm_transfer.evals.report import with_interval
from namm_transfer.evals.stats import bootstrap_mean_interval
from namm_transfer.evals.video_qa import VideoQuestion
from namm_transfer.methods import MATCHED, Method
from namm_transfer.video.summary import paired_differences, paired_table, summarise


def question(item, kind):
    return VideoQuestion(item, "builtin", Path(f"{item}.mp4"), "Which?", ("a", "b", "c", "d"), "A", kind)


QUESTIONS = [question("q1", "colour"), question("q2", "colour"), question("q3", "shape"), question("q4", "shape")]


def record(item, kind, correct, frames=64, kv_bytes=400):
    return {"item_id": item, "category": kind, "correct": correct, "num_frames": frames, "kv_retained": 0.5,
            "kv_tokens_mean": 10.0, "kv_tokens_peak": 12.0, "kv_bytes_peak": kv_bytes, "tokens_per_second": 100.0,
            "policy_bytes_peak": 100, "total_bytes_peak": kv_bytes + 100}


def test_summarise_per_category_per_length_and_failures():
    records = [record("q1", "colour", True), record("q2", "colour", False, frames=128),
               record("q3", "shape", True, frames=128), {"item_id": "q4", "category": "shape", "failed": "no video"}]
    row = summarise(Method("full"), QUESTIONS, records)
    assert (row["answered"], row["failed"]) == (3, 1)
    assert row["accuracy"] == pytest.approx(200 / 3)
    assert (row["acc_low"], row["acc_high"]) == pytest.approx(tuple(100 * v for v in bootstrap_mean_interval([1, 0, 1])))
    assert row["per_category"] == {"colour": 50.0, "shape": 100.0}
    assert list(row["per_frames"]) == ["64", "128"] and row["per_frames"] == {"64": 100.0, "128": 50.0}
    assert row["kv_retained_pct"] == 50.0 and row["total_mb_peak"] == pytest.approx(500 / 2**20)


def test_paired_differences_use_the_questions_both_answered():
    full, namm = Method("full"), Method("namm")
    h2o, recency, h2o_fixed = Method("h2o", MATCHED), Method("recency", MATCHED), Method("h2o", 0.5)
    records = {
        full: [record("q1", "colour", True), record("q2", "colour", True), record("q3", "shape", True),
               record("q4", "shape", False)],
        namm: [record("q1", "colour", True), record("q2", "colour", False), record("q3", "shape", True),
               {"item_id": "q4", "category": "shape", "failed": "no video"}],
        h2o: [record("q1", "colour", False), record("q2", "colour", False), record("q3", "shape", False)],
        recency: [{"item_id": q.id, "category": q.category, "failed": "no video"} for q in QUESTIONS],
        h2o_fixed: [record("q1", "colour", False)],
    }
    paired = {row["comparison"]: row for row in paired_differences(records)}
    assert set(paired) == {"namm - full", "namm - h2o@matched", "namm - recency@matched"}
    assert paired["namm - full"]["accuracy"] == {"items": 3, "mean": pytest.approx(-100 / 3),
                                                 "ci95": list(bootstrap_mean_interval([0.0, -100.0, 0.0]))}
    assert paired["namm - h2o@matched"]["accuracy"]["mean"] == pytest.approx(200 / 3)
    assert paired["namm - recency@matched"]["accuracy"] is None  # no question both answered
    table = {row["paired difference"]: row for row in paired_table(list(paired.values()))}
    assert table["namm - full"]["questions"] == 3
    assert table["namm - full"]["accuracy diff [95% CI]"] == with_interval(
        -100 / 3, paired["namm - full"]["accuracy"]["ci95"])
    assert table["namm - recency@matched"]["accuracy diff [95% CI]"] is None

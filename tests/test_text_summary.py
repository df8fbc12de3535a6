"""Metrics of the text evaluation from its records: intervals, memory fields (old records lack some), the dense
metric over the items that have it, and the paired differences of every NAMM against full and its matched
baselines."""

import pytest

from namm_transfer.evals.report import with_interval
from namm_transfer.evals.stats import bootstrap_mean_interval
from namm_transfer.methods import MATCHED, Method
from namm_transfer.text_summary import method_table, paired_differences, paired_table, summarise


def record(item, score, logprob=None, total=300, old=False):
    r = {"item_id": item, "task": "passkey", "score": score, "kv_retained": 0.5, "kept_per_layer": [0.5, 0.25],
         "kv_bytes_peak": 200, "kv_bytes_final": 100, "seconds": 2.0}
    if not old:
        r.update(policy_bytes_peak=total - 200, policy_bytes_final=10, total_bytes_peak=total, total_bytes_final=110)
    if logprob is not None:
        r["answer_logprob"] = logprob
    return r


def test_summarise_scores_with_intervals_and_memory_whole():
    row = summarise(Method("namm", keep_bias=0.5), [record("a", 1.0, -0.5), record("b", 0.0, -1.5),
                                                    record("c", 1.0)])
    assert row["method"] == "namm@+0.5" and row["curve"] == "namm" and row["keep_bias"] == 0.5
    assert row["score"] == pytest.approx(200 / 3)
    assert row["score_ci95"] == list(bootstrap_mean_interval([100.0, 0.0, 100.0]))
    assert row["answer_logprob"] == -1.0 and row["answer_items"] == 2  # the dense metric over the items having it
    assert row["total_bytes_peak"] == 300 and row["policy_bytes_peak"] == 100 and row["kv_bytes_peak"] == 200
    assert row["kept_per_layer_pct"] == [50.0, 25.0]
    table = method_table([row])[0]
    assert table["score [95% CI]"] == with_interval(row["score"], row["score_ci95"])
    assert table["total MiB peak"] == 300 / 2**20


def test_records_written_before_policy_bytes_still_summarise():
    row = summarise(Method("full"), [record("a", 1.0, old=True), record("b", 1.0)])
    assert row["kv_bytes_peak"] == 200 and row["policy_bytes_peak"] is None and row["total_bytes_peak"] is None
    assert row["answer_logprob"] is None and row["answer_logprob_ci95"] is None and row["answer_items"] == 0
    table = method_table([row])[0]
    assert table["total MiB peak"] is None and table["answer log-prob [95% CI]"] is None


def test_paired_differences_pair_each_namm_with_full_and_its_own_matched_baselines():
    full, namm, biased = Method("full"), Method("namm"), Method("namm", keep_bias=1.0)
    h2o, h2o_biased, h2o_ratio = Method("h2o", MATCHED), Method("h2o", MATCHED, keep_bias=1.0), Method("h2o", 0.5)
    records = {
        full: [record("a", 1.0, -0.1), record("b", 1.0, -0.2), record("c", 0.0, -0.3)],
        namm: [record("a", 1.0, -0.4), record("b", 0.0, -0.2), record("c", 0.0, -0.3)],
        biased: [record("a", 1.0, -0.1), record("b", 1.0, -0.2)],
        h2o: [record("a", 0.0, -2.0), record("b", 0.0), record("c", 0.0, -1.3)],
        h2o_biased: [record("a", 0.0), record("b", 1.0)],
        h2o_ratio: [record("a", 0.0), record("b", 0.0)],
    }
    paired = {row["comparison"]: row for row in paired_differences(records)}
    assert set(paired) == {"namm - full", "namm - h2o@matched", "namm@+1 - full", "namm@+1 - h2o@matched+1"}
    assert paired["namm - full"]["score"] == {"items": 3, "mean": pytest.approx(-100 / 3),
                                              "ci95": list(bootstrap_mean_interval([0.0, -100.0, 0.0]))}
    assert paired["namm - full"]["answer_logprob"]["mean"] == pytest.approx(-0.1)
    dense = paired["namm - h2o@matched"]["answer_logprob"]  # item b has no dense score under h2o: left out
    assert dense["items"] == 2 and dense["mean"] == pytest.approx((1.6 + 1.0) / 2)
    assert paired["namm@+1 - full"]["score"]["items"] == 2  # only the items both finished
    assert paired["namm@+1 - h2o@matched+1"]["answer_logprob"] is None
    table = {row["paired difference"]: row for row in paired_table(list(paired.values()))}
    assert table["namm@+1 - h2o@matched+1"]["log-prob diff [95% CI]"] is None
    assert table["namm - full"]["score diff [95% CI]"].startswith("-33.3 [")

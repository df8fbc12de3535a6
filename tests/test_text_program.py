"""The text evaluation and the demo end to end on a tiny random Llama with SmolLM2's tokenizer (seconds on CPU):
the NAMM's keep-bias curve with matched baselines per bias, whole-memory columns, intervals and paired
differences, the dense answer log-probability, the Pareto plot, resume and run identity; old records without
the new fields still summarise; the demo's whole answers and yes/no."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from namm_transfer.demo import WIDTH, wrapped_answers
from namm_transfer.models import embedded_model_dir
from namm_transfer.namm.checkpoint import save_namm
from namm_transfer.namm.config import NammConfig

from test_programs import program

BIASES = (-1.0, 0.0, 1.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(model folder, NAMM folder): a 2-layer random GQA Llama with SmolLM2's tokenizer, and a random NAMM
    (period 128) that evicts part of a 320-token prompt."""
    root = tmp_path_factory.mktemp("tiny")
    model = root / "model"
    model.mkdir()
    source = embedded_model_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).exists():
            shutil.copy(source / name, model / name)
    tokenizer = AutoTokenizer.from_pretrained(model)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(model)
    params = 0.05 * torch.randn(4172, generator=torch.Generator().manual_seed(0))
    params[-1] = 0.05
    namm = root / "namm"
    save_namm(namm, params, torch.full((17,), 0.01), torch.full((17,), 1e-4), NammConfig(update_every=128),
              {"note": "random test weights"})
    return model, namm


def text_args(tiny, out: Path, *extra: str) -> tuple[str, ...]:
    model, namm = tiny
    return ("namm_transfer.text", "--model", str(model), "--dtype", "float32", "--namm", str(namm),
            "--tasks", "passkey", "--items", "3", "--length", "320", "--methods", "full,namm,h2o",
            "--ratios", "0.5", "--out", str(out), *extra)


def test_keep_bias_curve_intervals_paired_differences_dense_and_resume(tiny, tmp_path):
    args = text_args(tiny, tmp_path, f"--namm-bias={','.join(map(str, BIASES))}")
    first = program(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    methods = {row["method"]: row for row in summary["methods"]}
    assert list(methods) == ["full", "namm@-1", "namm", "namm@+1", "h2o@matched-1", "h2o@matched",
                             "h2o@matched+1", "h2o@0.5"]
    retained = [methods[label]["kv_retained_pct"] for label in ("namm@-1", "namm", "namm@+1")]
    assert retained == sorted(retained) and retained[0] < retained[-1]  # the knob trades memory
    for bias in ("-1", "", "+1"):  # each baseline at its own NAMM's budget
        namm, matched = methods[f"namm{'@' + bias if bias else ''}"], methods[f"h2o@matched{bias}"]
        assert matched["kv_retained_pct"] == pytest.approx(namm["kv_retained_pct"])
    for row in methods.values():
        low, high = row["score_ci95"]
        assert low <= row["score"] <= high and row["items"] == row["answer_items"] == 3
        assert row["answer_logprob_ci95"][0] <= row["answer_logprob"] <= row["answer_logprob_ci95"][1] < 0
        assert row["total_bytes_peak"] >= row["kv_bytes_peak"] > 0 and row["policy_bytes_peak"] > 0
        assert row["total_bytes_peak"] <= row["kv_bytes_peak"] + row["policy_bytes_peak"] + 1e-6
    assert methods["namm"]["policy_bytes_peak"] > methods["full"]["policy_bytes_peak"]  # the NAMM's state

    paired = {row["comparison"]: row for row in summary["paired"]}
    assert set(paired) == {f"{n} - {b}" for n, m in (("namm@-1", "-1"), ("namm", ""), ("namm@+1", "+1"))
                           for b in ("full", f"h2o@matched{m}")}
    full = {r["item_id"]: r for r in read_records(tmp_path, "__full__full")}
    namm = {r["item_id"]: r for r in read_records(tmp_path, "namm__bias_p1")}
    hand = [namm[i]["answer_logprob"] - full[i]["answer_logprob"] for i in namm]
    dense = paired["namm@+1 - full"]["answer_logprob"]
    assert dense["items"] == 3 and dense["mean"] == pytest.approx(sum(hand) / 3)
    assert dense["ci95"][0] <= dense["mean"] <= dense["ci95"][1]
    assert paired["namm - full"]["score"]["items"] == 3
    for record in namm.values():  # the matched baselines replay these logs
        assert record["retention"] and record["answer_retention"] and record["answer_tokens"] >= 1
    assert "paired differences" in first.stdout and "namm@+1 - h2o@matched+1" in first.stdout
    assert "total MiB peak" in first.stdout and "answer log-prob [95% CI]" in first.stdout
    for plot in ("score_vs_memory.png", "logprob_vs_memory.png", "score_vs_kv.png", "retention_per_layer.png"):
        assert (tmp_path / plot).stat().st_size > 0

    second = program(*args)  # everything is done: nothing is recomputed
    assert second.returncode == 0 and json.loads((tmp_path / "summary.json").read_text()) == summary
    other = program(*text_args(tiny, tmp_path, "--namm-bias=-1,0,1", "--chunk-size", "64"))
    assert other.returncode == 2 and "chunk_size (was 128, now 64)" in other.stderr


def read_records(out: Path, suffix: str) -> list[dict]:
    (folder,) = [f for f in out.iterdir() if f.name.endswith(suffix)]
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


def test_no_dense_and_records_written_before_the_new_fields(tiny, tmp_path):
    first = program(*text_args(tiny, tmp_path, "--no-dense", "--items", "2"))
    assert first.returncode == 0, first.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert all(row["answer_logprob"] is None and row["answer_items"] == 0 for row in summary["methods"])
    assert all(row["answer_logprob"] is None for row in summary["paired"])
    assert not (tmp_path / "logprob_vs_memory.png").exists()  # no dense score, no dense curve
    (full,) = [f for f in tmp_path.iterdir() if f.name.endswith("__full__full")]
    old = [json.loads(line) for line in (full / "predictions.jsonl").read_text().splitlines()]
    for record in old:  # as written before policy bytes were recorded
        for key in ("policy_bytes_peak", "policy_bytes_final", "total_bytes_peak", "total_bytes_final"):
            del record[key]
    (full / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    again = program(*text_args(tiny, tmp_path, "--items", "2"))  # --dense now: finished items are not redone
    assert again.returncode == 0, again.stderr[-2000:]
    methods = {row["method"]: row for row in json.loads((tmp_path / "summary.json").read_text())["methods"]}
    assert methods["full"]["total_bytes_peak"] is None and methods["full"]["kv_bytes_peak"] > 0
    assert methods["namm"]["total_bytes_peak"] > 0 and (tmp_path / "score_vs_memory.png").exists()


@pytest.mark.parametrize("bias, message", [("x", "'x' is not a number"), ("0.5,0.5", "distinct"),
                                           ("1e9", "out of range")])
def test_bad_keep_bias_gives_one_line_and_exit_2_before_any_work(tiny, tmp_path, bias, message):
    done = program(*text_args(tiny, tmp_path / "out", f"--namm-bias={bias}"))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "--namm-bias" in lines[0] and message in lines[0]
    assert not (tmp_path / "out").exists()


def test_demo_prints_whole_answers_yes_no_and_whole_memory(tiny):
    model, namm = tiny
    done = program("namm_transfer.demo", "--model", str(model), "--dtype", "float32", "--namm", str(namm),
                   "--length", "320", "--baseline", "l2")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    for column in ("correct", "peak KV MiB", "peak policy MiB", "peak total MiB"):
        assert column in lines[header]
    rows = lines[header + 2:header + 5]
    assert [row.split()[0] for row in rows] == ["full", "namm", "l2@matched"]
    assert all(row.split()[1] in ("yes", "no") for row in rows)  # a random model answers wrong: "no", never 0.00
    answers = lines[lines.index("answers:") + 1:]
    assert answers[0].split()[0] == "full" and all(len(line) <= WIDTH for line in answers)


def test_wrapped_answers_keep_every_word():
    answer = "The pass key is 71432. " * 20 + "\nsecond line"
    text = wrapped_answers({"full": answer, "namm": ""}, width=60)
    assert all(len(line) <= 60 for line in text.splitlines())
    body = " ".join(line.split(maxsplit=1)[1] if line.startswith("  full") else line for line in text.splitlines()
                    if not line.startswith("  namm"))
    assert body.split() == answer.split() and "(empty)" in text

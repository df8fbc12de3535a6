"""LongBench JSONL loading, prompt/length/metric tables, first-line scoring and middle truncation (§6)."""

import json
import sys

import pytest

from namm_transfer.evals.longbench import (
    FIRST_LINE_TASKS,
    MAX_NEW_TOKENS,
    PROMPTS,
    TASK_METRIC,
    TASKS,
    LongBenchFileError,
    fit_prompt,
    load_longbench,
    load_task,
    task_file,
    truncate_middle,
)
from namm_transfer.evals.metrics import METRICS

SPEC_MAXLEN = {  # namm-spec.md §6
    128: ["narrativeqa", "qasper", "dureader", "samsum"],
    64: ["multifieldqa_en", "multifieldqa_zh", "trec", "lsht", "lcc", "repobench-p"],
    32: ["hotpotqa", "2wikimqa", "musique", "triviaqa", "passage_count", "passage_retrieval_en",
         "passage_retrieval_zh"],
    512: ["gov_report", "qmsum", "multi_news", "vcsum"],
}


def record(i, **extra):
    base = {"input": f"question {i}?", "context": f"context {i} with {{braces}}", "answers": [f"answer {i}"],
            "all_classes": None, "length": 5, "_id": f"id{i}"}
    return {**base, **extra}


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_tables_cover_the_21_tasks_with_the_official_lengths_and_metrics():
    assert len(TASKS) == 21
    assert set(PROMPTS) == set(MAX_NEW_TOKENS) == set(TASK_METRIC) == set(TASKS)
    assert {t: MAX_NEW_TOKENS[t] for ts in SPEC_MAXLEN.values() for t in ts} == MAX_NEW_TOKENS
    assert all(MAX_NEW_TOKENS[t] == n for n, ts in SPEC_MAXLEN.items() for t in ts)
    assert all(TASK_METRIC[t] in METRICS for t in TASKS)
    assert all("{context}" in p for p in PROMPTS.values())
    assert TASK_METRIC["passage_retrieval_en"] == "retrieval" and TASK_METRIC["lcc"] == "code_sim"
    assert TASK_METRIC["trec"] == TASK_METRIC["lsht"] == "classification"
    assert FIRST_LINE_TASKS == {"trec", "triviaqa", "samsum", "lsht"}


def test_loads_records_as_text_items_with_the_official_prompt(tmp_path):
    write_jsonl(tmp_path / "hotpotqa.jsonl", [record(0), record(1)])
    items = load_task(tmp_path, "hotpotqa")
    assert [i.item_id for i in items] == ["id0", "id1"]
    item = items[0]
    assert item.prompt == (
        "Answer the question based on the given passages. Only give me the answer and do not output any other "
        "words.\n\nThe following are given passages.\ncontext 0 with {braces}\n\nAnswer the question based on "
        "the given passages. Only give me the answer and do not output any other words.\n\nQuestion: "
        "question 0?\nAnswer:"
    )
    assert (item.metric, item.max_new_tokens, item.split, item.depth) == ("qa_f1", 32, "test", None)
    assert item.score("Answer 0.") == 1.0
    assert load_task(tmp_path, "hotpotqa", limit=1) == items[:1]


def test_data_subfolder_blank_lines_and_several_tasks(tmp_path):
    write_jsonl(tmp_path / "data" / "passage_retrieval_en.jsonl", [record(0, answers=["Paragraph 4"])])
    (tmp_path / "data" / "passage_count.jsonl").write_text(json.dumps(record(1, answers=["7"])) + "\n\n")
    assert task_file(tmp_path, "passage_count") == tmp_path / "data" / "passage_count.jsonl"
    items = load_longbench(tmp_path, ["passage_retrieval_en", "passage_count"])
    assert [i.task for i in items] == ["passage_retrieval_en", "passage_count"]
    assert items[0].prompt.endswith('"Paragraph 1", "Paragraph 2", etc.\n\nThe answer is: ')
    assert items[0].score("Paragraph 4 or 5") == 0.5
    assert items[1].score("There are 7 unique paragraphs.") == 1.0


def test_classification_items_keep_classes_and_score_the_first_line(tmp_path):
    classes = ["Location", "Human being", "Numeric value"]
    write_jsonl(tmp_path / "trec.jsonl", [record(0, answers=["Location"], all_classes=classes)])
    (item,) = load_task(tmp_path, "trec")
    assert item.all_classes == classes and item.first_line_only and item.max_new_tokens == 64
    assert item.score("\nLocation\nQuestion: who? Type: Human being") == 1.0
    assert item.score("Location or Human being") == 0.5
    write_jsonl(tmp_path / "lsht.jsonl", [record(0)])
    with pytest.raises(ValueError, match="lsht.jsonl:1: lsht records need all_classes"):
        load_task(tmp_path, "lsht")


def test_code_prompts_and_scores(tmp_path):
    write_jsonl(tmp_path / "repobench-p.jsonl", [record(0, context="import os\n", input="def f():\n",
                                                        answers=["    return os.getcwd()"])])
    (item,) = load_task(tmp_path, "repobench-p")
    assert item.prompt == "Please complete the code given below. \nimport os\ndef f():\nNext line of code:\n"
    assert item.score("# comment\n    return os.getcwd()\n") == 1.0
    write_jsonl(tmp_path / "lcc.jsonl", [record(0, context="x = 1\n", answers=["y = 2"])])
    assert load_task(tmp_path, "lcc")[0].prompt == "Please complete the code given below. \nx = 1\nNext line of code:\n"


def test_chinese_tasks_need_jieba_for_their_metrics(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "multifieldqa_zh.jsonl", [record(0, answers=["北京"])])
    (item,) = load_task(tmp_path, "multifieldqa_zh")
    assert item.prompt.startswith("阅读以下文字并用中文简短回答") and item.max_new_tokens == 64
    monkeypatch.setitem(sys.modules, "jieba", None)
    with pytest.raises(ImportError, match="install jieba for Chinese tasks"):
        item.score("北京")


def test_missing_folder_file_and_bad_lines_name_the_problem(tmp_path):
    with pytest.raises(LongBenchFileError, match="does not exist"):
        load_task(tmp_path / "nope", "qasper")
    with pytest.raises(ValueError, match=r"no qasper.jsonl in"):
        load_task(tmp_path, "qasper")
    with pytest.raises(ValueError, match="unknown LongBench task"):
        load_task(tmp_path, "squad")
    path = tmp_path / "qasper.jsonl"
    path.write_text(json.dumps(record(0)) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"qasper.jsonl:2: invalid JSON"):
        load_task(tmp_path, "qasper")
    write_jsonl(path, [record(0), {"input": "q", "answers": ["a"], "_id": "x"}])
    with pytest.raises(ValueError, match=r"qasper.jsonl:2: missing field\(s\) context"):
        load_task(tmp_path, "qasper")
    write_jsonl(path, [record(0, answers="a")])
    with pytest.raises(ValueError, match=r"qasper.jsonl:1: answers must be"):
        load_task(tmp_path, "qasper")


def test_truncate_middle_keeps_first_and_last_half():
    ids = list(range(10))
    assert truncate_middle(ids, 4) == [0, 1, 8, 9]
    assert truncate_middle(ids, 5) == [0, 1, 8, 9]  # odd budgets keep max_len - 1, as the official code
    assert truncate_middle(ids, 10) == ids
    with pytest.raises(ValueError, match="max_len"):
        truncate_middle(ids, 1)


class WordTokenizer:
    """Whitespace tokens; ids index a growing vocabulary."""

    def __init__(self):
        self.vocab: list[str] = []

    def encode(self, text, add_special_tokens=True):
        ids = []
        for word in text.split():
            if word not in self.vocab:
                self.vocab.append(word)
            ids.append(self.vocab.index(word))
        return ([999] if add_special_tokens else []) + ids

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(self.vocab[i] for i in ids if not (skip_special_tokens and i == 999))


def test_fit_prompt_decodes_the_two_halves_of_the_budget():
    tok = WordTokenizer()
    prompt = " ".join(f"w{i}" for i in range(20))
    assert fit_prompt(prompt, tok, 20) == prompt  # special tokens are not counted
    assert fit_prompt(prompt, tok, 6) == "w0 w1 w2" + "w17 w18 w19"

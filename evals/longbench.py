"""LongBench (Bai et al., "LongBench: A Bilingual, Multitask Benchmark for Long Context Understanding",
ACL 2024) from local JSONL files, with the official prompts, answer lengths, metrics and truncation.

The 21 tasks of ``THUDM/LongBench`` (docs/algorithm.md §6). Each file ``<dir>/<task>.jsonl`` or
``<dir>/data/<task>.jsonl`` holds one record per line with ``input``, ``context``, ``answers``,
``all_classes``, ``length`` and ``_id`` (the layout of the official ``data.zip``).

* :data:`PROMPTS` follows the official ``config/dataset2prompt.json`` word for word (checked against the
  public file, including its "asconcisely" typo in narrativeqa, which changes the tokens the model sees);
  filled with ``str.format(context=..., input=...)``, no chat template.
* :data:`MAX_NEW_TOKENS` is ``config/dataset2maxlen.json``.
* :data:`TASK_METRIC` maps each task to its metric in :mod:`namm_transfer.evals.metrics` as
  ``dataset2metric`` of the official ``eval.py`` does; the Chinese QA and summary metrics need jieba.
* :data:`FIRST_LINE_TASKS`: trec, triviaqa, samsum and lsht are scored on the first line of the output
  (the official scorer; samsum generation is also cut at a newline there, which the same rule covers).
* :func:`truncate_middle` / :func:`fit_prompt`: a prompt longer than the budget (counted without special
  tokens) keeps the first and last half of the budget; the halves are decoded, joined and re-tokenised
  by the caller.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from namm_transfer.evals.text_tasks import TextItem

_QA_EN = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other "
    "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. "
    "Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
)
_QASPER_RULE = (
    "as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered "
    'based on the information in the article, write "unanswerable". If the question is a yes/no question, answer '
    '"yes", "no", or "unanswerable". Do not provide any explanation.'
)

PROMPTS: dict[str, str] = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the "
    "question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\n"
    "Story: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single "
    "phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question " + _QASPER_RULE
    + "\n\nArticle: {context}\n\n Answer the question based on the above article " + _QASPER_RULE
    + "\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following "
    "question based on the above text, only give me the answer and do not output any other words.\n\n"
    "Question: {input}\nAnswer:",
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，"
    "不要输出任何其他字词。\n\n问题：{input}\n回答：",
    "hotpotqa": _QA_EN,
    "2wikimqa": _QA_EN,
    "musique": _QA_EN,
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\n"
    "Report:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the "
    "query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above "
    "meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n"
    "{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n"
    "{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any "
    "other words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n"
    "{context}\n\n{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. "
    "Please carefully read these paragraphs and determine how many unique paragraphs there are after removing "
    "duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\n"
    "Please enter the final count of unique paragraphs after removing duplicates. The output format should "
    "only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine "
    "which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\n"
    'Please enter the number of the paragraph that the abstract is from. The answer format must be like '
    '"Paragraph 1", "Paragraph 2", etc.\n\nThe answer is: ',
    "passage_retrieval_zh": "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n"
    '下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：',
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
"""Task -> prompt template with ``{context}`` and ``{input}`` (official dataset2prompt.json)."""

MAX_NEW_TOKENS: dict[str, int] = {
    **dict.fromkeys(("narrativeqa", "qasper", "dureader", "samsum"), 128),
    **dict.fromkeys(("multifieldqa_en", "multifieldqa_zh", "trec", "lsht", "lcc", "repobench-p"), 64),
    **dict.fromkeys(("hotpotqa", "2wikimqa", "musique", "triviaqa", "passage_count", "passage_retrieval_en",
                     "passage_retrieval_zh"), 32),
    **dict.fromkeys(("gov_report", "qmsum", "multi_news", "vcsum"), 512),
}
"""Task -> max_new_tokens (official dataset2maxlen.json, docs/algorithm.md §6)."""

TASK_METRIC: dict[str, str] = {
    **dict.fromkeys(("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "triviaqa"),
                    "qa_f1"),
    "multifieldqa_zh": "qa_f1_zh",
    **dict.fromkeys(("gov_report", "qmsum", "multi_news", "samsum"), "rouge_l"),
    **dict.fromkeys(("dureader", "vcsum"), "rouge_l_zh"),
    **dict.fromkeys(("trec", "lsht"), "classification"),
    "passage_retrieval_en": "retrieval",
    "passage_retrieval_zh": "retrieval_zh",
    "passage_count": "count",
    **dict.fromkeys(("lcc", "repobench-p"), "code_sim"),
}
"""Task -> metric name of :data:`namm_transfer.evals.metrics.METRICS` (official dataset2metric)."""

TASKS: tuple[str, ...] = tuple(PROMPTS)
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})
_REQUIRED = ("input", "context", "answers", "_id")


class LongBenchFileError(FileNotFoundError, ValueError):
    """A LongBench folder or task file that does not exist or is not UTF-8 text."""


def task_file(data_dir: str | Path, task: str) -> Path:
    """``<dir>/<task>.jsonl`` if present, else ``<dir>/data/<task>.jsonl``; errors name what is missing."""
    if task not in PROMPTS:
        raise ValueError(f"unknown LongBench task {task!r}; known: {', '.join(TASKS)}")
    root = Path(data_dir)
    if not root.is_dir():
        raise LongBenchFileError(f"LongBench folder {root} does not exist")
    for candidate in (root / f"{task}.jsonl", root / "data" / f"{task}.jsonl"):
        if candidate.is_file():
            return candidate
    raise LongBenchFileError(f"no {task}.jsonl in {root} or {root / 'data'}")


def _record_item(task: str, record: dict, where: str) -> TextItem:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in _REQUIRED if key not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
    answers = record["answers"]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{where}: answers must be a non-empty list of strings")
    all_classes = record.get("all_classes") or []
    if TASK_METRIC[task] == "classification" and not all_classes:
        raise ValueError(f"{where}: {task} records need all_classes")
    return TextItem(
        task=task,
        item_id=str(record["_id"]),
        prompt=PROMPTS[task].format(context=record["context"], input=record["input"]),
        answers=list(answers),
        metric=TASK_METRIC[task],
        max_new_tokens=MAX_NEW_TOKENS[task],
        depth=None,
        seed=None,
        split="test",
        all_classes=list(all_classes),
        first_line_only=task in FIRST_LINE_TASKS,
    )


def load_task(data_dir: str | Path, task: str, limit: int | None = None) -> list[TextItem]:
    """The items of one task in file order (the first ``limit`` if given); blank lines are skipped.

    Raises LongBenchFileError for a missing folder or file, or a line that is not UTF-8, and ValueError naming
    file and line for a line that is not JSON or lacks a field.
    """
    path = task_file(data_dir, task)
    items: list[TextItem] = []
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if limit is not None and len(items) >= limit:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise LongBenchFileError(
                    f"{path}:{line_no}: not UTF-8 text (byte {raw[err.start]:#04x} at column {err.start + 1}); "
                    "LongBench files are UTF-8 JSON lines"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({err.msg})") from None
            items.append(_record_item(task, record, f"{path}:{line_no}"))
    return items


def load_longbench(data_dir: str | Path, tasks: Sequence[str] = TASKS, limit: int | None = None) -> list[TextItem]:
    """The items of several tasks, task after task (all 21 by default)."""
    return [item for task in tasks for item in load_task(data_dir, task, limit)]


def truncate_middle(token_ids: Sequence[int], max_len: int) -> list[int]:
    """Keep the first and last ``max_len // 2`` ids if there are more than ``max_len`` (docs/algorithm.md §6).

    As in the official pred.py an odd ``max_len`` keeps ``max_len - 1`` ids.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    ids = list(token_ids)
    if len(ids) <= max_len:
        return ids
    half = max_len // 2
    return ids[:half] + ids[-half:]


def fit_prompt(prompt: str, tokenizer, max_len: int) -> str:
    """``prompt`` if it has at most ``max_len`` tokens (no special tokens), else the decoded first and last
    halves of the budget joined (the caller re-tokenises). ``tokenizer`` needs ``encode(text,
    add_special_tokens=False)`` and ``decode(ids, skip_special_tokens=True)``."""
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    if len(ids) <= max_len:
        return prompt
    half = max_len // 2
    kept = truncate_middle(ids, max_len)
    return tokenizer.decode(kept[:half], skip_special_tokens=True) + tokenizer.decode(
        kept[half:], skip_special_tokens=True
    )

"""Answer metrics: the official LongBench metrics and those of the built-in text tasks (namm-spec.md §6).

The LongBench metrics are re-implemented from the definitions in THUDM/LongBench (``metrics.py`` and
``eval.py``), not copied:

* ``qa_f1``: token F1 between the normalised prediction and answer (lower case, ASCII punctuation and the
  articles a/an/the removed, whitespace collapsed).
* ``qa_f1_zh``: the same over jieba tokens, each normalised (Chinese and ASCII punctuation and all
  whitespace removed; empty tokens dropped).
* ``rouge_l``: ROUGE-L F1 from the longest common subsequence of whitespace tokens, case-sensitive, with
  ``.`` treated as a separator. The official scorer calls the ``rouge`` package, whose summary-level
  ROUGE-L splits sentences at ``.`` and takes a union LCS per reference sentence with unique-word
  denominators; on one-sentence texts with distinct words both agree, on long summaries this plain LCS
  F1 is close but not identical. An empty prediction or answer scores 0 (the official scorer catches the
  package's error and returns 0).
* ``rouge_l_zh``: ``rouge_l`` over space-joined jieba tokens.
* ``classification``: the classes of ``all_classes`` found as substrings of the prediction; a matched
  class that is a proper substring of the answer is dropped; score = 1 / #remaining if the answer
  remains, else 0. The official loop removes items from the list it iterates, so the class right after a
  dropped one is never examined; that quirk is reproduced so that scores match the reference numbers.
* ``retrieval`` / ``retrieval_zh``: the answer names a paragraph ("Paragraph 12" / "段落12"); score = the
  fraction of the integers in the prediction that equal its number (0 when the prediction has none).
* ``count``: the fraction of the integers in the prediction equal to the answer.
* ``code_sim``: fuzzywuzzy's ``fuzz.ratio`` between the answer and the first line of the prediction
  (leading newlines stripped) that holds no "`", "#" or "//" (empty if none), divided by 100. The ratio
  is ``round(100 * 2 * M / T)`` from :class:`difflib.SequenceMatcher` (M matched characters, T total
  length), which is what fuzzywuzzy computes without python-Levenshtein; equal strings give 100 and an
  empty string against a non-empty one gives 0.

For the built-in tasks (:mod:`namm_transfer.evals.text_tasks`):

* ``exact_match``: normalised prediction equals the normalised answer.
* ``contains``: the normalised answer occurs in the normalised prediction as whole words (so "71432"
  is not found in "714321"); RULER's string match, made boundary-safe.
* ``recall_fraction`` / ``recall_all``: the answers form one set (every variable name of a chain in
  variable tracking) instead of alternatives: the fraction of them the prediction contains as whole
  words (RULER ``string_match_all``), or 1 only when it contains all of them.

Every metric of :data:`METRICS` has the signature ``metric(prediction, answers, *, all_classes=())`` and
returns a value in [0, 1]. All but the recall metrics take the maximum over the ground truths, as
LongBench does per prompt; a task's score is 100 times the mean over its prompts.
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from typing import Callable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCT = frozenset(string.punctuation)
_ZH_PUNCT = frozenset(
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
) | _ASCII_PUNCT
_INTEGER = re.compile(r"\d+")


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation, replace the articles a/an/the by spaces, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _ASCII_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Lower-case, drop Chinese and ASCII punctuation and every whitespace character (LongBench zh)."""
    return "".join(ch for ch in text.lower() if ch not in _ZH_PUNCT and not ch.isspace())


def _jieba_tokens(text: str) -> list[str]:
    try:
        import jieba
    except ImportError as err:
        raise ModuleNotFoundError("install jieba for Chinese tasks (pip install jieba)", name="jieba") from err
    return list(jieba.cut(text, cut_all=False))


def _token_f1(prediction_tokens: Sequence[str], answer_tokens: Sequence[str]) -> float:
    same = sum((Counter(prediction_tokens) & Counter(answer_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(prediction_tokens)
    recall = same / len(answer_tokens)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, O(len(a) * len(b)) time, O(len(b)) memory."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def _rouge_l_single(prediction: str, answer: str) -> float:
    pred = prediction.replace(".", " ").split()
    ref = answer.replace(".", " ").split()
    if not pred or not ref:
        return 0.0
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def _fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy ``fuzz.ratio`` on difflib: round(100 * 2M / T), 100 for equal strings, 0 if one is empty."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return round(100 * difflib.SequenceMatcher(None, a, b).ratio())


def _integer_share(prediction: str, target: str) -> float:
    numbers = _INTEGER.findall(prediction)
    if not numbers:
        return 0.0
    return sum(number == target for number in numbers) / len(numbers)


def _paragraph_number(answer: str, pattern: str) -> str:
    found = re.findall(pattern, answer)
    if not found:
        raise ValueError(f"retrieval answer {answer!r} names no paragraph (expected {pattern!r})")
    return found[0]


def _first_code_line(prediction: str) -> str:
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def _whole_words(needle: str, haystack: str) -> bool:
    return bool(needle) and re.search(r"(?<!\w)" + re.escape(needle) + r"(?!\w)", haystack) is not None


def _best(per_answer: Callable[[str, str], float], prediction: str, answers: Sequence[str]) -> float:
    if isinstance(answers, str) or not answers:
        raise ValueError(f"answers must be a non-empty list of strings, got {answers!r}")
    return max(per_answer(prediction, answer) for answer in answers)


def qa_f1(prediction: str, answers: Sequence[str], *, all_classes: Sequence[str] = ()) -> float:
    """Token F1 of the normalised strings, max over answers (LongBench ``qa_f1_score``)."""
    return _best(lambda p, a: _token_f1(normalize_answer(p).split(), normalize_answer(a).split()), prediction, answers)


def qa_f1_zh(prediction: str, answers: Sequence[str], *, all_classes: Sequence[str] = ()) -> float:
    """Token F1 over normalised jieba tokens, max over answers (LongBench ``qa_f1_zh_score``)."""

    def tokens(text: str) -> list[str]:
        return [t for t in (normalize_zh_answer(tok) for tok in _jieba_tokens(text)) if t]

    return _best(lambda p, a: _token_f1(tokens(p), tokens(a)), prediction, answers)


def rouge_l(prediction: str, answers: Sequence[str], *, all_classes: Sequence[str] = ()) -> float:
    """ROUGE-L F1 (LCS of whitespace tokens), max over answers (LongBench ``rouge_score``)."""
    return _best(_rouge_l_single, prediction, answers)


def rouge_l_zh(prediction: str, answers: Sequence[str], *, all_classes: Sequence[str] = ()) -> float:
    """ROUGE-L F1 over jieba tokens, max over answers (LongBench ``rouge_zh_score``)."""
    return _best(
        lambda p, a: _rouge_l_single(" ".join(_jieba_tokens(p)), " ".join(_jieba_tokens(a))), prediction, answers
    )


def classification(prediction: str, answers: Sequence[str], *, all_classes: Sequence[str] = ()) -> float:
    """1 / #matched classes if the answer is among the classes found in the prediction, max over answers
    (LongBench ``classification_score``, list-mutation quirk included; see the module docstring)."""
    if not all_classes:
        raise ValueError("classification needs the task's all_classes")

    def single(pred: str, answer: str) -> float:
        remaining: list[str] = []
        skip_next = False
        for name in (c for c in all_classes if c in pred):
            if skip_next:
                remaining.append(name)
                skip_next = False
            elif name in answer and name != answer:
                skip_next = True
            else:
                remaining.append(name)
        return 1.0 / len(remaining) if answer in remaining else 0.0

    return _best(single, prediction, answers)


def retrieval(prediction: str, answers: Sequence[str], *, all_classes: Sequence[str] = ()) -> float:
    """Share of integers in the prediction equal to the "Paragraph N" of the answer, max over answers."""
    return _best(lambda p, a: _integer_share(p, _paragraph_number(a, r"Paragraph (\d+)")), prediction, answers)


def retrieval_zh(prediction: str, answers: Sequence[str], *, all_classes: Sequence[str] = ()) -> float:
    """Share of integers in the prediction equal to the "段落N" of the answer, max over answers."""
    return _best(lambda p, a: _integer_share(p, _paragraph_number(a, r"段落(\d+)")), prediction, answers)


def count(prediction: str, answers: Sequence[str], *, all_classes: Sequence[str] = ()) -> float:
    """Share of integers in the prediction equal to the answer, max over answers (LongBench ``count_score``)."""
    return _best(_integer_share, prediction, answers)


def code_sim(prediction: str, answers: Sequence[str], *, all_classes: Sequence[str] = ()) -> float:
    """fuzz.ratio / 100 of the first non-comment line and the answer, max over answers (``code_sim_score``)."""
    return _best(lambda p, a: _fuzz_ratio(_first_code_line(p), a) / 100, prediction, answers)


def exact_match(prediction: str, answers: Sequence[str], *, all_classes: Sequence[str] = ()) -> float:
    """1 if the normalised prediction equals a normalised answer."""
    return _best(lambda p, a: float(normalize_answer(p) == normalize_answer(a)), prediction, answers)


def contains(prediction: str, answers: Sequence[str], *, all_classes: Sequence[str] = ()) -> float:
    """1 if a normalised answer occurs as whole words in the normalised prediction."""
    return _best(lambda p, a: float(_whole_words(normalize_answer(a), normalize_answer(p))), prediction, answers)


def _recalled(prediction: str, answers: Sequence[str]) -> list[bool]:
    if isinstance(answers, str) or not answers:
        raise ValueError(f"answers must be a non-empty list of strings, got {answers!r}")
    pred = normalize_answer(prediction)
    return [_whole_words(normalize_answer(a), pred) for a in answers]


def recall_fraction(prediction: str, answers: Sequence[str], *, all_classes: Sequence[str] = ()) -> float:
    """Fraction of the answers (a set, not alternatives) found as whole words in the prediction."""
    found = _recalled(prediction, answers)
    return sum(found) / len(found)


def recall_all(prediction: str, answers: Sequence[str], *, all_classes: Sequence[str] = ()) -> float:
    """1 if every answer (a set, not alternatives) is found as whole words in the prediction, else 0."""
    return float(all(_recalled(prediction, answers)))


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1,
    "qa_f1_zh": qa_f1_zh,
    "rouge_l": rouge_l,
    "rouge_l_zh": rouge_l_zh,
    "classification": classification,
    "retrieval": retrieval,
    "retrieval_zh": retrieval_zh,
    "count": count,
    "code_sim": code_sim,
    "exact_match": exact_match,
    "contains": contains,
    "recall_fraction": recall_fraction,
    "recall_all": recall_all,
}
"""Metric name -> ``metric(prediction, answers, *, all_classes=()) -> float in [0, 1]``."""


def score(metric: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] = ()) -> float:
    """Look up ``metric`` in :data:`METRICS` and apply it; unknown names raise a ValueError listing them."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(sorted(METRICS))}")
    return METRICS[metric](prediction, answers, all_classes=all_classes)

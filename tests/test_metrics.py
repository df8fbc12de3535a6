"""LongBench and built-in metrics against hand-computed values (namm-spec.md §6)."""

import sys

import pytest

from namm_transfer.evals.metrics import (
    METRICS,
    classification,
    code_sim,
    contains,
    count,
    exact_match,
    normalize_answer,
    normalize_zh_answer,
    qa_f1,
    qa_f1_zh,
    recall_all,
    recall_fraction,
    retrieval,
    retrieval_zh,
    rouge_l,
    rouge_l_zh,
    score,
)


def test_normalize_answer_lowercases_strips_punctuation_articles_and_spaces():
    assert normalize_answer("The  Cat, sat on a MAT!") == "cat sat on mat"
    assert normalize_answer("Theory of an apple") == "theory of apple"


def test_normalize_zh_answer_drops_chinese_punctuation_and_all_spaces():
    assert normalize_zh_answer("北京， 是 首都。") == "北京是首都"


def test_qa_f1_hand_value_and_max_over_answers():
    # tokens [cat, sat] vs [cat, sat, down]: P = 1, R = 2/3, F1 = 0.8
    assert qa_f1("The cat sat", ["cat sat down"]) == pytest.approx(0.8)
    assert qa_f1("cat", ["dog", "the cat"]) == 1.0
    assert qa_f1("bird", ["dog", "cat"]) == 0.0
    # tokens count with multiplicity: [x, x] vs [x] share one: P = 1/2, R = 1, F1 = 2/3
    assert qa_f1("x x", ["x"]) == pytest.approx(2 / 3)


def test_rouge_l_hand_values():
    # LCS "the cat on the mat" = 5 of 6 tokens each side
    assert rouge_l("the cat sat on the mat", ["the cat lay on the mat"]) == pytest.approx(5 / 6)
    # LCS [b, d]: P = 2/4, R = 2/3, F = 4/7
    assert rouge_l("a b c d", ["b d e"]) == pytest.approx(4 / 7)
    assert rouge_l("cat sat. dog", ["cat sat dog"]) == pytest.approx(1.0)
    assert rouge_l("Cat", ["cat"]) == 0.0  # case-sensitive like the rouge package
    assert rouge_l("", ["cat"]) == 0.0
    assert rouge_l("x y", ["q", "x y"]) == 1.0


TREC_LIKE = ["Human", "Human being", "Location"]


def test_classification_scores_one_over_matched_classes():
    assert classification("Human being", ["Human being"], all_classes=TREC_LIKE) == 1.0
    assert classification("Human being or Location", ["Human being"], all_classes=TREC_LIKE) == 0.5
    assert classification("Location", ["Human being"], all_classes=TREC_LIKE) == 0.0


def test_classification_reproduces_the_official_list_mutation_quirk():
    # "Hu" is dropped (substring of the answer) and the official loop then skips "Human", which stays
    classes = ["Hu", "Human", "Human being"]
    assert classification("Human being", ["Human being"], all_classes=classes) == 0.5


def test_classification_needs_all_classes():
    with pytest.raises(ValueError, match="all_classes"):
        classification("x", ["x"])


def test_retrieval_fraction_of_numbers_equal_to_the_paragraph():
    assert retrieval("Paragraph 3", ["Paragraph 3"]) == 1.0
    assert retrieval("The answer is Paragraph 3", ["Paragraph 3"]) == 1.0
    assert retrieval("Paragraph 3 or 4", ["Paragraph 3"]) == 0.5
    assert retrieval("Paragraph 13", ["Paragraph 3"]) == 0.0
    assert retrieval("no idea", ["Paragraph 3"]) == 0.0
    assert retrieval_zh("答案是段落5", ["段落5"]) == 1.0
    with pytest.raises(ValueError, match="names no paragraph"):
        retrieval("3", ["3"])


def test_count_fraction_of_numbers_equal_to_the_answer():
    assert count("There are 12 unique paragraphs.", ["12"]) == 1.0
    assert count("12 or 13", ["12"]) == 0.5
    assert count("twelve", ["12"]) == 0.0


def test_code_sim_uses_first_non_comment_line_and_difflib_ratio():
    assert code_sim("x = foo(1)", ["x = foo(1)"]) == 1.0
    # "abcd" vs "abce": M = 3 matched characters, T = 8 -> round(100 * 6 / 8) / 100
    assert code_sim("abcd", ["abce"]) == 0.75
    assert code_sim("\n\n# a comment\n```python\n// note\nx = 1\ny = 2", ["x = 1"]) == 1.0
    assert code_sim("# only comments", ["x = 1"]) == 0.0
    assert code_sim("zzz", ["qqq"]) == 0.0


def test_exact_match_and_contains():
    assert exact_match("The Pass key.", ["pass key"]) == 1.0
    assert exact_match("pass key 1", ["pass key"]) == 0.0
    assert contains("The pass key is 71432.", ["71432"]) == 1.0
    assert contains("The pass key is 714321.", ["71432"]) == 0.0
    assert contains("nothing", ["1", "nothing"]) == 1.0


def test_recall_metrics_treat_answers_as_one_set():
    names = ["ABCDE", "FGHIJ", "KLMNO"]
    assert recall_fraction("ABCDE and KLMNO", names) == pytest.approx(2 / 3)
    assert recall_fraction("ABCDEX FGHIJK", names) == 0.0
    assert recall_all("KLMNO FGHIJ ABCDE", names) == 1.0
    assert recall_all("KLMNO FGHIJ", names) == 0.0


def test_chinese_metrics_ask_for_jieba_when_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "jieba", None)
    for metric in (qa_f1_zh, rouge_l_zh):
        with pytest.raises(ImportError, match="install jieba for Chinese tasks"):
            metric("北京", ["北京"])


def test_registry_dispatch_bounds_and_errors():
    samples = {
        "qa_f1": ("a b", ["b c"]),
        "rouge_l": ("a b", ["b c"]),
        "retrieval": ("Paragraph 2 3", ["Paragraph 2"]),
        "count": ("4", ["4"]),
        "code_sim": ("x", ["y"]),
        "exact_match": ("x", ["x"]),
        "contains": ("x", ["y"]),
        "recall_fraction": ("x", ["x", "y"]),
        "recall_all": ("x", ["x", "y"]),
    }
    for name, (pred, answers) in samples.items():
        assert 0.0 <= score(name, pred, answers) <= 1.0
    assert score("classification", "Location", ["Location"], TREC_LIKE) == 1.0
    assert set(samples) | {"classification", "qa_f1_zh", "rouge_l_zh", "retrieval_zh"} == set(METRICS)
    with pytest.raises(ValueError, match="unknown metric"):
        score("bleu", "x", ["x"])
    with pytest.raises(ValueError, match="non-empty list"):
        qa_f1("x", "x")
    with pytest.raises(ValueError, match="non-empty list"):
        recall_fraction("x", [])

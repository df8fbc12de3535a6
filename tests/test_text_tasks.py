"""Built-in long-context tasks: length control, needle placement, answer correctness, split separation."""

import dataclasses
import json
import re

import pytest

from namm_transfer.evals import text_tasks
from namm_transfer.evals.text_tasks import (
    HELDOUT_SEED_OFFSET,
    TASKS,
    TextItem,
    build_suite,
    internal_seed,
    make_item,
    token_counter,
)


def words(text: str) -> int:
    return len(text.split())


def chars(text: str) -> int:
    return (len(text) + 3) // 4


def context_of(item: TextItem) -> str:
    """The text between the introduction and the question."""
    return item.prompt.split("\n\n", 1)[1].rsplit("\n\n", 1)[0]


@pytest.mark.parametrize("counter", [words, chars])
@pytest.mark.parametrize("split", ["train", "heldout"])
@pytest.mark.parametrize("task", TASKS)
def test_prompt_reaches_target_length_from_below(task, split, counter):
    target = 3000
    item = make_item(task, 7, target, 0.5, counter, split)
    assert 0.98 * target <= counter(item.prompt) <= target
    assert item.split == split and item.seed == 7 and item.depth == 0.5
    assert item.score(" ".join(item.answers)) == 1.0
    assert item.score("I do not know.") == 0.0


def test_length_search_counts_tokens_a_handful_of_times():
    calls = []

    def counting(text):
        calls.append(1)
        return words(text)

    make_item("passkey", 1, 20_000, 0.3, counting, "train")
    assert len(calls) <= 12


def test_token_counter_uses_encode_without_special_tokens():
    class Tok:
        def encode(self, text, add_special_tokens=True):
            return [0] * (len(text.split()) + (1 if add_special_tokens else 0))

    assert token_counter(Tok())("a b c") == 3


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_items_are_deterministic_and_depend_on_seed(split):
    a = make_item("multikey_needle", 3, 800, 0.25, words, split)
    b = make_item("multikey_needle", 3, 800, 0.25, words, split)
    c = make_item("multikey_needle", 4, 800, 0.25, words, split)
    assert a == b
    assert a.prompt != c.prompt and a.answers != c.answers


def test_same_seed_keeps_needles_across_depth_and_length():
    shallow = make_item("passkey", 2, 600, 0.0, words, "train")
    deep = make_item("passkey", 2, 1500, 1.0, words, "train")
    assert shallow.answers == deep.answers


def test_passkey_needle_lands_at_the_requested_depth():
    needle = "The pass key is {}. Remember it."
    start = make_item("passkey", 5, 2000, 0.0, words, "train")
    end = make_item("passkey", 5, 2000, 1.0, words, "train")
    middle = make_item("passkey", 5, 2000, 0.5, words, "train")
    assert context_of(start).startswith(needle.format(start.answers[0]))
    assert context_of(end).endswith(needle.format(end.answers[0]))
    body = context_of(middle)
    assert abs(body.index(needle.format(middle.answers[0])) / len(body) - 0.5) < 0.03
    assert middle.prompt.endswith("What is the pass key? Answer with the number only.")


def test_filler_uses_several_sentence_templates():
    item = make_item("passkey", 0, 1000, 0.5, words, "train")
    pool = sorted({w for ws in text_tasks._TRAIN.filler_words.values() for w in ws}, key=len, reverse=True)
    slot = re.compile("|".join(re.escape(w) for w in pool))
    sentences = re.split(r"(?<=\.) ", context_of(item))
    skeletons = {slot.sub("{}", s) for s in sentences if "pass key" not in s and s != "Remember it."}
    templates = {re.sub(r"\{\w+\}", "{}", t) for t in text_tasks._TRAIN.filler_templates}
    assert skeletons <= templates
    assert len(skeletons) >= 4


def test_multikey_question_asks_one_of_several_needles():
    item = make_item("multikey_needle", 9, 1500, 0.4, words, "train")
    needles = dict(re.findall(r"One of the special magic numbers for (\w+) is: (\d{7})\.", item.prompt))
    asked = re.search(r"magic number for (\w+) mentioned", item.prompt).group(1)
    assert len(needles) == 4
    assert item.answers == [needles[asked]]


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_kv_retrieval_context_is_json_and_answer_is_the_value_of_the_asked_key(split):
    item = make_item("kv_retrieval", 2, 1500, 0.7, words, split)
    block = context_of(item).split("\n\n", 1)[1]
    pairs = json.loads(block)
    mapping = pairs if split == "train" else dict(pairs)
    asked = re.search(r'"([0-9a-f-]{36})"', item.prompt.rsplit("\n\n", 1)[1]).group(1)
    assert len(mapping) > 20
    assert item.answers == [mapping[asked]]
    keys = list(mapping)
    assert abs(keys.index(asked) / len(keys) - 0.7) < 0.05


def resolve_chains(prompt: str, assign: str, copy: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in re.split(r"(?<=\.) ", prompt):
        if m := re.fullmatch(assign, line):
            values[m.group(1)] = m.group(2)
        elif m := re.fullmatch(copy, line):
            values[m.group(1)] = values[m.group(2)]
    return values


@pytest.mark.parametrize(
    "split,assign,copy",
    [
        ("train", r"VAR (\w+) = (\d+)\.", r"VAR (\w+) = VAR (\w+)\."),
        ("heldout", r"LET (\w+) := (\d+)\.", r"LET (\w+) := (\w+)\."),
    ],
)
def test_variable_tracking_answer_is_exactly_the_chain_holding_the_value(split, assign, copy):
    item = make_item("variable_tracking", 11, 1200, 0.2, words, split)
    values = resolve_chains(context_of(item), assign, copy)
    asked = re.search(r"(\d{5})", item.prompt.rsplit("\n\n", 1)[1]).group(1)
    assert sorted(item.answers) == sorted(name for name, v in values.items() if v == asked)
    assert len(item.answers) == 4 and len(values) == 8
    assert item.score(" ".join(item.answers[:2])) == 0.5


def test_two_hop_needs_both_facts_placed_half_the_context_apart():
    item = make_item("two_hop", 4, 2000, 0.2, words, "train")
    body = context_of(item)
    lockers = dict(re.findall(r"(\w+)'s locker number is (\d+)\.", body))
    holders = dict(re.findall(r"The ([\w ]+?) is in (\w+)'s locker\.", body))
    thing = re.search(r"locker that holds the ([\w ]+)\?", item.prompt).group(1)
    owner = holders[thing]
    assert len(lockers) == 3 and len(holders) == 2
    assert item.answers == [lockers[owner]]
    first = body.index(f"{owner}'s locker number is") / len(body)
    second = body.index(f"The {thing} is in") / len(body)
    assert first == pytest.approx(0.1, abs=0.03) and second == pytest.approx(0.6, abs=0.03)


def sentences_of(item: TextItem) -> set[str]:
    parts = re.split(r"(?<=[.?:])\s+|\n+", item.prompt)
    return {re.sub(r"\d+|[0-9a-f]{8}-[0-9a-f-]{27}|[A-Z]{5}", "#", p) for p in parts if p}


@pytest.mark.parametrize("task", TASKS)
def test_train_and_heldout_share_no_sentence(task):
    train = set().union(*(sentences_of(make_item(task, s, 700, 0.5, words, "train")) for s in range(3)))
    heldout = set().union(*(sentences_of(make_item(task, s, 700, 0.5, words, "heldout")) for s in range(3)))
    assert not train & heldout, train & heldout


def test_split_text_pools_are_disjoint():
    train, heldout = text_tasks._TRAIN, text_tasks._HELDOUT
    for f in dataclasses.fields(train):
        a, b = getattr(train, f.name), getattr(heldout, f.name)
        if isinstance(a, dict):
            assert not {w for v in a.values() for w in v} & {w for v in b.values() for w in v}
        elif isinstance(a, str) and f.name == "vt_letters":
            assert not set(a) & set(b)
        elif isinstance(a, tuple) and f.name != "kv_brackets":
            assert not set(a) & set(b), f.name
        elif f.name != "kv_brackets":
            assert a != b, f.name


def test_seed_ranges_keep_splits_apart():
    assert internal_seed(5, "train") == 5
    assert internal_seed(5, "heldout") == HELDOUT_SEED_OFFSET + 5
    with pytest.raises(ValueError, match="train seeds must be <"):
        make_item("passkey", HELDOUT_SEED_OFFSET, 500, 0.5, words, "train")
    with pytest.raises(ValueError, match="seed must be >= 0"):
        internal_seed(-1, "heldout")
    with pytest.raises(ValueError, match="split"):
        internal_seed(1, "test")


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown task"):
        make_item("sudoku", 0, 500, 0.5, words, "train")
    with pytest.raises(ValueError, match="depth"):
        make_item("passkey", 0, 500, 1.5, words, "train")
    with pytest.raises(ValueError, match="below the"):
        make_item("passkey", 0, 10, 0.5, words, "train")
    with pytest.raises(ValueError, match="does not grow"):
        make_item("passkey", 0, 500, 0.5, lambda text: 3, "train")


def test_build_suite_spreads_items_over_depths():
    depths = [0.0, 0.5, 1.0]
    suite = build_suite(["passkey", "two_hop"], "heldout", 4, 400, depths, words, seed=10)
    assert len(suite) == 8
    assert [i.depth for i in suite if i.task == "passkey"] == [0.0, 0.5, 1.0, 0.0]
    assert [i.seed for i in suite if i.task == "two_hop"] == [10, 11, 12, 13]
    assert len({i.item_id for i in suite}) == 8
    with pytest.raises(ValueError, match="depths"):
        build_suite(["passkey"], "train", 1, 400, [], words)


def test_text_item_validates_and_round_trips():
    item = make_item("passkey", 0, 300, 0.5, words, "train")
    assert TextItem.from_dict(json.loads(json.dumps(item.to_dict()))) == item
    with pytest.raises(ValueError, match="unknown metric"):
        dataclasses.replace(item, metric="bleu")
    with pytest.raises(ValueError, match="answers"):
        dataclasses.replace(item, answers=[])
    with pytest.raises(ValueError, match="unknown TextItem fields"):
        TextItem.from_dict({**item.to_dict(), "colour": "red"})
    first_line = dataclasses.replace(item, first_line_only=True)
    assert first_line.score(f"\n\nblah\n{item.answers[0]}") == 0.0
    assert first_line.score(f"\n{item.answers[0]}\nblah") == 1.0

"""Built-in long-context tasks, generated deterministically from a seed at a requested token length.

The tasks follow RULER (Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language
Models?", 2024) and the passkey test of Mohtashami & Jaggi ("Landmark Attention", 2023):

* ``passkey``: a five-digit pass key hidden in filler text; metric ``contains``.
* ``multikey_needle``: several "special magic number for <word>" needles (the others are distractors);
  the question asks for one word's seven-digit number; metric ``contains``.
* ``kv_retrieval``: a JSON-like collection of UUID-like key-value pairs (the pairs are the haystack); the
  question asks the value of the key placed at the requested depth; metric ``contains``.
* ``variable_tracking``: a chain of assignments (the first gives a five-digit value, each next one copies
  the previous variable) plus a distractor chain with another value, among filler; the answer is every
  name of the chain; metric ``recall_fraction`` (``recall_all`` is the all-or-nothing variant).
* ``two_hop``: "<name>'s locker number is N" and "The <thing> is in <name>'s locker" half the context
  apart, with distractor lockers; the question needs both facts; metric ``contains``.

Depth d in [0, 1] places the needle before the filler unit round(d * n) of n filler units (0 = at the
start, 1 = at the end). For ``variable_tracking`` the chain's hops start at d and are spread over [d, 1);
for ``two_hop`` the first fact sits at d / 2 and the second at (1 + d) / 2.

Splits. ``train`` and ``heldout`` share no seed and no text: each split has its own filler sentence
templates and words, needle sentences, names, objects, variable-name alphabet, key-value layout,
introductions, questions and answer instructions (:data:`_TRAIN` and :data:`_HELDOUT`). A train seed must
lie in [0, 10**6); a held-out seed s >= 0 is drawn internally as 10**6 + s, so the two never meet.

Length. :func:`make_item` adds filler units until the prompt is as long as possible without exceeding
``target_tokens`` by the given counter, i.e. within one filler unit (about 10-20 tokens) below the
target: within 2% from about 1,000 tokens on. It estimates the number of units from a probe, corrects it
with the measured rate, then steps one unit at a time, so a real tokenizer runs a handful of times per
item. A seed fixes every needle and the filler sequence, so the same seed at another depth or length only
moves the needles or lengthens the filler.

Every prompt is one user message: an introduction, the context, the question and a short-answer
instruction ("Answer with the number only." and the like).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Sequence

from namm_transfer.evals.metrics import METRICS, score

TASKS = ("passkey", "multikey_needle", "kv_retrieval", "variable_tracking", "two_hop")
SPLITS = ("train", "heldout")
HELDOUT_SEED_OFFSET = 10**6
"""Held-out seed s is drawn as HELDOUT_SEED_OFFSET + s; train seeds must be below it."""


@dataclass
class TextItem:
    """One prompt with its references, from a built-in task or a LongBench file.

    Attributes:
        task: task name ("passkey", "hotpotqa", ...).
        item_id: unique id within the task (a LongBench ``_id`` or one derived from seed, depth, length).
        prompt: the full user message: context, question and answer instruction.
        answers: ground truths; alternatives for most metrics, one set for the recall metrics.
        metric: a key of :data:`~namm_transfer.evals.metrics.METRICS`.
        max_new_tokens: generation budget.
        depth: needle depth in [0, 1], None where it does not apply (LongBench).
        seed: the seed the item was generated from (None for LongBench).
        split: "train", "heldout" or "test" (LongBench).
        all_classes: class names of a classification task (LongBench trec, lsht), else empty.
        first_line_only: score only the first line of the prediction after leading newlines (LongBench
            trec, triviaqa, samsum, lsht).
    """

    task: str
    item_id: str
    prompt: str
    answers: list[str]
    metric: str
    max_new_tokens: int
    depth: float | None
    seed: int | None
    split: str
    all_classes: list[str] = field(default_factory=list)
    first_line_only: bool = False

    def __post_init__(self) -> None:
        problems = []
        if not self.answers or not all(isinstance(a, str) for a in self.answers):
            problems.append(f"answers must be a non-empty list of strings, got {self.answers!r}")
        if self.metric not in METRICS:
            problems.append(f"unknown metric {self.metric!r}")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.depth is not None and not 0.0 <= self.depth <= 1.0:
            problems.append(f"depth must be in [0, 1] or None, got {self.depth}")
        if self.split not in (*SPLITS, "test"):
            problems.append(f"split must be 'train', 'heldout' or 'test', got {self.split!r}")
        if self.metric == "classification" and not self.all_classes:
            problems.append("a classification item needs all_classes")
        if problems:
            raise ValueError(f"invalid TextItem {self.item_id!r}: " + "; ".join(problems))

    def score(self, prediction: str) -> float:
        """The item's metric on ``prediction`` (first line only where set), in [0, 1]."""
        if self.first_line_only:
            prediction = prediction.lstrip("\n").split("\n")[0]
        return score(self.metric, prediction, self.answers, self.all_classes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TextItem":
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown TextItem fields: {', '.join(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class _SplitText:
    """Every piece of text a split draws from; the two instances share none of them."""

    intro: str
    filler_templates: tuple[str, ...]
    filler_words: dict[str, tuple[str, ...]]
    number_instruction: str
    passkey_needle: str
    passkey_question: str
    multikey_needle: str
    multikey_question: str
    multikey_words: tuple[str, ...]
    kv_intro: str
    kv_line: str
    kv_brackets: tuple[str, str]
    kv_question: str
    kv_instruction: str
    vt_assign: str
    vt_copy: str
    vt_letters: str
    vt_question: str
    vt_instruction: str
    hop_number_fact: str
    hop_place_fact: str
    hop_question: str
    hop_names: tuple[str, ...]
    hop_things: tuple[str, ...]


_TRAIN = _SplitText(
    intro="Below is a long text with some important information hidden inside it. Read it carefully; a question "
    "about it follows at the end.",
    filler_templates=(
        "The {noun} near the {place} looked {adj} that morning.",
        "A {adj} {noun} rested beside the {place} for most of the day.",
        "Someone said the {place} seemed {adj} after the rain.",
        "Every {day}, the {noun} by the {place} grew a little more {adj}.",
        "Nobody expected the {noun} in the {place} to be so {adj}.",
        "People walking past the {place} often stopped to look at the {adj} {noun}.",
    ),
    filler_words={
        "noun": ("lantern", "bicycle", "fence", "kettle", "sparrow", "ladder", "garden hose", "mailbox", "wagon"),
        "place": ("bakery", "river bank", "old mill", "train station", "orchard", "harbor", "market square"),
        "adj": ("quiet", "dusty", "bright", "crooked", "cheerful", "weathered", "tidy", "gloomy"),
        "day": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    },
    number_instruction="Answer with the number only.",
    passkey_needle="The pass key is {key}. Remember it.",
    passkey_question="What is the pass key?",
    multikey_needle="One of the special magic numbers for {word} is: {number}.",
    multikey_question="What is the special magic number for {word} mentioned in the text?",
    multikey_words=("falcon", "pepper", "anchor", "meadow", "copper", "thunder", "velvet", "harvest", "pebble",
                    "compass", "lemon", "marble"),
    kv_intro="The JSON object below maps keys to values.",
    kv_line='"{key}": "{value}"',
    kv_brackets=("{", "}"),
    kv_question='What is the value of the key "{key}" in the JSON object?',
    kv_instruction="Answer with the value only.",
    vt_assign="VAR {name} = {value}.",
    vt_copy="VAR {name} = VAR {source}.",
    vt_letters="ABCDEFGHIJKLM",
    vt_question="Find all variables that are assigned the value {value} in the text above.",
    vt_instruction="Answer with the variable names only, separated by spaces.",
    hop_number_fact="{name}'s locker number is {number}.",
    hop_place_fact="The {thing} is in {name}'s locker.",
    hop_question="What number is the locker that holds the {thing}?",
    hop_names=("Mira", "Tomas", "Leena", "Jonah", "Priya", "Caleb", "Ines", "Dmitri", "Hana", "Marcus"),
    hop_things=("gym bag", "red scarf", "toolbox", "camera", "tennis racket", "lunch box"),
)

_HELDOUT = _SplitText(
    intro="Read the document below. Somewhere inside it is a detail you will need; the question comes after the "
    "document.",
    filler_templates=(
        "The committee reviewed the {topic} report once again before {meal}.",
        "Her notes on {topic} filled most of the {item}.",
        "The {item} on the shelf had been {state} since {month}.",
        "A letter about {topic} arrived shortly after {meal}.",
        "They argued about {topic} while the {item} stayed {state}.",
        "According to the archive, {topic} was first discussed in {month}.",
    ),
    filler_words={
        "topic": ("irrigation", "tax policy", "bird migration", "ship design", "folk music", "glass making",
                  "road repairs", "library funding"),
        "meal": ("breakfast", "lunch", "dinner", "the afternoon tea", "supper"),
        "item": ("notebook", "folder", "ledger", "drawer", "binder", "envelope"),
        "state": ("untouched", "locked", "misplaced", "half empty", "water stained"),
        "month": ("January", "March", "May", "July", "September", "November"),
    },
    number_instruction="Reply with just the number.",
    passkey_needle="Note: the access code is {key}. Keep it in mind.",
    passkey_question="Which access code does the document mention?",
    multikey_needle="The secret code assigned to {word} is {number}.",
    multikey_question="Which secret code is assigned to {word} in the document?",
    multikey_words=("saffron", "glacier", "tundra", "obsidian", "juniper", "walrus", "cobalt", "monsoon",
                    "papyrus", "quartz", "nutmeg", "heron"),
    kv_intro="The list below holds [key, value] pairs.",
    kv_line='["{key}", "{value}"]',
    kv_brackets=("[", "]"),
    kv_question='Which value is paired with "{key}" in the list?',
    kv_instruction="Reply with just the value.",
    vt_assign="LET {name} := {value}.",
    vt_copy="LET {name} := {source}.",
    vt_letters="NOPQRSTUVWXYZ",
    vt_question="Which variables end up holding {value} in the document?",
    vt_instruction="Reply with just the variable names, separated by spaces.",
    hop_number_fact="The office of {name} is room {number}.",
    hop_place_fact="The {thing} was left in the office of {name}.",
    hop_question="Which room number is the office where the {thing} was left?",
    hop_names=("Osric", "Farah", "Yusuf", "Greta", "Anselm", "Noor", "Tobiah", "Wren", "Keiko", "Lazlo"),
    hop_things=("blue umbrella", "violin case", "chess set", "laptop", "potted fern", "wool coat"),
)

_SPLIT_TEXT = {"train": _TRAIN, "heldout": _HELDOUT}
_CHAIN_HOPS = 4
_PROBE_UNITS = 64


def internal_seed(seed: int, split: str) -> int:
    """The seed actually drawn: ``seed`` for train (must be in [0, 10**6)), 10**6 + seed for heldout."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if split == "train":
        if seed >= HELDOUT_SEED_OFFSET:
            raise ValueError(f"train seeds must be < {HELDOUT_SEED_OFFSET} (held-out seeds start there), got {seed}")
        return seed
    return HELDOUT_SEED_OFFSET + seed


def token_counter(tokenizer) -> Callable[[str], int]:
    """A ``count_tokens`` for :func:`make_item` from a tokenizer with ``encode(text, add_special_tokens=...)``."""
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


@dataclass
class _Layout:
    """What one task item needs besides filler: needles at fractions of the haystack, question, answers."""

    needles: list[tuple[float, str]]
    question: str
    instruction: str
    answers: list[str]
    metric: str
    max_new_tokens: int
    make_unit: Callable[[], str]
    joiner: str = " "
    header: str = ""
    brackets: tuple[str, str] = ("", "")


def _filler_maker(rng: random.Random, text: _SplitText) -> Callable[[], str]:
    def make() -> str:
        template = rng.choice(text.filler_templates)
        return template.format(**{slot: rng.choice(words) for slot, words in text.filler_words.items()})

    return make


def _uuid(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _distinct_numbers(rng: random.Random, low: int, high: int, k: int) -> list[int]:
    return rng.sample(range(low, high), k)


def _passkey(rng: random.Random, fill: random.Random, text: _SplitText, depth: float) -> _Layout:
    key = str(rng.randrange(10_000, 100_000))
    return _Layout(
        needles=[(depth, text.passkey_needle.format(key=key))],
        question=text.passkey_question,
        instruction=text.number_instruction,
        answers=[key],
        metric="contains",
        max_new_tokens=16,
        make_unit=_filler_maker(fill, text),
    )


def _multikey(rng: random.Random, fill: random.Random, text: _SplitText, depth: float) -> _Layout:
    words = rng.sample(text.multikey_words, 4)
    numbers = [str(n) for n in _distinct_numbers(rng, 10**6, 10**7, 4)]
    needles = [(depth, text.multikey_needle.format(word=words[0], number=numbers[0]))]
    needles += [(rng.random(), text.multikey_needle.format(word=w, number=n)) for w, n in zip(words[1:], numbers[1:])]
    return _Layout(
        needles=needles,
        question=text.multikey_question.format(word=words[0]),
        instruction=text.number_instruction,
        answers=[numbers[0]],
        metric="contains",
        max_new_tokens=24,
        make_unit=_filler_maker(fill, text),
    )


def _kv_retrieval(rng: random.Random, fill: random.Random, text: _SplitText, depth: float) -> _Layout:
    key, value = _uuid(rng), _uuid(rng)
    return _Layout(
        needles=[(depth, text.kv_line.format(key=key, value=value))],
        question=text.kv_question.format(key=key),
        instruction=text.kv_instruction,
        answers=[value],
        metric="contains",
        max_new_tokens=64,
        make_unit=lambda: text.kv_line.format(key=_uuid(fill), value=_uuid(fill)),
        joiner=",\n",
        header=text.kv_intro,
        brackets=text.kv_brackets,
    )


def _variable_tracking(rng: random.Random, fill: random.Random, text: _SplitText, depth: float) -> _Layout:
    names = ["".join(rng.choices(text.vt_letters, k=5)) for _ in range(2 * _CHAIN_HOPS)]
    while len(set(names)) < len(names):
        names = ["".join(rng.choices(text.vt_letters, k=5)) for _ in range(2 * _CHAIN_HOPS)]
    value, decoy = (str(n) for n in _distinct_numbers(rng, 10_000, 100_000, 2))

    def chain(chain_names: list[str], chain_value: str) -> list[str]:
        first = [text.vt_assign.format(name=chain_names[0], value=chain_value)]
        return first + [text.vt_copy.format(name=b, source=a) for a, b in zip(chain_names, chain_names[1:])]

    target, distractor = names[:_CHAIN_HOPS], names[_CHAIN_HOPS:]
    fractions = [depth + k * (1.0 - depth) / _CHAIN_HOPS for k in range(_CHAIN_HOPS)]
    needles = list(zip(fractions, chain(target, value)))
    needles += list(zip(sorted(rng.random() for _ in range(_CHAIN_HOPS)), chain(distractor, decoy)))
    return _Layout(
        needles=needles,
        question=text.vt_question.format(value=value),
        instruction=text.vt_instruction,
        answers=target,
        metric="recall_fraction",
        max_new_tokens=48,
        make_unit=_filler_maker(fill, text),
    )


def _two_hop(rng: random.Random, fill: random.Random, text: _SplitText, depth: float) -> _Layout:
    name, other_a, other_b = rng.sample(text.hop_names, 3)
    thing, other_thing = rng.sample(text.hop_things, 2)
    number, number_a, number_b = (str(n) for n in _distinct_numbers(rng, 1000, 10_000, 3))
    needles = [
        (depth / 2, text.hop_number_fact.format(name=name, number=number)),
        ((1.0 + depth) / 2, text.hop_place_fact.format(thing=thing, name=name)),
        (rng.random(), text.hop_number_fact.format(name=other_a, number=number_a)),
        (rng.random(), text.hop_number_fact.format(name=other_b, number=number_b)),
        (rng.random(), text.hop_place_fact.format(thing=other_thing, name=other_a)),
    ]
    return _Layout(
        needles=needles,
        question=text.hop_question.format(thing=thing),
        instruction=text.number_instruction,
        answers=[number],
        metric="contains",
        max_new_tokens=16,
        make_unit=_filler_maker(fill, text),
    )


_BUILDERS = {
    "passkey": _passkey,
    "multikey_needle": _multikey,
    "kv_retrieval": _kv_retrieval,
    "variable_tracking": _variable_tracking,
    "two_hop": _two_hop,
}


class _Haystack:
    """Renders the prompt with the first ``n`` filler units and the needles at their fractions."""

    def __init__(self, layout: _Layout, intro: str) -> None:
        self.layout = layout
        self.intro = intro
        self.units: list[str] = []

    def render(self, n: int) -> str:
        layout = self.layout
        while len(self.units) < n:
            self.units.append(layout.make_unit())
        slots = sorted((round(f * n), order, text) for order, (f, text) in enumerate(layout.needles))
        body: list[str] = []
        next_slot = 0
        for i in range(n + 1):
            while next_slot < len(slots) and slots[next_slot][0] == i:
                body.append(slots[next_slot][2])
                next_slot += 1
            if i < n:
                body.append(self.units[i])
        opening, closing = layout.brackets
        context = opening + ("\n" if opening else "") + layout.joiner.join(body) + ("\n" if closing else "") + closing
        parts = [self.intro, layout.header, context, f"{layout.question} {layout.instruction}"]
        return "\n\n".join(p for p in parts if p)


def _fit(haystack: _Haystack, count_tokens: Callable[[str], int], target_tokens: int) -> str:
    """Longest rendering whose token count is <= target_tokens (token counts must grow with n)."""
    base = count_tokens(haystack.render(0))
    if base > target_tokens:
        raise ValueError(f"target_tokens={target_tokens} is below the {base} tokens the task needs without filler")
    probe = count_tokens(haystack.render(_PROBE_UNITS))
    if probe <= base:
        raise ValueError("count_tokens does not grow with the filler text; pass a real token counter")
    rate = (probe - base) / _PROBE_UNITS
    n = int((target_tokens - base) / rate)
    tokens = count_tokens(haystack.render(n))
    for _ in range(8):  # secant correction with the measured per-unit rate
        if n > 0:
            rate = max((tokens - base) / n, 1e-6)
        step = math.floor((target_tokens - tokens) / rate)
        if step == 0 or n + step < 0:
            break
        n += step
        tokens = count_tokens(haystack.render(n))
    while tokens > target_tokens:
        n -= 1
        tokens = count_tokens(haystack.render(n))
    while True:
        longer = haystack.render(n + 1)
        if count_tokens(longer) > target_tokens:
            return haystack.render(n)
        n += 1


def make_item(
    task: str,
    seed: int,
    target_tokens: int,
    depth: float,
    count_tokens: Callable[[str], int],
    split: str,
) -> TextItem:
    """One item of a built-in task whose prompt has at most ``target_tokens`` tokens by ``count_tokens``,
    and less than one filler unit fewer (see the module docstring for depth, splits and seeds)."""
    if task not in _BUILDERS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    drawn = internal_seed(seed, split)
    rng = random.Random(f"{task}|{drawn}|needles")
    fill = random.Random(f"{task}|{drawn}|filler")
    text = _SPLIT_TEXT[split]
    layout = _BUILDERS[task](rng, fill, text, depth)
    prompt = _fit(_Haystack(layout, text.intro), count_tokens, target_tokens)
    return TextItem(
        task=task,
        item_id=f"{task}-{split}-s{seed}-d{depth:.3f}-t{target_tokens}",
        prompt=prompt,
        answers=layout.answers,
        metric=layout.metric,
        max_new_tokens=layout.max_new_tokens,
        depth=depth,
        seed=seed,
        split=split,
    )


def build_suite(
    tasks: Sequence[str],
    split: str,
    n_items: int,
    target_tokens: int,
    depths: Sequence[float],
    count_tokens: Callable[[str], int],
    seed: int = 0,
) -> list[TextItem]:
    """``n_items`` items per task; item i uses seed ``seed + i`` and depth ``depths[i % len(depths)]``."""
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    if not depths:
        raise ValueError("depths must not be empty")
    return [
        make_item(task, seed + i, target_tokens, depths[i % len(depths)], count_tokens, split)
        for task in tasks
        for i in range(n_items)
    ]

"""Multiple-choice video question answering: the built-in needle tasks and LongVideoBench, MLVU and Video-MME from
local folders in their published layouts, with lmms-eval's prompts, answer parsing and accuracy rules.

Layouts (what :func:`load_video_dataset` expects; a folder without them raises :class:`VideoDatasetLayoutError`, one
line naming the expected files):

* ``builtin``: ``questions.jsonl`` (one :class:`~namm_transfer.evals.video_tasks.VideoTask` per line with ``video``)
  and ``videos/``, as written by :func:`namm_transfer.evals.video_tasks.write_split`.
* ``longvideobench`` (Wu et al. 2024; ``longvideobench/LongVideoBench`` on the Hugging Face hub): ``lvb_val.json``,
  a JSON list of records with ``id``, ``video_path`` (relative to ``videos/``), ``question``, ``candidates`` (2-5
  option texts), ``correct_choice`` (0-based index), ``question_category``, ``duration_group``; and ``videos/``.
* ``mlvu`` (Zhou et al. 2024; ``MLVU/MVLU``, the dev set): ``MLVU/json/<n>_<task>.json`` (or ``json/`` directly in
  the folder), JSON lists of records with ``video``, ``question``, ``candidates``, ``answer`` (the correct option's
  text) and ``question_type``; videos in ``MLVU/video/<n>_<task>/<video>``. Files without ``candidates``
  (``8_sub_scene``, ``9_summary``: open generation) are skipped.
* ``videomme`` (Fu et al. 2024; ``lmms-lab/Video-MME``): ``videomme/test-00000-of-00001.parquet`` with
  ``question_id``, ``videoID``, ``question``, ``options`` (``["A. ...", ...]``), ``answer`` (a letter),
  ``duration``, ``task_type``; videos in ``data/<videoID>.mp4`` (or ``.MP4``, ``.mkv``).

Prompts and rules (lmms-eval, ``lmms_eval/tasks/<task>/utils.py`` and the task YAML files; field-notes §4):

* LongVideoBench (``longvideobench_val_v``): ``"{question}\\nA. {option}\\n...\\nAnswer with the option's letter
  from the given choices directly.\\n"``; the answer is the first of A-E in the response after removing phrases
  such as "The best answer is"; a response with no letter (or more than 10 words and no letter) gets a random
  choice, as in the LongVideoBench paper. Here the draw is seeded by the question id, so reruns agree.
* MLVU (``mlvu_dev``): ``"\\n{question}\\n(A) {option}\\n...\\nOnly give the best option.\\n\\nBest option: ("``;
  the answer is the character before the first ``)`` of the response, or the whole stripped response when it has
  none; unparseable answers are wrong. The dev score is the mean of the per-task accuracies (lmms-eval divides by
  its fixed list of seven tasks; equal when every task is present).
* Video-MME (``videomme``): ``"Select the best answer to the following multiple-choice question based on the video
  and the subtitles. Respond with only the letter (A, B, C, or D) of the correct option.\\n{question}\\nA. ...\\n
  \\nAnswer the question with A, B, C, or D."`` (the task's default ``post_prompt``); the answer is the first of
  A-D after removing the answer phrases, "" (wrong) when there is none or the response has more than 10 words and
  no letter; compared case-insensitively.
* built-in (ours, not lmms-eval's): ``"{question}\nOptions:\n- {option}\n...\nAnswer with one of the options,
  exactly as written.\n"``; the answer is the option whose text equals the response (case, surrounding space and a
  final full stop ignored), "" (wrong) otherwise, so chance does not blur the comparison of eviction methods. The
  options carry no letters because the embedded model's SmolLM2-135M cannot bind an option to its letter: from an
  exact text description of the video it picks the right letter at chance (10 of 48 held-out questions), and
  still at chance (27% of 64) after 100 steps (400 examples) of adapter training, while it names the right colour,
  shape or count in its own words (docs/results/video-training/).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

LETTERS = "ABCDEFGH"


class VideoDatasetLayoutError(ValueError):
    """A dataset folder is not in the expected layout; the message names the expected files in one line."""


@dataclass(frozen=True)
class VideoQuestion:
    """One multiple-choice question about one video.

    Attributes:
        id: the dataset's question id.
        dataset: "builtin", "longvideobench", "mlvu" or "videomme".
        video: path of the video file (it may be missing: the evaluation records that item as failed).
        question: question text without the options.
        options: option texts without their letters.
        answer: the correct letter.
        category: the dataset's category of the question (kind, question_category, task type, task_type).
        num_frames: frames the video holds when every frame should be sampled (built-in tasks), else None.
        extra: further fields kept for reports (duration group, depth, ...).
    """

    id: str
    dataset: str
    video: Path
    question: str
    options: tuple[str, ...]
    answer: str
    category: str
    num_frames: int | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not 2 <= len(self.options) <= len(LETTERS):
            raise ValueError(f"question {self.id}: needs 2-{len(LETTERS)} options, got {len(self.options)}")
        if self.answer not in LETTERS[: len(self.options)]:
            raise ValueError(f"question {self.id}: answer {self.answer!r} is not one of its {len(self.options)} letters")

    @property
    def letters(self) -> str:
        return LETTERS[: len(self.options)]

    def prompt(self) -> str:
        """The text after the video, as lmms-eval writes it for this dataset."""
        return _PROMPTS[self.dataset](self)

    def parse(self, response: str) -> str:
        """The letter the response chose under this dataset's rule ("" when none counts)."""
        return _PARSERS[self.dataset](self, response)

    def is_correct(self, response: str) -> bool:
        return self.parse(response) == self.answer


# ---------------------------------------------------------------- prompts


def _lettered(options: Sequence[str], template: str) -> str:
    return "\n".join(template.format(letter=letter, option=option) for letter, option in zip(LETTERS, options))


def _prompt_longvideobench(q: VideoQuestion) -> str:
    body = q.question + "\n" + _lettered(q.options, "{letter}. {option}")
    return f"{body}\nAnswer with the option's letter from the given choices directly.\n"


def _prompt_mlvu(q: VideoQuestion) -> str:
    body = q.question + "\n" + _lettered(q.options, "({letter}) {option}") + "\n"
    return "\n" + body + "\nOnly give the best option.\n" + "\n" + "Best option: ("


def _prompt_videomme(q: VideoQuestion) -> str:
    instruction = (
        "Select the best answer to the following multiple-choice question based on the video and the subtitles. "
        "Respond with only the letter (A, B, C, or D) of the correct option."
    )
    body = q.question + "\n" + _lettered(q.options, "{letter}. {option}")
    return instruction + "\n" + body + "\n" + "\nAnswer the question with A, B, C, or D."


def _prompt_builtin(q: VideoQuestion) -> str:
    options = "\n".join(f"- {option}" for option in q.options)
    return f"{q.question}\nOptions:\n{options}\nAnswer with one of the options, exactly as written.\n"


_PROMPTS: dict[str, Callable[[VideoQuestion], str]] = {
    "builtin": _prompt_builtin,
    "longvideobench": _prompt_longvideobench,
    "mlvu": _prompt_mlvu,
    "videomme": _prompt_videomme,
}

# ---------------------------------------------------------------- answer parsing

_ANSWER_PHRASES = (
    "The best answer is", "The correct answer is", "The answer is", "The answer", "The best option is",
    "The correct option is", "Best answer:", "Best option:",
)
# Video-MME's list in lmms-eval lacks two commas, so two pairs are single (never matching) strings there.
_VIDEOMME_PHRASES = (
    "The best answer is", "The correct answer is", "The answer is", "The answer",
    "The best option isThe correct option is", "Best answer:Best option:",
)


def _strip_phrases(response: str, phrases: Sequence[str]) -> str:
    text = response.strip()
    for phrase in phrases:
        text = text.replace(phrase, "")
    return text


def _first_letter(text: str, letters: str) -> str:
    """First of ``letters`` in ``text``, "" if none (lmms-eval's extra "more than 10 words and no letter" test
    implies no letter, so it needs no code)."""
    match = re.search(f"[{letters}]", text)
    return match[0] if match else ""


def parse_longvideobench(q: VideoQuestion, response: str) -> str:
    """lmms-eval ``parse_multi_choice_response``: first of A-E after the answer phrases; otherwise a random letter
    among the options (seeded by the question id)."""
    letter = _first_letter(_strip_phrases(response, _ANSWER_PHRASES), "ABCDE")
    return letter if letter else random.Random(q.id).choice(q.letters)


def parse_videomme(q: VideoQuestion, response: str) -> str:
    """lmms-eval Video-MME ``extract_characters_regex``: first of A-D after the answer phrases, else ""."""
    return _first_letter(_strip_phrases(response, _VIDEOMME_PHRASES), "ABCD")


def parse_mlvu(q: VideoQuestion, response: str) -> str:
    """lmms-eval MLVU ``extract_characters_regex``: the character before the first ')', else the stripped response."""
    text = response.strip()
    if ")" in text:
        index = text.index(")")
        return text[index - 1 : index]
    return text


def _normalised(text: str) -> str:
    return " ".join(text.strip().lower().removesuffix(".").split())


def parse_builtin(q: VideoQuestion, response: str) -> str:
    """The letter of the option whose text equals the response (case, spacing and a final '.' ignored), else ""."""
    said = _normalised(response)
    return next((letter for letter, option in zip(LETTERS, q.options) if _normalised(option) == said), "")


_PARSERS: dict[str, Callable[[VideoQuestion, str], str]] = {
    "builtin": parse_builtin,
    "longvideobench": parse_longvideobench,
    "mlvu": parse_mlvu,
    "videomme": parse_videomme,
}


def dataset_score(questions: Sequence[VideoQuestion], correct: Sequence[bool]) -> float:
    """The dataset's headline accuracy in [0, 1]: the mean over task types for MLVU, over questions otherwise."""
    if len(questions) != len(correct) or not questions:
        raise ValueError("need one correctness value per question, and at least one question")
    if questions[0].dataset != "mlvu":
        return sum(map(bool, correct)) / len(correct)
    by_type: dict[str, list[bool]] = {}
    for question, right in zip(questions, correct):
        by_type.setdefault(question.category, []).append(bool(right))
    return sum(sum(v) / len(v) for v in by_type.values()) / len(by_type)


# ---------------------------------------------------------------- loaders


def _require(folder: Path, dataset: str, expected: str, *paths: Path) -> None:
    if not folder.is_dir():
        raise VideoDatasetLayoutError(f"{dataset} folder {folder} does not exist (expected {expected})")
    missing = [str(p.relative_to(folder)) for p in paths if not p.exists()]
    if missing:
        raise VideoDatasetLayoutError(
            f"{folder} is not a {dataset} folder: missing {', '.join(missing)} (expected {expected})"
        )


def _read_json(path: Path, dataset: str):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise VideoDatasetLayoutError(f"{dataset}: {path} is not valid JSON ({error})") from None


def _field(record: dict, name: str, where: str, dataset: str):
    if name not in record:
        raise VideoDatasetLayoutError(f"{dataset}: {where} has no field {name!r}")
    return record[name]


BUILTIN_EXPECTED = "questions.jsonl and videos/"


def load_builtin(folder: str | Path) -> list[VideoQuestion]:
    """Built-in tasks written by :func:`namm_transfer.evals.video_tasks.write_split`."""
    folder = Path(folder)
    _require(folder, "builtin", BUILTIN_EXPECTED, folder / "questions.jsonl", folder / "videos")
    questions = []
    for number, line in enumerate((folder / "questions.jsonl").read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"questions.jsonl line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise VideoDatasetLayoutError(f"builtin: {where} is not valid JSON ({error})") from None
        questions.append(VideoQuestion(
            id=_field(record, "id", where, "builtin"), dataset="builtin",
            video=folder / _field(record, "video", where, "builtin"),
            question=_field(record, "question", where, "builtin"),
            options=tuple(_field(record, "options", where, "builtin")),
            answer=_field(record, "answer", where, "builtin"), category=_field(record, "kind", where, "builtin"),
            num_frames=int(_field(record, "num_frames", where, "builtin")),
            extra={"depth": record.get("depth"), "split": record.get("split")},
        ))
    return questions


LONGVIDEOBENCH_EXPECTED = "lvb_val.json and videos/ (longvideobench/LongVideoBench)"


def load_longvideobench(folder: str | Path) -> list[VideoQuestion]:
    """LongVideoBench validation questions (``lvb_val.json``)."""
    folder = Path(folder)
    annotations = folder / "lvb_val.json"
    _require(folder, "longvideobench", LONGVIDEOBENCH_EXPECTED, annotations, folder / "videos")
    records = _read_json(annotations, "longvideobench")
    if not isinstance(records, list):
        raise VideoDatasetLayoutError("longvideobench: lvb_val.json must hold a JSON list of questions")
    questions = []
    for number, record in enumerate(records):
        where = f"lvb_val.json record {number}"
        candidates = [c for c in _field(record, "candidates", where, "longvideobench") if c != "N/A"]
        questions.append(VideoQuestion(
            id=str(_field(record, "id", where, "longvideobench")), dataset="longvideobench",
            video=folder / "videos" / _field(record, "video_path", where, "longvideobench"),
            question=_field(record, "question", where, "longvideobench"), options=tuple(candidates),
            answer=LETTERS[int(_field(record, "correct_choice", where, "longvideobench"))],
            category=str(record.get("question_category", "")),
            extra={"duration_group": record.get("duration_group"), "duration": record.get("duration")},
        ))
    return questions


MLVU_EXPECTED = "MLVU/json/<n>_<task>.json and MLVU/video/<n>_<task>/ (MLVU/MVLU dev set)"


def load_mlvu(folder: str | Path) -> list[VideoQuestion]:
    """MLVU dev multiple-choice questions (tasks with ``candidates``)."""
    folder = Path(folder)
    root = folder / "MLVU" if (folder / "MLVU").is_dir() else folder
    _require(folder, "mlvu", MLVU_EXPECTED, root / "json", root / "video")
    files = sorted((root / "json").glob("*.json"))
    if not files:
        raise VideoDatasetLayoutError(f"{root / 'json'} holds no .json files (expected {MLVU_EXPECTED})")
    questions = []
    for path in files:
        records = _read_json(path, "mlvu")
        if not isinstance(records, list):
            raise VideoDatasetLayoutError(f"mlvu: {path.name} must hold a JSON list of questions")
        for number, record in enumerate(records):
            if "candidates" not in record:  # open-ended generation tasks (sub-scene captioning, summary)
                continue
            where = f"{path.name} record {number}"
            candidates = list(record["candidates"])
            answer_text = _field(record, "answer", where, "mlvu")
            if answer_text not in candidates:
                raise VideoDatasetLayoutError(f"mlvu: {where}: answer {answer_text!r} is not among its candidates")
            task = record.get("question_type") or path.stem.split("_", 1)[-1]
            questions.append(VideoQuestion(
                id=f"{path.stem}-{number}", dataset="mlvu",
                video=root / "video" / path.stem / _field(record, "video", where, "mlvu"),
                question=_field(record, "question", where, "mlvu"), options=tuple(candidates),
                answer=LETTERS[candidates.index(answer_text)], category=task,
                extra={"duration": record.get("duration")},
            ))
    return questions


VIDEOMME_EXPECTED = "videomme/test-00000-of-00001.parquet and data/ (lmms-lab/Video-MME)"
_OPTION_PREFIX = re.compile(r"^\s*([A-H])\s*[.)]\s*")


def load_videomme(folder: str | Path) -> list[VideoQuestion]:
    """Video-MME questions from the published parquet file."""
    import pyarrow.parquet as pq  # imported here: only Video-MME needs it

    folder = Path(folder)
    annotations = folder / "videomme" / "test-00000-of-00001.parquet"
    _require(folder, "videomme", VIDEOMME_EXPECTED, annotations, folder / "data")
    try:
        records = pq.read_table(annotations).to_pylist()
    except Exception as error:  # pyarrow raises ArrowInvalid / OSError for a broken file
        raise VideoDatasetLayoutError(f"videomme: {annotations} is not a readable parquet file ({error})") from None
    questions = []
    for number, record in enumerate(records):
        where = f"parquet row {number}"
        options = []
        for letter, option in zip(LETTERS, _field(record, "options", where, "videomme")):
            match = _OPTION_PREFIX.match(option)
            if not match or match[1] != letter:
                raise VideoDatasetLayoutError(f"videomme: {where}: option {option!r} does not start with '{letter}.'")
            options.append(option[match.end():])
        video_id = _field(record, "videoID", where, "videomme")
        video = folder / "data" / f"{video_id}.mp4"
        for suffix in (".MP4", ".mkv"):
            if not video.exists() and video.with_suffix(suffix).exists():
                video = video.with_suffix(suffix)
        questions.append(VideoQuestion(
            id=str(_field(record, "question_id", where, "videomme")), dataset="videomme", video=video,
            question=_field(record, "question", where, "videomme"), options=tuple(options),
            answer=str(_field(record, "answer", where, "videomme")).strip().upper(),
            category=str(record.get("task_type", "")), extra={"duration": record.get("duration")},
        ))
    return questions


LOADERS: dict[str, Callable[[str | Path], list[VideoQuestion]]] = {
    "builtin": load_builtin,
    "longvideobench": load_longvideobench,
    "mlvu": load_mlvu,
    "videomme": load_videomme,
}


def load_video_dataset(name: str, folder: str | Path, limit: int | None = None) -> list[VideoQuestion]:
    """Questions of dataset ``name`` from ``folder`` (first ``limit`` if given). Raises ValueError for an unknown
    name and :class:`VideoDatasetLayoutError` for a folder in the wrong layout."""
    if name not in LOADERS:
        raise ValueError(f"unknown video dataset {name!r}; known: {', '.join(LOADERS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    questions = LOADERS[name](folder)
    return questions if limit is None else questions[:limit]

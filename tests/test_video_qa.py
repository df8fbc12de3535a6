"""Video question answering datasets (namm_transfer.evals.video_qa): tiny fixture folders in the published layouts of
LongVideoBench, MLVU (dev) and Video-MME (tests/data/video/), the built-in tasks, lmms-eval's prompts, its letter
parsing per dataset, the headline scores, and one-line errors for folders in the wrong layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from namm_transfer.evals.video_qa import (
    LOADERS,
    VideoDatasetLayoutError,
    VideoQuestion,
    dataset_score,
    load_video_dataset,
)
from namm_transfer.evals.video_tasks import write_split
from namm_transfer.video.frames import VideoReadError, read_frames

DATA = Path(__file__).parent / "data" / "video"


def test_longvideobench_layout():
    questions = load_video_dataset("longvideobench", DATA / "longvideobench")
    assert [q.id for q in questions] == ["86CxyhFV9MI_0", "86CxyhFV9MI_1", "missing01_0"]
    first, second, third = questions
    assert first.answer == "A" and second.answer == "C" and third.answer == "B"
    assert third.options == ("yes", "no")  # "N/A" padding options are dropped
    assert first.category == "TOS" and first.extra["duration_group"] == 600
    assert second.prompt() == (
        "What colour is the car at the end?\nA. red\nB. blue\nC. green\n"
        "Answer with the option's letter from the given choices directly.\n"
    )
    assert read_frames(first.video, 4).shape == (4, 32, 32, 3)
    with pytest.raises(VideoReadError):  # a missing video fails its item only
        read_frames(third.video, 4)


@pytest.mark.parametrize("folder", ["mlvu", "mlvu/MLVU"])
def test_mlvu_layout(folder):
    questions = load_video_dataset("mlvu", DATA / folder)
    assert [(q.id, q.answer, q.category) for q in questions] == [
        ("1_plotQA-0", "A", "plotQA"), ("1_plotQA-1", "D", "plotQA"), ("2_needle-0", "C", "findNeedle"),
    ]  # 8_sub_scene (open generation, no candidates) is skipped
    assert questions[2].video == DATA / "mlvu" / "MLVU" / "video" / "2_needle" / "needle_32.mp4"
    assert questions[2].video.is_file()
    assert questions[0].prompt() == (
        "\nWhat color is the main male character in the video?\n(A) Yellow\n(B) Red\n(C) Green\n(D) Blue\n"
        "\nOnly give the best option.\n\nBest option: ("
    )


def test_videomme_layout():
    questions = load_video_dataset("videomme", DATA / "videomme")
    assert [(q.id, q.answer, q.category) for q in questions] == [
        ("001-1", "C", "Counting Problem"), ("001-2", "B", "Information Synopsis"),
    ]
    assert questions[1].options == ("It is a news report.", "It is a documentary.", "It is a game.", "It is a cartoon.")
    assert questions[1].video.is_file()
    assert questions[1].prompt() == (
        "Select the best answer to the following multiple-choice question based on the video and the subtitles. "
        "Respond with only the letter (A, B, C, or D) of the correct option.\nWhat is the genre of this video?\n"
        "A. It is a news report.\nB. It is a documentary.\nC. It is a game.\nD. It is a cartoon.\n"
        "\nAnswer the question with A, B, C, or D."
    )


def test_builtin_layout(tmp_path):
    tasks = write_split(tmp_path, "heldout", lengths=[16], per_kind=1)
    questions = load_video_dataset("builtin", tmp_path, limit=3)
    assert [q.id for q in questions] == [t.id for t in tasks[:3]]
    assert all(q.num_frames == 16 and q.video.is_file() for q in questions)
    assert questions[0].answer == tasks[0].answer and questions[0].options == tuple(tasks[0].options)
    assert questions[0].prompt().startswith(tasks[0].question + "\nOptions:\n- ")


@pytest.mark.parametrize("name,expected", [
    ("builtin", "questions.jsonl"), ("longvideobench", "lvb_val.json"), ("mlvu", "MLVU/json"),
    ("videomme", "test-00000-of-00001.parquet"),
])
def test_wrong_layout_is_one_line_naming_the_expected_files(tmp_path, name, expected):
    (tmp_path / "something.txt").write_text("not a dataset")
    for folder in (tmp_path, tmp_path / "absent"):
        with pytest.raises(VideoDatasetLayoutError) as error:
            load_video_dataset(name, folder)
        message = str(error.value)
        assert "\n" not in message and expected in message
    with pytest.raises(ValueError, match="unknown video dataset"):
        load_video_dataset("egoschema", tmp_path)
    assert set(LOADERS) == {"builtin", "longvideobench", "mlvu", "videomme"}


def question(dataset: str, options=("a", "b", "c", "d"), answer="B") -> VideoQuestion:
    return VideoQuestion(id="q1", dataset=dataset, video=Path("v.mp4"), question="?", options=tuple(options),
                         answer=answer, category="t")


@pytest.mark.parametrize("dataset,response,letter", [
    ("longvideobench", "B", "B"),
    ("longvideobench", "The best answer is D.", "D"),
    ("longvideobench", "(C) the car", "C"),
    ("longvideobench", "E", "E"),  # lmms-eval looks for A-E whatever the option count
    ("videomme", "The best answer is: C", "C"),
    ("videomme", " b ", ""),  # lower case is not a letter there
    ("videomme", "Answer: B", "A"),  # lmms-eval's rule takes the first capital A-D: the A of "Answer"
    ("videomme", "none of them", ""),
    ("mlvu", "A) Yellow", "A"),
    ("mlvu", "B", "B"),
    ("mlvu", "The best option is (C) Green", "C"),
    ("mlvu", "Yellow", "Yellow"),  # no ')' -> the whole response, which matches no letter
    ("mlvu", ") nothing", ""),
])
def test_letter_parsing_follows_lmms_eval(dataset, response, letter):
    assert question(dataset).parse(response) == letter


def test_builtin_answers_are_option_texts():
    q = question("builtin", options=("red", "the blue square", "3", "circle"), answer="B")
    assert q.prompt() == ("?\nOptions:\n- red\n- the blue square\n- 3\n- circle\n"
                          "Answer with one of the options, exactly as written.\n")
    assert q.parse(" The Blue  square.") == "B" and q.is_correct("the blue square")
    assert q.parse("3") == "C" and q.parse("B") == "" and q.parse("a red circle") == ""  # whole options only


def test_unparseable_longvideobench_answer_draws_a_seeded_random_option():
    q = question("longvideobench", options=("x", "y", "z"))
    drawn = q.parse("i do not know")
    assert drawn in "ABC" and q.parse("no idea at all") == drawn  # seeded by the question id
    assert question("videomme").parse("i do not know") == ""  # counts as wrong elsewhere


def test_correctness_and_headline_scores():
    q = question("videomme", answer="C")
    assert q.is_correct("C") and not q.is_correct("The answer is B") and not q.is_correct("")
    lvb = [question("longvideobench") for _ in range(4)]
    assert dataset_score(lvb, [True, False, True, True]) == 0.75
    mlvu = [VideoQuestion(id=str(i), dataset="mlvu", video=Path("v"), question="?", options=("a", "b"), answer="A",
                          category=category) for i, category in enumerate(["count", "count", "count", "order"])]
    assert dataset_score(mlvu, [True, True, False, False]) == pytest.approx((2 / 3 + 0) / 2)  # mean over task types
    with pytest.raises(ValueError):
        question("videomme", answer="F")

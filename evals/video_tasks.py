"""Built-in long-video question answering: needles in a haystack of moving textured shapes, written as real mp4 files.

A video of ``num_frames`` frames (``size`` x ``size`` px) is a haystack of scenes: every 6-20 frames a scene cut
changes the background (a dim, weakly tinted sinusoidal grating of random orientation and frequency) and the 2-3
distractor shapes (small, grey, striped, moving in straight lines and bouncing off the borders). Needles are large,
solid, saturated shapes (:data:`COLOURS` x :data:`SHAPES`) drawn over the haystack for ``needle_length`` consecutive
frames at a chosen depth (0 = first frame, 1 = last). Distractors are never saturated, so a needle is unambiguous.

Question kinds (multiple choice, four options, one correct letter):

* ``colour``: one needle; "A <shape> appears in the video. What colour is it?"
* ``shape``: one needle; "A <colour> object appears in the video. What shape is it?"
* ``count``: the same needle appears 1-4 times at distinct depths; "How many times does the <colour> <shape> appear?"
* ``order``: two needles differing in colour and shape; "Which object appears first?" (the two needles and two
  objects that never appear).

Everything is a pure function of (split, kind, num_frames, index): the random generator is seeded with
``[SPLITS[split], KINDS.index(kind), num_frames, index]``, so the train and held-out splits never share a seed and a
rebuilt folder holds the same videos. The video holds exactly ``num_frames`` frames, so an evaluation sampling that
many frames (lmms-eval's ``linspace``) sees every frame, the needle included. ``av`` writes H.264 (libx264, yuv420p,
crf 18, one thread): decoded frames differ from the written ones by codec loss only (mean absolute error of a few
levels out of 255).

Reference: the V-NIAH test of LongVA (Zhang et al. 2024, "Long Context Transfer from Language to Vision"), which
inserts a needle frame into a long haystack video.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 80, 245),
    "yellow": (245, 225, 30),
    "magenta": (225, 40, 225),
    "cyan": (30, 225, 225),
}
SHAPES = ("circle", "square", "triangle", "cross")
KINDS = ("colour", "shape", "count", "order")
SPLITS = {"train": 0, "heldout": 1}
LETTERS = "ABCD"


@dataclass(frozen=True)
class Needle:
    """One needle: a ``colour`` ``shape`` drawn from frame ``start`` for ``length`` frames at (``y``, ``x``) (top-left
    of its bounding box, ``extent`` px wide)."""

    colour: str
    shape: str
    start: int
    length: int
    y: int
    x: int
    extent: int


@dataclass
class VideoTask:
    """One question about one generated video.

    Attributes:
        id: unique name, e.g. ``heldout-colour-64-0007``.
        split, kind, num_frames, index: what the item is a function of.
        question: the question text (no options).
        options: the four option texts.
        answer: the correct letter.
        depth: relative position (0..1) of the first needle within the range it can take.
        needles: where and what the needles are.
        seed: the generator's seed sequence.
    """

    id: str
    split: str
    kind: str
    num_frames: int
    index: int
    question: str
    options: list[str]
    answer: str
    depth: float
    needles: list[Needle] = field(default_factory=list)
    seed: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class TaskConfig:
    """Settings of a generated video.

    Attributes:
        size: frame side in pixels (even; 64 matches the embedded model's vision tower).
        fps: frames per second written in the mp4.
        needle_length: consecutive frames a needle stays visible.
        depth: relative position of the first needle, or None to draw it uniformly from [0, 1].
    """

    size: int = 64
    fps: int = 8
    needle_length: int = 1
    depth: float | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.size < 32 or self.size % 2:
            problems.append(f"size must be even and >= 32, got {self.size}")
        if self.fps < 1:
            problems.append(f"fps must be >= 1, got {self.fps}")
        if self.needle_length < 1:
            problems.append(f"needle_length must be >= 1, got {self.needle_length}")
        if self.depth is not None and not 0.0 <= self.depth <= 1.0:
            problems.append(f"depth must be in [0, 1], got {self.depth}")
        if problems:
            raise ValueError("invalid TaskConfig: " + "; ".join(problems))


def shape_mask(shape: str, extent: int) -> np.ndarray:
    """(extent, extent) bool mask of a filled ``shape``."""
    centre = (extent - 1) / 2.0
    y, x = np.mgrid[0:extent, 0:extent].astype(np.float64)
    if shape == "circle":
        return (y - centre) ** 2 + (x - centre) ** 2 <= (extent / 2.0) ** 2
    if shape == "square":
        return np.ones((extent, extent), dtype=bool)
    if shape == "triangle":  # apex at the top, base at the bottom
        return np.abs(x - centre) <= (y + 1) / 2.0
    if shape == "cross":
        arm = max(1, extent // 6)
        return (np.abs(y - centre) <= arm) | (np.abs(x - centre) <= arm)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float: a dim grating between two weakly tinted grey levels."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 24)
    wave = 0.5 + 0.5 * np.sin((x * np.cos(angle) + y * np.sin(angle)) * 2 * np.pi / period + rng.uniform(0, 6.3))
    low, high = rng.uniform(30, 80), rng.uniform(90, 150)
    tint = rng.uniform(-12, 12, size=3)
    grey = low + (high - low) * wave
    return np.clip(grey[..., None] + tint, 0, 255)


def _haystack(rng: np.random.Generator, num_frames: int, size: int) -> np.ndarray:
    """(num_frames, size, size, 3) uint8 scenes with scene cuts and moving grey striped distractors."""
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    t = 0
    while t < num_frames:
        length = int(rng.integers(6, 21))
        background = _background(rng, size)
        movers = []
        for _ in range(int(rng.integers(2, 4))):
            extent = int(rng.integers(size // 8, size // 4 + 1))
            movers.append({
                "mask": shape_mask(SHAPES[int(rng.integers(len(SHAPES)))], extent),
                "pos": rng.uniform(0, size - extent, size=2), "vel": rng.uniform(-2.5, 2.5, size=2),
                "grey": rng.uniform(160, 230), "stripe": int(rng.integers(2, 5)), "extent": extent,
            })
        for offset in range(min(length, num_frames - t)):
            frame = background.copy()
            for mover in movers:
                extent, (py, px) = mover["extent"], mover["pos"].astype(int)
                stripes = ((np.arange(extent)[:, None] // mover["stripe"]) % 2) * 50.0
                patch = frame[py : py + extent, px : px + extent]
                patch[mover["mask"]] = (mover["grey"] - stripes[:, [0] * extent])[mover["mask"]][:, None]
                mover["pos"] += mover["vel"]
                for axis in range(2):
                    if not 0 <= mover["pos"][axis] <= size - extent:
                        mover["vel"][axis] *= -1
                        mover["pos"][axis] = np.clip(mover["pos"][axis], 0, size - extent)
            frames[t + offset] = np.clip(frame, 0, 255).astype(np.uint8)
        t += length
    return frames


def _draw(frames: np.ndarray, needle: Needle) -> None:
    mask = shape_mask(needle.shape, needle.extent)
    for t in range(needle.start, needle.start + needle.length):
        patch = frames[t, needle.y : needle.y + needle.extent, needle.x : needle.x + needle.extent]
        patch[mask] = COLOURS[needle.colour]


def _starts(rng: np.random.Generator, num_frames: int, length: int, count: int, depth: float) -> list[int]:
    """``count`` ascending needle start frames with at least one haystack frame between needles. The first lies at
    relative ``depth`` of the range it can take (0 = frame 0; 1 = as late as the others still fit after it); the
    others are spread at random after it."""
    span = length + 1
    latest_first = num_frames - length - (count - 1) * span
    if latest_first < 0:
        raise ValueError(f"{count} needles of {length} frames do not fit in {num_frames} frames")
    first = int(round(depth * latest_first))
    room = latest_first - first  # slack left for the later needles
    slack = np.sort(rng.integers(0, room + 1, size=count - 1))
    return [first] + [first + (i + 1) * span + int(extra) for i, extra in enumerate(slack)]


def _options(rng: np.random.Generator, correct: str, pool: list[str]) -> tuple[list[str], str]:
    """Four options: ``correct`` and three others from ``pool``, shuffled; returns (options, letter)."""
    others = [p for p in pool if p != correct]
    chosen = [correct] + [others[i] for i in rng.choice(len(others), size=3, replace=False)]
    order = rng.permutation(4)
    options = [chosen[i] for i in order]
    return options, LETTERS[options.index(correct)]


def make_task(split: str, kind: str, num_frames: int, index: int,
              config: TaskConfig | None = None) -> tuple[VideoTask, np.ndarray]:
    """Generate one task and its video.

    Returns:
        the :class:`VideoTask` and its frames, (num_frames, size, size, 3) uint8 RGB.
    """
    config = config if config is not None else TaskConfig()
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
    if num_frames < 16:
        raise ValueError(f"num_frames must be >= 16, got {num_frames}")
    seed = [SPLITS[split], KINDS.index(kind), num_frames, index]
    rng = np.random.default_rng(seed)
    size, length = config.size, config.needle_length
    frames = _haystack(rng, num_frames, size)
    colours, shapes = list(COLOURS), list(SHAPES)
    count = {"count": int(rng.integers(1, 5)), "order": 2}.get(kind, 1)
    depth = float(rng.uniform()) if config.depth is None else config.depth
    starts = _starts(rng, num_frames, length, count, depth)
    colour, shape = colours[int(rng.integers(len(colours)))], shapes[int(rng.integers(len(shapes)))]
    needles = []
    for i, start in enumerate(starts):
        if kind == "order" and i == 1:
            colour = colours[(colours.index(colour) + int(rng.integers(1, len(colours)))) % len(colours)]
            shape = shapes[(shapes.index(shape) + int(rng.integers(1, len(shapes)))) % len(shapes)]
        extent = int(rng.integers(size * 3 // 8, size // 2 + 1))
        y, x = (int(v) for v in rng.integers(0, size - extent + 1, size=2))
        needles.append(Needle(colour, shape, start, length, y, x, extent))
    for needle in needles:
        _draw(frames, needle)
    first = needles[0]
    if kind == "colour":
        question = f"A {first.shape} appears in the video. What colour is it?"
        options, answer = _options(rng, first.colour, colours)
    elif kind == "shape":
        question = f"A {first.colour} object appears in the video. What shape is it?"
        options, answer = _options(rng, first.shape, shapes)
    elif kind == "count":
        question = f"How many times does the {first.colour} {first.shape} appear in the video?"
        options, answer = ["1", "2", "3", "4"], LETTERS[count - 1]
    else:
        names = [f"the {n.colour} {n.shape}" for n in needles]
        present = {(n.colour, n.shape) for n in needles}
        absent = [f"the {c} {s}" for c in colours for s in shapes if (c, s) not in present]
        chosen = names + [absent[i] for i in rng.choice(len(absent), size=2, replace=False)]
        options = [chosen[i] for i in rng.permutation(4)]
        question, answer = "Which object appears first in the video?", LETTERS[options.index(names[0])]
    task = VideoTask(
        id=f"{split}-{kind}-{num_frames}-{index:04d}", split=split, kind=kind, num_frames=num_frames, index=index,
        question=question, options=options, answer=answer, depth=depth, needles=needles, seed=seed,
    )
    return task, frames


def write_mp4(frames: np.ndarray, path: str | Path, fps: int = 8) -> None:
    """Write (T, H, W, 3) uint8 RGB frames as H.264 mp4 (libx264, yuv420p, crf 18, one thread); H, W even."""
    import av  # imported here: only the video tasks need it

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.dtype} {tuple(frames.shape)}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frame height and width must be even for yuv420p, got {frames.shape[1:3]}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "18", "threads": "1"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


QUESTIONS_FILE = "questions.jsonl"


def write_split(folder: str | Path, split: str, lengths: list[int], per_kind: int,
                kinds: tuple[str, ...] = KINDS, config: TaskConfig | None = None) -> list[VideoTask]:
    """Write ``per_kind`` tasks of every kind and length: ``folder/videos/<id>.mp4`` and one JSON line per task in
    ``folder/questions.jsonl`` (the layout :func:`namm_transfer.evals.video_qa.load_builtin` reads). Videos that
    exist already are kept (the content is a function of the id and the config)."""
    config = config if config is not None else TaskConfig()
    folder = Path(folder)
    tasks = []
    for num_frames in lengths:
        for kind in kinds:
            for index in range(per_kind):
                task, frames = make_task(split, kind, num_frames, index, config)
                video = folder / "videos" / f"{task.id}.mp4"
                if not video.is_file():
                    write_mp4(frames, video, config.fps)
                tasks.append(task)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / QUESTIONS_FILE, "w") as handle:
        for task in tasks:
            record = asdict(task)
            record["video"] = f"videos/{task.id}.mp4"
            handle.write(json.dumps(record) + "\n")
    return tasks

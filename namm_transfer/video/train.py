"""``python -m namm_transfer.video.train``: train the vision tower, the projector and (optionally) low-rank adapters
of the language model (SmolLM2, otherwise frozen) of the embedded video model on the built-in needle tasks (train
split).

LLaVA's recipe (Liu et al. 2023, "Visual Instruction Tuning", §4.2) adapted to a fresh vision tower and a tiny
language model:

* ``vision`` (``--vision-steps``, the tower alone): a linear probe reads each frame's needle colour and shape from
  the features the projector will see (:mod:`.frame_probe`), so the fresh tower learns to see before the language
  model is involved (LLaVA's CLIP tower arrives pretrained);
* ``text`` (``--text-steps``, adapters only): the question with the video replaced by a text description of its
  needles (:func:`describe_task`); the frozen SmolLM2-135M does not answer these questions even so (:mod:`.lora`),
  so its adapters first learn to answer with the right option's words, cheaply (no video tokens; 64 held-out
  descriptions: 80% right after 50 steps, 100% after 200);
* ``caption`` (``--caption-steps``): the projector and the adapters on one-frame captions ("a green circle",
  "nothing"; :mod:`.frame_caption`), LLaVA's alignment stage, 16 video tokens per example instead of 256-512;
* ``describe`` (``--describe-steps``): the projector and the adapters on whole videos, asked
  :data:`DESCRIBE_QUESTION`, target the needles in order (:func:`needle_list`, "a green circle, then a magenta
  cross"): the dense version of every question kind (each needle's colour and shape, their count and order);
* ``projector`` (``--projector-steps``): the projector (features -> word-embedding space) and the adapters;
* ``joint`` (``--tower-steps``): the projector, the vision tower and the adapters together.

With ``--lora-rank 0`` (the default) no adapter exists and the text stage must be empty: the language model stays
frozen. Stages run in that order; an empty one is skipped.

One example is a built-in task (:func:`namm_transfer.evals.video_tasks.make_task`, train split, item index = the
example's running number, so no item repeats and none is held out) with ``num_frames`` drawn from ``--frames``; its
prompt is exactly the evaluation's (:meth:`VideoQuestion.prompt` in the chat template, :mod:`.prompt`), the target is
the right option's text followed by ``<|im_end|>`` (the built-in answer rule, :mod:`namm_transfer.evals.video_qa`),
and the loss is the mean cross-entropy of those tokens. Frames go to the
model as generated (no codec round trip: the codec changes pixels by about 1.5 levels of 255 on average).

Every ``--eval-every`` steps the held-out accuracy is measured on ``--eval-items`` held-out tasks as the share whose
target is every token's argmax under teacher forcing (greedy decoding writes exactly the right option, then stops),
overall and per question kind (after the text stage), and, when there is a text stage, also on the text
descriptions of the same videos; in the vision stage, the probe's colour and shape accuracy on the frames of the
same held-out videos; in the caption stage, the share of their needle frames captioned exactly, and of their
haystack frames captioned "nothing". ``--init-from DIR`` starts a new run from another run's trained parts (its
provenance is kept in the new one's). Every step is logged to ``train_log.jsonl``; the trained parts, the probe and
the optimiser state are saved every ``--save-every`` steps, so a killed run continues with ``--resume`` (the log is
cut back to the saved step). Whenever an evaluation's held-out video accuracy beats every earlier one of the run,
the parts and the log up to that step are also written to ``best/`` (the folder to ship: the joint stage's accuracy
goes up and down by several questions between evaluations). Those questions then chose the checkpoint, so its
accuracy on them is a validation score; an unbiased one needs other questions (:func:`heldout_hits` from task 64
on, as ``docs/results/video-training/fresh-heldout/compare.py`` does, or the video program's at other lengths).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from namm_transfer.cli import ArgumentParser, run_program
from namm_transfer.evals.video_qa import VideoQuestion
from namm_transfer.evals.video_tasks import KINDS, TaskConfig, make_task
from namm_transfer.video.frame_caption import CaptionBatch, caption_batch, caption_loss, captions_right, needle_phrase
from namm_transfer.video.frame_probe import NO_NEEDLE, FrameProbe, probe_batch, probe_loss
from namm_transfer.video.frames import FrameConfig, preprocess
from namm_transfer.video.lora import LoraConfig, lora_parameters
from namm_transfer.video.model import CONFIG_FILE, VideoModel, load_embedded_video_model, save_trained_parts
from namm_transfer.video.prompt import render_video_prompt, video_prompt_ids

STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.jsonl"
BEST_DIR = "best"


@dataclass(frozen=True)
class TrainConfig:
    """Settings of a training run.

    Attributes:
        vision_steps: optimiser steps of the vision stage (tower and frame probe).
        text_steps: optimiser steps of the text stage (adapters only, text descriptions instead of videos).
        caption_steps: optimiser steps of the caption stage (projector and adapters, one-frame captions).
        describe_steps: optimiser steps of the describe stage (projector and adapters, whole-video needle lists).
        projector_steps: optimiser steps of the projector stage (projector and adapters).
        tower_steps: optimiser steps of the joint stage (projector, vision tower and adapters).
        batch_size: examples per optimiser step of the language-model stages.
        vision_videos: videos per step of the vision and caption stages (their needle frames and as many haystack
            frames).
        frames: video lengths drawn uniformly per example.
        projector_lr: AdamW learning rate of the projector stage (LLaVA's 1e-3 diverged here at batch 4: loss 4.4 -> 12
            in four steps; 2e-4 fell from 4.4 to about 2.5 in eight).
        tower_lr: AdamW learning rate of the joint stage (every trained part).
        text_lr: AdamW learning rate of the text stage.
        vision_lr: AdamW learning rate of the vision stage.
        caption_lr: AdamW learning rate of the caption stage.
        describe_lr: AdamW learning rate of the describe stage.
        lora_rank: rank of the language model's adapters (0: none, the language model frozen).
        lora_alpha: adapter scale numerator (update x alpha / rank).
        warmup: linear warm-up steps at the start of each stage; cosine decay to 10% after it.
        eval_every: steps between held-out evaluations (0: only at the end).
        eval_items: held-out tasks per evaluation (frames = the first of ``frames``).
        save_every: steps between checkpoints (0: only at the end).
        seed: initialisation seed of the fresh tower and the seed of the length draws.
    """

    vision_steps: int = 0
    text_steps: int = 0
    caption_steps: int = 0
    describe_steps: int = 0
    projector_steps: int = 200
    tower_steps: int = 800
    batch_size: int = 4
    vision_videos: int = 8
    frames: tuple[int, ...] = (16, 32)
    projector_lr: float = 2e-4
    tower_lr: float = 2e-4
    text_lr: float = 5e-4
    vision_lr: float = 1e-3
    caption_lr: float = 5e-4
    describe_lr: float = 2e-4
    lora_rank: int = 0
    lora_alpha: float = 16.0
    warmup: int = 20
    eval_every: int = 100
    eval_items: int = 64
    save_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        for name in ("vision_steps", "text_steps", "caption_steps", "describe_steps", "projector_steps", "tower_steps",
                     "lora_rank", "warmup", "eval_every", "save_every", "seed"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "vision_videos", "eval_items"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.total_steps < 1:
            problems.append("at least one training step is needed")
        if self.text_steps and not self.lora_rank:
            problems.append("text_steps train the adapters only, so they need lora_rank >= 1")
        if not self.frames or min(self.frames) < 16:
            problems.append(f"frames must be non-empty, each >= 16, got {self.frames}")
        if min(self.projector_lr, self.tower_lr, self.text_lr, self.vision_lr, self.caption_lr, self.describe_lr,
               self.lora_alpha) <= 0:
            problems.append("learning rates and lora_alpha must be positive")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))

    @property
    def total_steps(self) -> int:
        return sum(length for _, _, length, _ in _stages(self))

    @property
    def lora(self) -> LoraConfig:
        return LoraConfig(rank=self.lora_rank, alpha=self.lora_alpha)


def task_question(task) -> VideoQuestion:
    """The evaluation's view of a generated task (its prompt and answer)."""
    return VideoQuestion(id=task.id, dataset="builtin", video=Path(f"{task.id}.mp4"), question=task.question,
                         options=tuple(task.options), answer=task.answer, category=task.kind,
                         num_frames=task.num_frames)


@dataclass
class Example:
    """One training or evaluation example: ids (L,) ending in the targets, pixels (F, 3, S, S) or None for a
    text-described video, and the target ids (T,): the right option's text and ``<|im_end|>``."""

    input_ids: torch.Tensor
    pixels: torch.Tensor | None
    target_ids: torch.Tensor


DESCRIBE_QUESTION = "Which objects appear in the video, in order?"
"""The describe stage's question; its answer is :func:`needle_list`."""


def _needles_in_order(task) -> list:
    """The task's needles by first frame."""
    return sorted(task.needles, key=lambda needle: needle.start)


def needle_list(task) -> str:
    """The describe stage's target: the task's needles in order of appearance, e.g. "a green circle, then a magenta
    cross" (a count task's needle once per appearance)."""
    return ", then ".join(needle_phrase(n.colour, n.shape) for n in _needles_in_order(task))


def describe_task(task) -> str:
    """The video as text, for the text stage: its needles in order, e.g. "Video: frame 4: a green circle; frame 9: a
    magenta cross." (the haystack is not described)."""
    return "Video: " + "; ".join(f"frame {n.start}: {needle_phrase(n.colour, n.shape)}"
                                 for n in _needles_in_order(task)) + "."


def make_example(video: VideoModel, split: str, index: int, num_frames: int, text: bool = False,
                 describe: bool = False) -> Example:
    """Task ``index`` of ``split`` (kinds in turn) as model input, with the right option's text and ``<|im_end|>``
    appended to the prompt ids as targets; ``text``: the video replaced by :func:`describe_task` (no pixels);
    ``describe``: the question replaced by :data:`DESCRIBE_QUESTION` and the target by :func:`needle_list`."""
    if text and describe:
        raise ValueError("an example is either a text description or a describe question, not both")
    kind = KINDS[index % len(KINDS)]
    task, frames = make_task(split, kind, num_frames, index // len(KINDS), TaskConfig(size=video.vision.image_size))
    question = task_question(task)
    if describe:
        prompt = video_prompt_ids(video.tokenizer, video.model.config, DESCRIBE_QUESTION, num_frames)[0]
    elif text:
        rendered, templated = render_video_prompt(video.tokenizer, question.prompt(), describe_task(task))
        prompt = video.tokenizer(rendered, return_tensors="pt", add_special_tokens=not templated).input_ids[0]
    else:
        prompt = video_prompt_ids(video.tokenizer, video.model.config, question.prompt(), num_frames)[0]
    answer = needle_list(task) if describe else question.options[question.letters.index(question.answer)]
    target = torch.tensor(video.tokenizer(answer, add_special_tokens=False).input_ids + [video.tokenizer.eos_token_id])
    pixels = None if text else preprocess(frames, FrameConfig(num_frames=num_frames, size=video.vision.image_size))
    return Example(torch.cat([prompt, target]), pixels, target)


def _video_inputs(video: VideoModel, example: Example, ids: torch.Tensor) -> dict:
    device = video.model.device
    inputs = {"input_ids": ids[None].to(device)}
    if example.pixels is not None:
        inputs["pixel_values_videos"] = example.pixels[None].to(device)
    return inputs


def target_logits(video: VideoModel, example: Example) -> torch.Tensor:
    """(T, V) float logits of the positions predicting each target token (teacher forcing), one video."""
    targets = len(example.target_ids)
    return video.model(**_video_inputs(video, example, example.input_ids),
                       logits_to_keep=targets + 1).logits[0, :-1].float()


def example_loss(video: VideoModel, example: Example) -> torch.Tensor:
    """Mean cross-entropy of the target tokens (teacher forcing), one video."""
    return torch.nn.functional.cross_entropy(target_logits(video, example), example.target_ids.to(video.model.device))


@torch.no_grad()
def heldout_hits(video: VideoModel, indices: Sequence[int], num_frames: int, text: bool = False,
                 describe: bool = False) -> list[bool]:
    """For each held-out task ``index`` in ``indices`` (kind ``KINDS[index % 4]``): are its target tokens all the
    argmax under teacher forcing (greedy decoding writes the right option, then ``<|im_end|>``)? ``text``: on the
    text description of the video; ``describe``: its needle list (:func:`make_example`). Training evaluates tasks
    0 to ``eval_items`` - 1, so later ones are fresh for a checkpoint it chose."""
    video.model.eval()
    hits = []
    for index in indices:
        example = make_example(video, "heldout", index, num_frames, text=text, describe=describe)
        greedy = target_logits(video, example).argmax(dim=-1).cpu()
        hits.append(bool(torch.equal(greedy, example.target_ids)))
    return hits


def accuracy_by_kind(indices: Sequence[int], hits: Sequence[bool]) -> tuple[float, dict[str, float]]:
    """Share of ``hits`` (one per task index in ``indices``) that are right, overall and per question kind (task
    ``index`` has kind ``KINDS[index % 4]``; a kind with no task among them is left out)."""
    right = {kind: [] for kind in KINDS}
    for index, hit in zip(indices, hits, strict=True):
        right[KINDS[index % len(KINDS)]].append(hit)
    return sum(hits) / len(hits), {kind: sum(done) / len(done) for kind, done in right.items() if done}


def heldout_accuracy(video: VideoModel, items: int, num_frames: int, text: bool = False, describe: bool = False
                     ) -> tuple[float, dict[str, float]]:
    """:func:`accuracy_by_kind` of the first ``items`` held-out tasks as :func:`heldout_hits` scores them."""
    return accuracy_by_kind(range(items), heldout_hits(video, range(items), num_frames, text=text, describe=describe))


def example_frames(config: TrainConfig, index: int) -> int:
    """Video length of training example ``index``: drawn from ``config.frames`` by a generator seeded with
    (seed, index), so a resumed run sees the same examples as an uninterrupted one."""
    return config.frames[int(np.random.default_rng([config.seed, index]).integers(len(config.frames)))]


STAGES = ("vision", "text", "caption", "describe", "projector", "joint")


def _stages(config: TrainConfig) -> list[tuple[str, int, int, float]]:
    """(stage, first step, steps, learning rate) of every stage, in order (empty stages included)."""
    lengths = (config.vision_steps, config.text_steps, config.caption_steps, config.describe_steps,
               config.projector_steps, config.tower_steps)
    rates = (config.vision_lr, config.text_lr, config.caption_lr, config.describe_lr, config.projector_lr,
             config.tower_lr)
    starts = np.cumsum((0,) + lengths[:-1])
    return [(name, int(start), length, rate) for name, start, length, rate in zip(STAGES, starts, lengths, rates)]


def stage_of(step: int, config: TrainConfig) -> str:
    """The stage step ``step`` belongs to (:data:`STAGES`, in order, each ``*_steps`` long); the adapters train in
    every stage but the vision one when they exist."""
    return next((stage for stage, start, length, _ in _stages(config) if step < start + length), STAGES[-1])


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10%, restarted at each stage."""
    _, start, length, base = _stages(config)[STAGES.index(stage_of(step, config))]
    local = step - start
    if local < config.warmup:
        return base * (local + 1) / config.warmup
    progress = (local - config.warmup + 1) / max(1, length - config.warmup)  # 1 at the stage's last step
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _optimizer(video: VideoModel, stage: str, probe: FrameProbe) -> torch.optim.Optimizer:
    inner = video.model.model
    modules = {"vision": [inner.vision_tower, probe], "text": [], "caption": [inner.multi_modal_projector],
               "describe": [inner.multi_modal_projector], "projector": [inner.multi_modal_projector],
               "joint": [inner.multi_modal_projector, inner.vision_tower]}[stage]
    for parameter in list(video.model.parameters()) + list(probe.parameters()):
        parameter.requires_grad_(False)
    parameters = [p for module in modules for p in module.parameters()]
    if stage != "vision":
        parameters += lora_parameters(inner.language_model)
    for parameter in parameters:
        parameter.requires_grad_(True)
    return torch.optim.AdamW(parameters, lr=1.0, weight_decay=0.0)


@torch.no_grad()
def heldout_probe_accuracy(video: VideoModel, probe: FrameProbe, items: int, num_frames: int) -> tuple[float, float]:
    """The probe's colour and shape accuracy on the needle frames and as many haystack frames of the first ``items``
    held-out videos."""
    video.model.eval()
    batch = probe_batch("heldout", 0, items, num_frames, video.vision.image_size, seed=0)
    _, colour_right, shape_right = probe_loss(video.model, probe, batch)
    return colour_right, shape_right


@torch.no_grad()
def heldout_caption_accuracy(video: VideoModel, items: int, num_frames: int) -> tuple[float, float]:
    """Shares of the needle frames and of as many haystack frames of the first ``items`` held-out videos whose
    caption is every target token's argmax under teacher forcing."""
    video.model.eval()
    frames = probe_batch("heldout", 0, items, num_frames, video.vision.image_size, seed=0)
    batch = caption_batch(video, frames)
    right = torch.cat([captions_right(video.model, CaptionBatch(batch.input_ids[i:i + 32], batch.pixels[i:i + 32],
                                                                batch.targets[i:i + 32]))
                       for i in range(0, len(batch.targets), 32)])
    needle = frames.colours != NO_NEEDLE
    return right[needle].float().mean().item(), right[~needle].float().mean().item()


def _step_losses(video: VideoModel, probe: FrameProbe, config: TrainConfig, step: int, stage: str) -> dict:
    """Forward and backward of one optimiser step's examples; the step's log entries (mean loss, and the probe's
    training accuracies in the vision stage)."""
    if stage in ("vision", "caption"):
        first = step * config.vision_videos
        frames = probe_batch("train", first, config.vision_videos, example_frames(config, first),
                             video.vision.image_size, config.seed)
        if stage == "caption":
            loss = caption_loss(video.model, caption_batch(video, frames))
            loss.backward()
            return {"loss": loss.item()}
        loss, colour_right, shape_right = probe_loss(video.model, probe, frames)
        loss.backward()
        return {"loss": loss.item(), "colour_accuracy": colour_right, "shape_accuracy": shape_right}
    losses = []
    for i in range(config.batch_size):
        index = step * config.batch_size + i
        example = make_example(video, "train", index, example_frames(config, index), text=stage == "text",
                               describe=stage == "describe")
        loss = example_loss(video, example) / config.batch_size
        loss.backward()
        losses.append(loss.item() * config.batch_size)
    return {"loss": float(np.mean(losses))}


def _evaluate(video: VideoModel, probe: FrameProbe, config: TrainConfig, stage: str) -> dict:
    """Held-out measures for the log: the probe's in the vision stage, the captions' in the caption stage, the needle
    lists' in the describe stage, the video accuracy in the describe, projector and joint stages, and the text
    accuracy after the vision stage when there is a text stage."""
    if stage == "vision":
        colour, shape = heldout_probe_accuracy(video, probe, config.eval_items, config.frames[0])
        return {"heldout_colour_accuracy": colour, "heldout_shape_accuracy": shape}
    record = {}
    if stage == "caption":
        record["heldout_caption_accuracy"], record["heldout_nothing_accuracy"] = heldout_caption_accuracy(
            video, config.eval_items, config.frames[0])
    if stage == "describe":
        record["heldout_describe_accuracy"], _ = heldout_accuracy(video, config.eval_items, config.frames[0],
                                                                  describe=True)
    if stage in ("describe", "projector", "joint"):
        record["heldout_accuracy"], record["heldout_accuracy_by_kind"] = heldout_accuracy(
            video, config.eval_items, config.frames[0])
    if config.text_steps:
        record["heldout_text_accuracy"], _ = heldout_accuracy(video, config.eval_items, config.frames[0], text=True)
    return record


def _cut_log(path: Path, steps_done: int) -> float:
    """Drop the log records of steps after ``steps_done`` (written after the last save by a run that was killed);
    returns the training seconds logged at step ``steps_done`` (0 when none), where a resumed run's clock goes on."""
    if not path.is_file():
        return 0.0
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [record for record in records if record["step"] <= steps_done]
    path.write_text("".join(json.dumps(record) + "\n" for record in kept))
    return kept[-1]["seconds"] if kept else 0.0


def best_accuracy(folder: Path) -> float | None:
    """Held-out video accuracy of the parts saved in ``folder`` (a run's ``best/``), None when there are none."""
    if not (folder / CONFIG_FILE).is_file():
        return None
    return json.loads((folder / CONFIG_FILE).read_text())["provenance"]["last"].get("heldout_accuracy")


def train(video: VideoModel, config: TrainConfig, out: Path, resume: bool = False, max_minutes: float | None = None,
          command: str = "", init_from: dict | None = None) -> dict:
    """Run (or continue) training; write the parts, state and log to ``out``. Returns the last log record.
    ``init_from``: the folder and provenance of the parts ``video`` started from, kept in the provenance."""
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        probe = FrameProbe(video.vision.hidden_size).to(video.model.device)
    step, stage, seconds_before = 0, stage_of(0, config), 0.0
    optimizer = _optimizer(video, stage, probe)
    if resume:
        state = torch.load(out / STATE_FILE, weights_only=False)
        saved = {**asdict(TrainConfig()), **state["config"]}  # a setting added since the save has its default
        if saved != asdict(config):
            raise ValueError(f"{out / STATE_FILE} was written with other settings; start a new folder")
        step, stage = state["step"], state["stage"]  # the loop switches stage if the saved one just ended
        probe.load_state_dict(state["probe"])
        optimizer = _optimizer(video, stage, probe)
        optimizer.load_state_dict(state["optimizer"])
        seconds_before = _cut_log(out / LOG_FILE, step)
    if not resume:
        shutil.rmtree(out / BEST_DIR, ignore_errors=True)
    best = best_accuracy(out / BEST_DIR)  # a resumed run's best may lie after its last save: still a real checkpoint
    started, record = time.monotonic(), {}
    provenance = {"command": command, "config": asdict(config)}
    if init_from is not None:
        provenance["init_from"] = init_from
    while step < config.total_steps:
        if stage_of(step, config) != stage:
            stage = stage_of(step, config)
            optimizer = _optimizer(video, stage, probe)
        video.model.train()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        optimizer.zero_grad(set_to_none=True)
        losses = _step_losses(video, probe, config, step, stage)
        optimizer.step()
        step += 1
        record = {"step": step, "stage": stage, **losses, "lr": learning_rate(step - 1, config),
                  "seconds": round(seconds_before + time.monotonic() - started, 1)}
        last = step == config.total_steps
        if (config.eval_every and step % config.eval_every == 0) or last:
            record.update(_evaluate(video, probe, config, stage))
        with open(out / LOG_FILE, "a") as log:
            log.write(json.dumps(record) + "\n")
        if record.get("heldout_accuracy") is not None and (best is None or record["heldout_accuracy"] > best):
            best = record["heldout_accuracy"]
            save_trained_parts(video, out / BEST_DIR, {**provenance, "steps_done": step, "last": record})
            shutil.copyfile(out / LOG_FILE, out / BEST_DIR / LOG_FILE)
        out_of_time = max_minutes is not None and time.monotonic() - started > 60 * max_minutes
        if last or out_of_time or (config.save_every and step % config.save_every == 0):
            save_trained_parts(video, out, {**provenance, "steps_done": step, "last": record})
            torch.save({"step": step, "stage": stage, "config": asdict(config), "probe": probe.state_dict(),
                        "optimizer": optimizer.state_dict()}, out / STATE_FILE)
        if out_of_time:
            break
    video.model.eval()
    return record


def build_parser() -> ArgumentParser:
    defaults = TrainConfig()
    parser = ArgumentParser(prog="python -m namm_transfer.video.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True,
                        help="folder for vision.safetensors, config.json, log and state; best/ holds the parts of the "
                             "evaluation with the highest held-out video accuracy")
    parser.add_argument("--vision-steps", type=int, default=defaults.vision_steps,
                        help="vision stage: the tower alone, a linear probe reading each frame's needle")
    parser.add_argument("--vision-videos", type=int, default=defaults.vision_videos,
                        help="videos per vision step (their needle frames and as many others)")
    parser.add_argument("--vision-lr", type=float, default=defaults.vision_lr)
    parser.add_argument("--text-steps", type=int, default=defaults.text_steps,
                        help="text stage: adapters only, on text descriptions of the videos (needs --lora-rank)")
    parser.add_argument("--caption-steps", type=int, default=defaults.caption_steps,
                        help="caption stage: projector and adapters on one-frame captions")
    parser.add_argument("--caption-lr", type=float, default=defaults.caption_lr)
    parser.add_argument("--describe-steps", type=int, default=defaults.describe_steps,
                        help="describe stage: projector and adapters, each video's needles listed in order")
    parser.add_argument("--describe-lr", type=float, default=defaults.describe_lr)
    parser.add_argument("--projector-steps", type=int, default=defaults.projector_steps)
    parser.add_argument("--tower-steps", type=int, default=defaults.tower_steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--frames", default=",".join(map(str, defaults.frames)),
                        help="comma-separated video lengths drawn per example")
    parser.add_argument("--projector-lr", type=float, default=defaults.projector_lr)
    parser.add_argument("--tower-lr", type=float, default=defaults.tower_lr)
    parser.add_argument("--text-lr", type=float, default=defaults.text_lr)
    parser.add_argument("--lora-rank", type=int, default=defaults.lora_rank,
                        help="rank of the language model's adapters (0: the language model stays frozen)")
    parser.add_argument("--lora-alpha", type=float, default=defaults.lora_alpha)
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--eval-items", type=int, default=defaults.eval_items)
    parser.add_argument("--save-every", type=int, default=defaults.save_every)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    parser.add_argument("--init-from", default=None,
                        help="start a new run from the trained parts in this folder (same adapter rank)")
    parser.add_argument("--max-minutes", type=float, default=None, help="save and stop after this wall time")
    parser.add_argument("--device", default="cpu")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        frames = tuple(int(part) for part in args.frames.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--frames must be comma-separated integers, got {args.frames!r}") from None
    config = TrainConfig(
        vision_steps=args.vision_steps, vision_videos=args.vision_videos, vision_lr=args.vision_lr,
        text_steps=args.text_steps, caption_steps=args.caption_steps, caption_lr=args.caption_lr,
        describe_steps=args.describe_steps, describe_lr=args.describe_lr,
        projector_steps=args.projector_steps, tower_steps=args.tower_steps, batch_size=args.batch_size, frames=frames,
        projector_lr=args.projector_lr, tower_lr=args.tower_lr, text_lr=args.text_lr, lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha, warmup=args.warmup, eval_every=args.eval_every, eval_items=args.eval_items,
        save_every=args.save_every, seed=args.seed,
    )
    out = Path(args.out)
    if args.resume and not (out / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume: {out / STATE_FILE} does not exist")
    start = out if args.resume else args.init_from
    video = load_embedded_video_model(start, dtype="float32", device=args.device, seed=config.seed, lora=config.lora,
                                      merge=False)
    init_from = None
    if start is not None:
        provenance = json.loads((Path(start) / CONFIG_FILE).read_text())["provenance"]
        init_from = provenance.get("init_from") if args.resume else {"folder": str(start), "provenance": provenance}
    command = "python -m namm_transfer.video.train " + " ".join(argv if argv is not None else sys.argv[1:])
    record = train(video, config, out, resume=args.resume, max_minutes=args.max_minutes, command=command,
                   init_from=init_from)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_program(main))

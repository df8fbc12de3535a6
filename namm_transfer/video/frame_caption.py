"""One-frame captions: the cheap alignment of the projector (and adapters) with the language model.

LLaVA aligns its projector on image-caption pairs before any question answering (Liu et al. 2023, §4.2, stage 1).
Here the question-answering loss over a whole video (256-512 video tokens, ~20 s per step of 4 videos on this CPU)
left the held-out accuracy at chance after 100 projector steps even with a tower whose probe reads every needle's
colour; a caption of ONE frame costs 16 video tokens and a short prompt, so the projector learns the language
model's view of a frame from many more examples per second. A frame with a needle is captioned with its colour and
shape (:func:`needle_phrase`, "a green circle", the words every training target uses for a needle), a haystack
frame with :data:`NOTHING`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from namm_transfer.evals.video_tasks import COLOURS, SHAPES
from namm_transfer.video.frame_probe import NO_NEEDLE, ProbeBatch
from namm_transfer.video.prompt import video_prompt_ids

CAPTION_QUESTION = "What does this frame show?"
NOTHING = "nothing"
PADDING = -100
"""Target id of the positions after a short caption (``cross_entropy``'s ``ignore_index``)."""


def needle_phrase(colour: str, shape: str) -> str:
    """How every training target names a needle: "a green circle" (captions, the text stage's descriptions and the
    describe stage's needle lists in :mod:`.train`)."""
    return f"a {colour} {shape}"


def caption_text(colour: int, shape: int) -> str:
    """The caption of a frame with probe labels ``colour`` and ``shape`` (:mod:`.frame_probe`)."""
    if colour == NO_NEEDLE:
        return NOTHING
    return needle_phrase(list(COLOURS)[colour - 1], SHAPES[shape - 1])


@dataclass
class CaptionBatch:
    """Frames as one-frame videos with their captions, one row each.

    Attributes:
        input_ids: (B, P + T) the one-frame video prompt with :data:`CAPTION_QUESTION` (P tokens, the same for every
            row), then the caption and ``<|im_end|>``, right-padded with ``<|im_end|>`` to the longest (T tokens).
        pixels: (B, 1, 3, S, S) the frames.
        targets: (B, T) the caption and ``<|im_end|>``, :data:`PADDING` after it.
    """

    input_ids: torch.Tensor
    pixels: torch.Tensor
    targets: torch.Tensor


def caption_batch(video, frames: ProbeBatch) -> CaptionBatch:
    """Every frame of ``frames`` with its caption (needle frames by colour and shape, the others :data:`NOTHING`)."""
    prompt = video_prompt_ids(video.tokenizer, video.model.config, CAPTION_QUESTION, num_frames=1)[0]
    eos = video.tokenizer.eos_token_id
    captions = [video.tokenizer(caption_text(c, s), add_special_tokens=False).input_ids + [eos]
                for c, s in zip(frames.colours.tolist(), frames.shapes.tolist())]
    longest = max(map(len, captions))
    targets = torch.tensor([ids + [PADDING] * (longest - len(ids)) for ids in captions])
    answers = torch.where(targets == PADDING, eos, targets)
    input_ids = torch.cat([prompt.expand(len(captions), -1), answers], dim=1)
    return CaptionBatch(input_ids, frames.pixels[:, None], targets)


def caption_logits(llava_model, batch: CaptionBatch) -> torch.Tensor:
    """(B, T, V) float logits of the positions predicting each caption token (teacher forcing)."""
    device = llava_model.device
    width = batch.targets.shape[1]
    logits = llava_model(input_ids=batch.input_ids.to(device), pixel_values_videos=batch.pixels.to(device),
                         logits_to_keep=width + 1).logits
    return logits[:, :-1].float()


def caption_loss(llava_model, batch: CaptionBatch) -> torch.Tensor:
    """Mean over frames of the mean cross-entropy of each caption's tokens."""
    logits = caption_logits(llava_model, batch)
    targets = batch.targets.to(logits.device)
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=PADDING,
                                                  reduction="none")
    return (per_token.sum(1) / (targets != PADDING).sum(1)).mean()


@torch.no_grad()
def captions_right(llava_model, batch: CaptionBatch) -> torch.Tensor:
    """(B,) bool: every caption token is the argmax under teacher forcing (greedy decoding writes the caption)."""
    greedy = caption_logits(llava_model, batch).argmax(-1).cpu()
    padding = batch.targets == PADDING
    return ((greedy == batch.targets) | padding).all(1)

"""One-frame captions: the cheap alignment of the projector (and adapters) with the language model.

LLaVA aligns its projector on image-caption pairs before any question answering (Liu et al. 2023, §4.2, stage 1).
Here the question-answering loss over a whole video (256-512 video tokens, ~20 s per step of 4 videos on this CPU)
left the held-out accuracy at chance after 100 projector steps even with a tower whose probe reads every needle's
colour; a caption of ONE frame costs 16 video tokens and a short prompt, so the projector learns the language
model's view of a frame from many more examples per second. A frame with a needle is captioned with its colour and
shape ("a green circle", the words of :func:`namm_transfer.video.train.describe_task`), a haystack frame with
:data:`NOTHING`.
"""

from __future__ import annotations

import torch

from namm_transfer.evals.video_tasks import COLOURS, SHAPES
from namm_transfer.video.frame_probe import NO_NEEDLE, ProbeBatch
from namm_transfer.video.prompt import video_prompt_ids

CAPTION_QUESTION = "What does this frame show?"
NOTHING = "nothing"


def caption_text(colour: int, shape: int) -> str:
    """The caption of a frame with probe labels ``colour`` and ``shape`` (:mod:`.frame_probe`)."""
    if colour == NO_NEEDLE:
        return NOTHING
    return f"a {list(COLOURS)[colour - 1]} {SHAPES[shape - 1]}"


def caption_examples(video, batch: ProbeBatch) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every frame of ``batch`` as (ids (L,) ending in the targets, pixels (1, 3, S, S), targets (T,)): the
    one-frame video prompt with :data:`CAPTION_QUESTION`, then the caption and ``<|im_end|>``."""
    prompt = video_prompt_ids(video.tokenizer, video.model.config, CAPTION_QUESTION, num_frames=1)[0]
    examples = []
    for pixels, colour, shape in zip(batch.pixels, batch.colours.tolist(), batch.shapes.tolist()):
        words = video.tokenizer(caption_text(colour, shape), add_special_tokens=False).input_ids
        target = torch.tensor(words + [video.tokenizer.eos_token_id])
        examples.append((torch.cat([prompt, target]), pixels[None], target))
    return examples

"""The token ids of a video question: the text around one video placeholder, the placeholder expanded to
frames x tokens-per-frame video tokens.

The text is the tokenizer's chat template around the user message ``"<video>\\n{question}"`` when that template
renders plain-text messages (SmolLM2's ChatML does); otherwise LLaVA's conversation format
``"USER: <video>\\n{question} ASSISTANT:"``, what llava-hf's LLaVA-NeXT-Video processors produce for one video and one
text. The placeholder is the model's ``video_token_id`` written as its token string, so the tokenizer sees the same
text the official processor tokenises; the single placeholder id is then repeated (the processor repeats the string
before tokenising, which gives the same ids since the token is a special token).
"""

from __future__ import annotations

import torch

from namm_transfer.adapters.llava_next_video import expand_video_token, tokens_per_frame


def render_video_prompt(tokenizer, question: str, video_token: str) -> tuple[str, bool]:
    """The prompt text holding ``video_token`` once, and whether it came from the chat template (then its special
    tokens are already in the text)."""
    message = f"{video_token}\n{question}"
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
            )
        except Exception:  # a template that expects structured content (image/video/text parts) cannot render it
            text = ""
        if isinstance(text, str) and text.count(video_token) == 1 and question in text:
            return text, True
    return f"USER: {message} ASSISTANT:", False


def video_prompt_ids(tokenizer, config, question: str, num_frames: int) -> torch.Tensor:
    """(1, L) int64 ids of ``question`` after a video of ``num_frames`` frames, for a LLaVA-NeXT-Video ``config``;
    they hold exactly ``num_frames * tokens_per_frame(config)`` video tokens."""
    video_token = tokenizer.convert_ids_to_tokens(config.video_token_id)
    if video_token is None or tokenizer.convert_tokens_to_ids(video_token) != config.video_token_id:
        raise ValueError(f"the tokenizer has no token for the model's video_token_id {config.video_token_id}")
    text, templated = render_video_prompt(tokenizer, question, video_token)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=not templated).input_ids
    return expand_video_token(ids, config.video_token_id, num_frames * tokens_per_frame(config))

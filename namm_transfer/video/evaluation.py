"""Answering one video question with one eviction policy, and measuring what it cost in KV memory.

Used by ``python -m namm_transfer.video``. A question's video is read and preprocessed
(:mod:`namm_transfer.video.frames`), spliced into its prompt (:func:`embed_video_prompt`), prefilled in chunks and
decoded greedily through the evicting runtime (:func:`answer_video`); the record holds the answer, its correctness
under the dataset's rule, KV tokens and bytes, the bytes the method adds to them (validity, arrival indices, buffered
queries, the policy's per-token state: ``EvictingCache.policy_bytes``) and the total, each at its peak and at the end,
speed, the per-layer retention log (for matched budgets) and the
per-frame retention binned into :data:`RETENTION_BINS` positions along the video (for the heat map). A video that
cannot be read gives a record with ``failed`` set to the reason instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from namm_transfer.adapters.base import adapter_for
from namm_transfer.adapters.llava_next_video import embed_video_prompt
from namm_transfer.evals.video_qa import VideoQuestion
from namm_transfer.namm.interface import EvictionPolicy
from namm_transfer.runtime.cache import CacheConfig
from namm_transfer.runtime.runner import RunnerConfig
from namm_transfer.video.answer import RetentionRunner, answer_video
from namm_transfer.video.frames import FrameConfig, VideoReadError, load_video
from namm_transfer.video.model import load_embedded_video_model
from namm_transfer.video.prompt import video_prompt_ids
from namm_transfer.video.retention import frame_fraction

MAX_NEW_TOKENS = {"builtin": 8, "longvideobench": 32, "mlvu": 16, "videomme": 16}
"""Generation lengths of lmms-eval's task files (LongVideoBench 32, MLVU and Video-MME 16); 8 for the built-ins."""
DEFAULT_FRAMES = 32
"""Frames sampled from a benchmark video (lmms-eval's default for Hugging Face video models)."""
RETENTION_BINS = 16
"""Positions along the video the per-frame retention is averaged into (frame f of F goes to bin f * 16 // F)."""
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class VideoModelError(ValueError):
    """A model folder is not a loadable LLaVA-NeXT-Video model; the message says why in one line."""


@dataclass
class LoadedVideoModel:
    """A LLaVA-NeXT-Video model, its tokenizer, and the name it was loaded by."""

    model: torch.nn.Module
    tokenizer: object
    name: str


def load_video_model(name: str | None, parts: str | Path | None, dtype: str, device: str) -> LoadedVideoModel:
    """The embedded model (``name`` None; trained parts from ``parts``, or a fresh tower if None) or a local
    ``LlavaNextVideoForConditionalGeneration`` folder (e.g. a llava-hf/LLaVA-NeXT-Video-7B-hf snapshot)."""
    if name is None:
        video = load_embedded_video_model(parts, dtype=dtype, device=device)
        return LoadedVideoModel(video.model, video.tokenizer, "embedded-video")
    folder = Path(name).expanduser()
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise VideoModelError(f"--model {folder}: no config.json, so not a Hugging Face model folder")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except ValueError as error:
        raise VideoModelError(f"{config_path} is not JSON ({' '.join(str(error).split())})") from None
    if model_type != "llava_next_video":
        raise VideoModelError(f"--model {folder} is not a LLaVA-NeXT-Video model (model_type {model_type!r})")
    from transformers import AutoTokenizer, LlavaNextVideoForConditionalGeneration

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = LlavaNextVideoForConditionalGeneration.from_pretrained(folder, dtype=_DTYPES[dtype],
                                                                       local_files_only=True)
    except OSError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise VideoModelError(f"cannot load {folder}: {first}") from None
    return LoadedVideoModel(model.to(device).eval(), tokenizer, folder.name)


def binned_frame_retention(fraction: torch.Tensor, bins: int = RETENTION_BINS) -> list[list[float | None]]:
    """(layers, F) kept fraction per frame -> (layers, bins) mean per position bin (None for an empty bin, when
    F < bins), rounded to 4 decimals."""
    frames = fraction.shape[1]
    which = torch.arange(frames) * bins // frames
    rows = []
    for layer in fraction:
        sums = torch.zeros(bins).index_add_(0, which, layer.float())
        counts = torch.bincount(which, minlength=bins)
        rows.append([round(float(s / c), 4) if c else None for s, c in zip(sums, counts)])
    return rows


class VideoEvaluator:
    """Greedy answers of a LLaVA-NeXT-Video model whose language-model KV cache an eviction policy manages.

    Args:
        loaded: the model and tokenizer.
        cache: cache settings (policy period and attention numerics).
        chunk_size: prefill chunk length.
        frames: frames sampled per video; None: the question's own ``num_frames`` (built-in tasks) or
            :data:`DEFAULT_FRAMES`.
    """

    def __init__(self, loaded: LoadedVideoModel, cache: CacheConfig, chunk_size: int = 128, frames: int | None = None):
        self.loaded = loaded
        self.cache = cache
        self.chunk_size = chunk_size
        self.frames = frames
        self.adapter = adapter_for(loaded.model)
        self.image_size = loaded.model.config.vision_config.image_size

    def frames_for(self, question: VideoQuestion) -> int:
        return self.frames or question.num_frames or DEFAULT_FRAMES

    def run(self, question: VideoQuestion, policy: EvictionPolicy | None) -> dict:
        """Answer ``question`` under ``policy`` (None: full cache); returns the JSON-ready record."""
        num_frames = self.frames_for(question)
        try:
            pixels = load_video(question.video, FrameConfig(num_frames=num_frames, size=self.image_size))
        except VideoReadError as error:
            return {"item_id": question.id, "category": question.category, "failed": str(error)}
        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        ids = video_prompt_ids(tokenizer, model.config, question.prompt(), num_frames)
        prompt = embed_video_prompt(model, ids, pixels[None])
        max_new = MAX_NEW_TOKENS[question.dataset]
        runner = RetentionRunner(self.adapter, model, policy,
                                 RunnerConfig(chunk_size=self.chunk_size, max_new_tokens=max_new, cache=self.cache))
        answer = answer_video(runner, prompt, eos_token_id=tokenizer.eos_token_id)
        result = answer.result
        text = tokenizer.decode(result.new_tokens[0], skip_special_tokens=True)
        geometry = self.adapter.geometry(model)
        visible = result.visible_per_layer[0]  # (layers,) attendable slots at the end
        bytes_per_token = result.kv_bytes_final / max(1, sum(result.kept_per_layer))
        seconds = result.prefill_seconds + result.decode_seconds
        generated = int(result.new_tokens.shape[1])
        return {
            "item_id": question.id, "category": question.category, "answer": question.answer,
            "prediction": text, "parsed": question.parse(text), "correct": question.is_correct(text),
            "num_frames": num_frames, "prompt_tokens": prompt.length, "tokens_seen": result.tokens_seen,
            "kv_tokens_mean": float(visible.mean()),
            "kv_retained": float(visible.mean()) / result.tokens_seen,
            "kv_tokens_peak": result.kv_bytes_peak / bytes_per_token / geometry.num_layers,
            "kv_bytes_peak": result.kv_bytes_peak, "kv_bytes_final": result.kv_bytes_final,
            "policy_bytes_peak": result.policy_bytes_peak, "policy_bytes_final": result.policy_bytes_final,
            "total_bytes_peak": result.total_bytes_peak, "total_bytes_final": result.total_bytes_final,
            "seconds": seconds, "tokens_per_second": (prompt.length + generated) / seconds,
            "retention": [[r.step, r.layer, r.slots_before, r.kept] for r in result.retention],
            "frame_retention": binned_frame_retention(
                frame_fraction(answer.frame_retention, prompt.frame_of_token, prompt.num_frames)
            ),
        }


def mean_heat_map(records: list[dict]) -> np.ndarray:
    """(layers, bins) mean of the records' binned frame retention (NaN where no record has the bin)."""
    maps = np.array([[[np.nan if v is None else v for v in row] for row in r["frame_retention"]] for r in records])
    counts = np.sum(~np.isnan(maps), axis=0)
    sums = np.nansum(maps, axis=0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)

"""The embedded video model: a ``LlavaNextVideoForConditionalGeneration`` whose language model is the embedded
SmolLM2 (loaded by :func:`namm_transfer.models.load_model`, never copied) and whose small CLIP vision tower and
projector are trained here (``python -m namm_transfer.video.train``).

Built as measured in field-notes §4: ``CLIPVisionConfig(image_size=64, patch_size=8, hidden_size=256, 4 layers)``,
``spatial_pool_stride=2`` (average pooling), ``vision_feature_select_strategy="default"`` (CLS dropped; "full" breaks
the pooling reshape), ``vision_feature_layer=-1``, so 16 tokens per frame and about 3.7 M parameters outside the
language model. The video and image placeholders are two special tokens SmolLM2 never produces in chat
(:data:`VIDEO_TOKEN`, :data:`IMAGE_TOKEN`); their embeddings are always replaced by frame features.

Only the trained parts are stored (:func:`save_trained_parts`): ``vision.safetensors`` with the
``model.vision_tower.*`` and ``model.multi_modal_projector.*`` tensors and, when the language model was adapted, its
low-rank adapters (:mod:`.lora`), and ``config.json`` with the vision and adapter settings, the placeholder tokens and
the training provenance. :func:`load_embedded_video_model` assembles the full model from
SmolLM2 and such a folder, or with a freshly initialised (seeded) vision tower when no folder is given.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, CLIPVisionConfig, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

from namm_transfer.models import load_model
from namm_transfer.video.lora import LORA_SUFFIXES, LoraConfig, attach_lora, merge_lora

VIDEO_TOKEN = "<empty_output>"
IMAGE_TOKEN = "<jupyter_script>"
PARTS_FILE = "vision.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1
TRAINED_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.")
"""State-dict prefixes of the parts trained here (the pooling has no parameters; ``image_newline`` is image-only);
the language model's adapters are the entries ending in :data:`~namm_transfer.video.lora.LORA_SUFFIXES`."""


class VideoPartsError(ValueError):
    """A trained-parts folder is missing, incomplete or does not fit the model; one line says what is wrong."""


@dataclass(frozen=True)
class VisionTowerConfig:
    """The small CLIP vision tower and pooling of the embedded video model.

    Attributes:
        image_size: frame side the tower sees (frames are resized and cropped to it).
        patch_size: side of a ViT patch; image_size / patch_size patches per side.
        hidden_size: width of the tower.
        num_layers: transformer layers of the tower.
        num_heads: attention heads of the tower.
        intermediate_size: MLP width of the tower.
        spatial_pool_stride: average-pooling stride over the patch grid (tokens per frame shrink by its square).
    """

    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 1024
    spatial_pool_stride: int = 2

    def __post_init__(self) -> None:
        problems = [f"{name} must be >= 1, got {value}" for name, value in asdict(self).items() if value < 1]
        if not problems:
            if self.image_size % self.patch_size:
                problems.append(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
            elif (self.image_size // self.patch_size) % self.spatial_pool_stride:
                problems.append(
                    f"patches per side ({self.image_size // self.patch_size}) must be a multiple of "
                    f"spatial_pool_stride {self.spatial_pool_stride}"
                )
            if self.hidden_size % self.num_heads:
                problems.append(f"hidden_size {self.hidden_size} must be a multiple of num_heads {self.num_heads}")
        if problems:
            raise ValueError("invalid VisionTowerConfig: " + "; ".join(problems))

    @property
    def tokens_per_frame(self) -> int:
        return (self.image_size // self.patch_size // self.spatial_pool_stride) ** 2


def video_config(text_config, vision: VisionTowerConfig, video_token_id: int, image_token_id: int) -> LlavaNextVideoConfig:
    """A LLaVA-NeXT-Video config around ``text_config`` (the language model's own config) and ``vision``."""
    return LlavaNextVideoConfig(
        text_config=text_config.to_dict(),
        vision_config=CLIPVisionConfig(
            image_size=vision.image_size, patch_size=vision.patch_size, hidden_size=vision.hidden_size,
            intermediate_size=vision.intermediate_size, num_hidden_layers=vision.num_layers,
            num_attention_heads=vision.num_heads,
        ).to_dict(),
        video_token_index=video_token_id, image_token_index=image_token_id,
        spatial_pool_stride=vision.spatial_pool_stride, spatial_pool_mode="average",
        vision_feature_select_strategy="default", vision_feature_layer=-1,
        image_grid_pinpoints=[[vision.image_size, vision.image_size]],
    )


@dataclass
class VideoModel:
    """An assembled video model.

    Attributes:
        model: the ``LlavaNextVideoForConditionalGeneration`` (eval mode).
        tokenizer: the language model's tokenizer.
        vision: the vision settings it was built with.
        parts: the folder its trained parts came from, or None (fresh vision tower and projector).
        lora: the language model's adapter settings (rank 0: none).
    """

    model: LlavaNextVideoForConditionalGeneration
    tokenizer: object
    vision: VisionTowerConfig
    parts: Path | None
    lora: LoraConfig = LoraConfig()


def _read_parts_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise VideoPartsError(f"video parts folder {folder} does not exist")
    missing = [name for name in (PARTS_FILE, CONFIG_FILE) if not (folder / name).is_file()]
    if missing:
        raise VideoPartsError(f"{folder} is not a video parts folder: missing {', '.join(missing)}")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except ValueError as error:
        raise VideoPartsError(f"{folder / CONFIG_FILE} is not JSON ({' '.join(str(error).split())})") from None
    if config.get("format_version") != FORMAT_VERSION:
        raise VideoPartsError(
            f"{folder / CONFIG_FILE}: format_version {config.get('format_version')!r}, this version reads {FORMAT_VERSION}"
        )
    try:
        VisionTowerConfig(**config["vision"])
    except (KeyError, TypeError, ValueError) as error:
        raise VideoPartsError(f"{folder / CONFIG_FILE}: bad 'vision' settings ({error})") from None
    try:
        LoraConfig(**config.get("lora", {}))
    except (TypeError, ValueError) as error:
        raise VideoPartsError(f"{folder / CONFIG_FILE}: bad 'lora' settings ({error})") from None
    return config


def load_embedded_video_model(
    parts: str | Path | None = None,
    vision: VisionTowerConfig | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    seed: int = 0,
    lora: LoraConfig | None = None,
    merge: bool = True,
) -> VideoModel:
    """Assemble the embedded video model.

    Args:
        parts: a folder written by :func:`save_trained_parts` (its vision and adapter settings are used), or None
            for a fresh vision tower and projector initialised from ``seed``.
        vision: vision settings for a fresh tower (default :class:`VisionTowerConfig`); must be None or equal to the
            folder's settings when ``parts`` is given.
        dtype: "float32" (training), "bfloat16" or "float16".
        device: torch device string.
        seed: initialisation seed of a fresh tower (and of fresh adapters).
        lora: adapter settings for a fresh model (default none); must be None or equal to the folder's.
        merge: merge the adapters into the language model's weights (inference); False keeps them as trainable
            :class:`~namm_transfer.video.lora.LoraLinear` modules (training, resuming).

    Raises:
        VideoPartsError: the parts folder is missing, incomplete or does not fit.
        namm_transfer.models.ModelLoadError: SmolLM2 cannot be loaded.
    """
    folder = Path(parts) if parts is not None else None
    if folder is not None:
        settings = _read_parts_config(folder)
        stored = VisionTowerConfig(**settings["vision"])
        if vision is not None and vision != stored:
            raise VideoPartsError(f"{folder} was trained with {stored}, not {vision}")
        stored_lora = LoraConfig(**settings.get("lora", {}))
        if lora is not None and lora != stored_lora:
            raise VideoPartsError(f"{folder} was trained with {stored_lora}, not {lora}")
        vision, lora = stored, stored_lora
    vision = vision if vision is not None else VisionTowerConfig()
    lora = lora if lora is not None else LoraConfig()
    language = load_model(None, dtype="float32", device="cpu")
    tokenizer = language.tokenizer
    token_ids = tokenizer.convert_tokens_to_ids([VIDEO_TOKEN, IMAGE_TOKEN])
    config = video_config(language.model.config, vision, *token_ids)
    model = _assemble(config, language.model, seed)
    attach_lora(model.model.language_model, lora, seed)
    if folder is not None:
        load_trained_parts(model, folder)
    if merge:
        merge_lora(model.model.language_model)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(dtypes)}")
    model.to(device=device, dtype=dtypes[dtype]).eval()
    return VideoModel(model, tokenizer, vision, folder, lora)


def _assemble(config: LlavaNextVideoConfig, language_model: nn.Module, seed: int) -> LlavaNextVideoForConditionalGeneration:
    """The full model with ``language_model``'s own modules as its language model and head (shared, not copied;
    nothing of the 135 M language parameters is initialised only to be overwritten) and a vision tower, projector
    and image newline initialised from ``seed`` by the model's own initialisation."""
    with torch.device("meta"):
        model = LlavaNextVideoForConditionalGeneration(config)
    model.model.language_model = language_model.model
    model.lm_head = language_model.lm_head
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.model.vision_tower = AutoModel.from_config(config.vision_config)
        model.model.multi_modal_projector = type(model.model.multi_modal_projector)(config)
        std = 1 / math.sqrt(config.text_config.hidden_size)
        model.model.image_newline = nn.Parameter(torch.randn(config.text_config.hidden_size) * std)
        for module in model.model.multi_modal_projector.modules():
            model._init_weights(module)
    return model


def trained_state(model: LlavaNextVideoForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The tensors trained here: every state-dict entry under :data:`TRAINED_PREFIXES` and every unmerged adapter."""
    return {k: v for k, v in model.state_dict().items() if k.startswith(TRAINED_PREFIXES) or k.endswith(LORA_SUFFIXES)}


def save_trained_parts(video: VideoModel, folder: str | Path, provenance: dict) -> Path:
    """Write ``vision.safetensors`` (fp32) and ``config.json`` (vision and adapter settings, placeholder tokens,
    provenance, format version) to ``folder``; returns the folder. The adapters must not be merged yet."""
    folder = Path(folder)
    state = {k: v.detach().float().cpu().contiguous() for k, v in trained_state(video.model).items()}
    if video.lora.rank and not any(k.endswith(LORA_SUFFIXES) for k in state):
        raise ValueError("the model's adapters are merged: load it with merge=False to save its trained parts")
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / PARTS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
    config = {
        "format_version": FORMAT_VERSION, "vision": asdict(video.vision), "lora": asdict(video.lora),
        "language_model": "smollm2",
        "video_token": VIDEO_TOKEN, "image_token": IMAGE_TOKEN, "parameters": sum(v.numel() for v in state.values()),
        "provenance": provenance,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def load_trained_parts(model: LlavaNextVideoForConditionalGeneration, folder: str | Path) -> None:
    """Load ``folder/vision.safetensors`` into ``model``: exactly the trained tensors, same shapes, all finite."""
    folder = Path(folder)
    _read_parts_config(folder)
    try:
        state = load_file(str(folder / PARTS_FILE))
    except Exception as error:  # safetensors raises its own error type for a damaged file
        raise VideoPartsError(f"{folder / PARTS_FILE} cannot be read ({error})") from None
    expected = trained_state(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise VideoPartsError(
            f"{folder / PARTS_FILE} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise VideoPartsError(f"{folder / PARTS_FILE}: {name} has shape {tuple(tensor.shape)}, "
                                  f"the model needs {tuple(expected[name].shape)}")
        if not torch.isfinite(tensor).all():
            raise VideoPartsError(f"{folder / PARTS_FILE}: {name} holds NaN or infinite values")
    model.load_state_dict(state, strict=False)


def parameter_count(model: LlavaNextVideoForConditionalGeneration) -> int:
    """Parameters outside the language model (vision tower, projector, image newline)."""
    language = {id(p) for p in model.model.language_model.parameters()} | {id(model.lm_head.weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in language)


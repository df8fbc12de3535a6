"""NAMM weights I/O (namm_transfer/namm/checkpoint.py): safetensors + JSON sidecar, official ckpt.pt import."""

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from namm_transfer.namm.checkpoint import (
    OFFICIAL_NORM_MEAN_KEY, OFFICIAL_NORM_VAR_KEY, NammWeights, NammWeightsError, import_official_checkpoint,
    load_namm, namm_paths, save_namm,
)
from namm_transfer.namm.config import NammConfig

CONFIG = NammConfig()
PROVENANCE = {"base_model": "tiny-llama", "tasks": ["passkey"], "generations": 3, "fitness_history": [0.1, 0.25],
              "seed": 1337, "command": "python -m namm_transfer.evolve --tiny", "wall_time_s": 12.5}


def tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(CONFIG.num_params, generator=g), torch.randn(17, generator=g),
            torch.rand(17, generator=g) + 0.1)


def assert_one_line_error(call, *fragments):
    with pytest.raises(NammWeightsError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize("target", ["dir", "dir/namm.safetensors", "dir/namm.json"])
def test_round_trip_is_exact_through_the_directory_or_either_file(tmp_path, target):
    params, mean, var = tensors()
    config = NammConfig(protect_sink=4, attention_dtype="float32")
    weights_path, json_path = save_namm(tmp_path / "dir", params, mean, var, config, PROVENANCE)
    assert (weights_path.name, json_path.name) == ("namm.safetensors", "namm.json")
    loaded = load_namm(tmp_path / target)
    assert isinstance(loaded, NammWeights)
    for name, original in zip(("params", "norm_mean", "norm_var"), (params, mean, var)):
        got = getattr(loaded, name)
        assert got.dtype == torch.float32 and torch.equal(got, original)
    assert loaded.config == config
    assert {k: loaded.provenance[k] for k in PROVENANCE} == PROVENANCE
    assert loaded.provenance["library_version"] == "0.1.0"
    assert loaded.provenance["created_utc"].endswith("+00:00")
    sidecar = json.loads(json_path.read_text())
    assert sidecar["format_version"] == 1 and sidecar["config"] == config.to_dict()


def test_a_stem_file_name_gives_a_named_pair(tmp_path):
    params, mean, var = tensors()
    paths = save_namm(tmp_path / "runs" / "best.safetensors", params, mean, var, CONFIG, {})
    assert paths == (tmp_path / "runs" / "best.safetensors", tmp_path / "runs" / "best.json")
    assert paths == namm_paths(tmp_path / "runs" / "best.json")
    assert torch.equal(load_namm(paths[1]).params, params)


def test_save_accepts_a_float64_cma_mean_and_stores_float32(tmp_path):
    params = np.random.default_rng(0).normal(size=CONFIG.num_params)  # float64, as CMA-ES returns it
    _, mean, var = tensors()
    save_namm(tmp_path, params, mean, var, CONFIG, {"library_version": "pinned"})
    loaded = load_namm(tmp_path)
    assert torch.equal(loaded.params, torch.from_numpy(params).float())
    assert loaded.provenance["library_version"] == "pinned"  # given keys are not overwritten


@pytest.mark.parametrize(
    "change, fragment",
    [({"params": torch.zeros(10)}, "params has shape (10,), expected (4172,)"),
     ({"norm_var": -torch.ones(17)}, "norm_var has negative entries"),
     ({"norm_mean": torch.full((17,), float("nan"))}, "norm_mean has non-finite values"),
     ({"params": torch.zeros(4172, dtype=torch.int64)}, "params has dtype torch.int64")],
)
def test_save_refuses_bad_tensors_before_writing(tmp_path, change, fragment):
    params, mean, var = tensors()
    given = {"params": params, "norm_mean": mean, "norm_var": var, **change}
    assert_one_line_error(lambda: save_namm(tmp_path / "w", config=CONFIG, provenance={}, **given), fragment)
    assert not (tmp_path / "w").exists()


def test_save_refuses_provenance_that_is_not_json(tmp_path):
    params, mean, var = tensors()
    assert_one_line_error(lambda: save_namm(tmp_path, params, mean, var, CONFIG, {"fitness": float("nan")}),
                          "provenance is not JSON-serialisable")
    assert_one_line_error(lambda: save_namm(tmp_path, params, mean, var, CONFIG, {"when": object()}),
                          "provenance is not JSON-serialisable")


@pytest.fixture
def saved(tmp_path):
    params, mean, var = tensors()
    return save_namm(tmp_path / "namm", params, mean, var, CONFIG, PROVENANCE)


def rewrite_json(json_path, edit):
    sidecar = json.loads(json_path.read_text())
    edit(sidecar)
    json_path.write_text(json.dumps(sidecar))


def test_missing_files_are_named(saved, tmp_path):
    weights_path, json_path = saved
    assert_one_line_error(lambda: load_namm(tmp_path / "elsewhere"), "elsewhere/namm.json: file not found")
    weights_path.unlink()
    assert_one_line_error(lambda: load_namm(json_path), f"{weights_path}: file not found")


def test_bad_json_is_named(saved):
    weights_path, json_path = saved
    json_path.write_text('{"format_version": 1, "config": ')
    assert_one_line_error(lambda: load_namm(weights_path), f"{json_path}: invalid JSON")
    json_path.write_text("[1, 2]")
    assert_one_line_error(lambda: load_namm(weights_path), f"{json_path}: top level is a list")


def test_unsupported_or_missing_format_version(saved):
    weights_path, json_path = saved
    rewrite_json(json_path, lambda s: s.update(format_version=2))
    assert_one_line_error(lambda: load_namm(weights_path), f"{json_path}: unsupported format_version 2")
    rewrite_json(json_path, lambda s: s.pop("format_version"))
    assert_one_line_error(lambda: load_namm(weights_path), "missing 'format_version'")


def test_invalid_config_is_named(saved):
    weights_path, json_path = saved
    rewrite_json(json_path, lambda s: s["config"].update(n_fft=31))
    assert_one_line_error(lambda: load_namm(weights_path), f"{json_path}: bad config", "n_fft must be an even")
    rewrite_json(json_path, lambda s: s["config"].update(n_fft=32, colour="blue"))
    assert_one_line_error(lambda: load_namm(weights_path), "unknown NammConfig fields: colour")
    rewrite_json(json_path, lambda s: s.pop("config"))
    assert_one_line_error(lambda: load_namm(weights_path), "missing or non-object 'config'")


def test_config_and_tensors_must_agree(saved):
    weights_path, json_path = saved
    rewrite_json(json_path, lambda s: s["config"].update(hidden_dim=16))
    assert_one_line_error(lambda: load_namm(weights_path),
                          f"{weights_path}: params has shape (4172,), expected (2124,)")


@pytest.mark.parametrize(
    "change, fragment",
    [({"params": torch.zeros(10)}, "params has shape (10,), expected (4172,)"),
     ({"norm_mean": torch.zeros(1, 17)}, "norm_mean has shape (1, 17), expected (17,)"),
     ({"params": torch.zeros(4172, dtype=torch.float64)}, "params has dtype torch.float64, expected torch.float32"),
     ({"norm_var": torch.zeros(17, dtype=torch.bfloat16)}, "norm_var has dtype torch.bfloat16"),
     ({"params": torch.full((4172,), float("nan"))}, "params has non-finite values"),
     ({"norm_mean": torch.full((17,), float("inf"))}, "norm_mean has non-finite values"),
     ({"norm_var": torch.full((17,), -1.0)}, "norm_var has negative entries"),
     ({"extra": torch.zeros(1)}, "unexpected tensor(s) extra")],
)
def test_bad_tensors_are_named(saved, change, fragment):
    weights_path, _ = saved
    params, mean, var = tensors()
    save_file({"params": params, "norm_mean": mean, "norm_var": var, **change}, str(weights_path))
    assert_one_line_error(lambda: load_namm(weights_path.parent), f"{weights_path}: {fragment}")


def test_missing_tensor_and_corrupt_file_are_named(saved):
    weights_path, _ = saved
    params, mean, _ = tensors()
    save_file({"params": params, "norm_mean": mean}, str(weights_path))
    assert_one_line_error(lambda: load_namm(weights_path), f"{weights_path}: missing tensor(s) norm_var")
    weights_path.write_bytes(b"\x00\x01garbage")
    assert_one_line_error(lambda: load_namm(weights_path), f"{weights_path}: not a readable safetensors file")


def test_weights_validate_on_creation():
    params, mean, var = tensors()
    assert_one_line_error(lambda: NammWeights(params[:5], mean, var, CONFIG), "NammWeights: params has shape (5,)")
    assert_one_line_error(lambda: NammWeights(params, mean, var, CONFIG.to_dict()), "config is a dict")


def official_checkpoint(path, mean=None, norm_mean=None, norm_var=None, **overrides):
    """Write a synthetic evo-memory ckpt.pt with the layout of namm-spec.md §5.4 (small placeholders for the
    covariance and sample matrices, which the importer must ignore)."""
    params, mu, var = tensors(seed=4)
    state = OrderedDict(
        mu_eff=torch.tensor(16.0), weights=torch.rand(32), g=torch.tensor(120), sigma=torch.tensor(0.065),
        best_member=torch.randn(4172), evo_path_c=torch.zeros(4172), C=torch.eye(3), sample_C=torch.eye(3),
        mean=params if mean is None else mean,
    )
    for prefix in ("stored_buffers_to_save.", "best_stored_buffers_to_save."):
        state[prefix + "token_embedding_0_output_num"] = torch.full((1, 1, 1, 17), 1000.0)
        state[prefix + "token_embedding_0_output_mean"] = (mu if norm_mean is None else norm_mean).view(1, 1, 1, 17)
        state[prefix + "token_embedding_0_output_var"] = (var if norm_var is None else norm_var).view(1, 1, 1, 17)
    state.update(overrides)
    torch.save({"evolution_state": state, "iter_num": 140, "best_val_loss": 0.87}, path)
    return params, mu, var


def test_import_official_checkpoint(tmp_path):
    params, mu, var = official_checkpoint(tmp_path / "ckpt.pt")
    weights = import_official_checkpoint(tmp_path / "ckpt.pt")
    assert torch.equal(weights.params, params)
    assert torch.equal(weights.norm_mean, mu) and torch.equal(weights.norm_var, var)
    assert weights.config == NammConfig()
    assert weights.provenance["iter_num"] == 140 and weights.provenance["best_val_performance"] == 0.87
    # an imported NAMM saves and reloads like any other
    save_namm(tmp_path / "out", weights.params, weights.norm_mean, weights.norm_var, weights.config,
              weights.provenance)
    assert torch.equal(load_namm(tmp_path / "out").params, params)


def test_import_converts_half_precision_to_float32(tmp_path):
    official_checkpoint(tmp_path / "ckpt.pt", mean=torch.ones(4172, dtype=torch.bfloat16))
    weights = import_official_checkpoint(tmp_path / "ckpt.pt")
    assert weights.params.dtype == torch.float32 and torch.equal(weights.params, torch.ones(4172))


@pytest.mark.parametrize(
    "kwargs, fragment",
    [({"mean": torch.zeros(2026)}, "evolution_state['mean'] has shape (2026,), expected (4172,)"),
     ({OFFICIAL_NORM_VAR_KEY: torch.zeros(17)}, "_output_var'] has shape (17,), expected (1, 1, 1, 17)"),
     ({OFFICIAL_NORM_MEAN_KEY: "not a tensor"}, "has no tensor 'stored_buffers_to_save.token_embedding_0_output_mean'"),
     ({"mean": torch.zeros(4172, dtype=torch.int32)}, "has dtype torch.int32, expected floating point"),
     ({"norm_var": -torch.ones(17)}, "norm_var has negative entries"),
     ({"mean": torch.full((4172,), float("nan"))}, "params has non-finite values")],
)
def test_import_rejects_bad_official_layouts(tmp_path, kwargs, fragment):
    official_checkpoint(tmp_path / "ckpt.pt", **kwargs)
    assert_one_line_error(lambda: import_official_checkpoint(tmp_path / "ckpt.pt"), "ckpt.pt: ", fragment)


class NotATensor:
    """A pickled custom object: torch.load(weights_only=True) must refuse it."""


def test_import_refuses_unsafe_pickles_and_non_checkpoints(tmp_path):
    torch.save({"evolution_state": {"mean": NotATensor()}}, tmp_path / "unsafe.pt")
    message = assert_one_line_error(lambda: import_official_checkpoint(tmp_path / "unsafe.pt"),
                                    "unsafe.pt: cannot be loaded with torch.load(weights_only=True)",
                                    "Unsupported global", "NotATensor")
    assert "weights_only` set to `False`" not in message and "\x1b" not in message  # torch's advice dropped
    (tmp_path / "garbage.pt").write_bytes(b"not a pickle")
    assert_one_line_error(lambda: import_official_checkpoint(tmp_path / "garbage.pt"),
                          "garbage.pt: cannot be loaded with torch.load(weights_only=True)")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    assert_one_line_error(lambda: import_official_checkpoint(tmp_path / "other.pt"),
                          "other.pt: no 'evolution_state' dict")
    assert_one_line_error(lambda: import_official_checkpoint(tmp_path / "absent.pt"), "absent.pt: file not found")

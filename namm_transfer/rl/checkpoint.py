"""Decision Transformer checkpoints: a Hugging Face ``DecisionTransformerModel`` folder plus what acting needs.

A folder written by ``python -m namm_transfer.rl.train`` holds ``config.json`` and the weights
(``save_pretrained``) and :data:`INFO_FILE` (state mean/std, target returns, return scale, K, env, dataset id and
its reference scores, plus the training record). A snapshot of Beeching & Simonini's hub checkpoints
(``edbeeching/decision-transformer-gym-hopper-medium``: ``config.json`` + weights, no info file) loads the same
way when its state mean/std (from the model card) come as a JSON file or a mapping: ``{"state_mean": [...],
"state_std": [...]}``, optionally with ``env``, ``target_returns``, ``return_scale``, ``context``; the env is
otherwise read from the folder's name, K defaults to 20 and the targets to the env's DT targets.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Mapping

from namm_transfer.evals.control import ENVS, control_env

INFO_FILE = "dt.json"
"""The JSON beside a DT's Hugging Face files."""

FORMAT_VERSION = 1


@dataclass(frozen=True)
class DTInfo:
    """How to act with a DT (the DT conventions: Chen et al. 2021; Beeching & Simonini's checkpoints).

    Attributes:
        env: control env short name (``hopper``; :data:`namm_transfer.evals.control.ENVS`).
        state_mean, state_std: (state_dim,) observation normalisation (the training data's).
        target_returns: evaluation targets, unscaled (high first: hopper 3600, 1800).
        return_scale: returns-to-go are divided by it (1000).
        context: K, timesteps of context the DT was trained with (20).
        dataset_id: Minari id of the training data (None for imported checkpoints whose data is unknown here).
        ref_min_score, ref_max_score: that dataset's reference returns (None when unknown).
    """

    env: str
    state_mean: tuple[float, ...]
    state_std: tuple[float, ...]
    target_returns: tuple[float, ...]
    return_scale: float = 1000.0
    context: int = 20
    dataset_id: str | None = None
    ref_min_score: float | None = None
    ref_max_score: float | None = None

    def __post_init__(self) -> None:
        control_env(self.env)
        object.__setattr__(self, "state_mean", tuple(float(x) for x in self.state_mean))
        object.__setattr__(self, "state_std", tuple(float(x) for x in self.state_std))
        object.__setattr__(self, "target_returns", tuple(float(x) for x in self.target_returns))
        problems = []
        if not self.state_mean or len(self.state_mean) != len(self.state_std):
            problems.append("state_mean and state_std must be non-empty and of the same length")
        if any(not s > 0 for s in self.state_std):
            problems.append("state_std must be positive")
        if not self.target_returns:
            problems.append("target_returns must not be empty")
        if not self.return_scale > 0:
            problems.append(f"return_scale must be > 0, got {self.return_scale}")
        if self.context < 1:
            problems.append(f"context must be >= 1, got {self.context}")
        if (self.ref_min_score is None) != (self.ref_max_score is None):
            problems.append("ref_min_score and ref_max_score must both be given or both be None")
        if problems:
            raise ValueError("invalid DT info: " + "; ".join(problems))

    @property
    def gym_id(self) -> str:
        return control_env(self.env).gym_id

    def to_json(self) -> dict:
        return {"format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: Mapping) -> "DTInfo":
        """The info from a :data:`INFO_FILE` dict (extra keys, such as the training record, are ignored)."""
        if data.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise ValueError(f"DT info format_version {data['format_version']} is not {FORMAT_VERSION}")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _env_from_name(folder: Path) -> str:
    found = [name for name in ENVS if name in folder.resolve().as_posix().lower()]
    if len(found) != 1:
        raise ValueError(f"cannot tell the env of {folder} from its name; give it as 'env' with the state mean/std")
    return found[0]


def _snapshot_info(folder: Path, stats: str | Path | Mapping | None, config) -> DTInfo:
    if stats is None:
        raise ValueError(f"{folder} has no {INFO_FILE}; give the state mean/std (model card) as a JSON file")
    if not isinstance(stats, Mapping):
        path = Path(stats)
        if not path.is_file():
            raise FileNotFoundError(f"no state mean/std JSON at {path}")
        stats = json.loads(path.read_text())
    missing = {"state_mean", "state_std"} - set(stats)
    if missing:
        raise ValueError(f"the state statistics lack {', '.join(sorted(missing))}")
    env = stats.get("env") or _env_from_name(folder)
    return DTInfo(
        env=env, state_mean=stats["state_mean"], state_std=stats["state_std"],
        target_returns=stats.get("target_returns", control_env(env).target_returns),
        return_scale=stats.get("return_scale", 1000.0),
        context=stats.get("context", getattr(config, "max_length", None) or 20),
        dataset_id=stats.get("dataset_id"),
        ref_min_score=stats.get("ref_min_score"), ref_max_score=stats.get("ref_max_score"),
    )


def check_sizes(config, gym_id: str, stats_entries: int, episode_steps: int | None = None) -> None:
    """ValueError (one line) unless a DT config's state/action sizes fit the env ``gym_id``, its state statistics
    have ``stats_entries`` entries, and it embeds ``episode_steps`` timesteps (default: the env's time limit)."""
    import gymnasium as gym

    env = gym.make(gym_id)
    state_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    limit = env.spec.max_episode_steps if episode_steps is None else episode_steps
    env.close()
    if (config.state_dim, config.act_dim) != (state_dim, act_dim):
        raise ValueError(f"the DT has state_dim {config.state_dim} and act_dim {config.act_dim}, but {gym_id} "
                         f"has {state_dim} and {act_dim}")
    if stats_entries != state_dim:
        raise ValueError(f"the state mean/std have {stats_entries} entries, {gym_id} has {state_dim}")
    if config.max_ep_len < limit:
        raise ValueError(f"the DT embeds {config.max_ep_len} timesteps, {gym_id} episodes last {limit}")


def load_dt(path: str | Path, stats: str | Path | Mapping | None = None, device: str = "cpu", env: str | None = None):
    """Load a DT folder -> ``(DecisionTransformerModel in eval mode, DTInfo)``.

    ``stats`` (a JSON path or a mapping) is needed only for a folder without :data:`INFO_FILE` (a hub snapshot);
    given for a folder with one, it is an error. ``env``, if given, is the env the caller will run: a DT of
    another env is refused before its weights load. Raises FileNotFoundError / ValueError with one-line messages
    for a missing folder, missing weights, bad statistics, another env or sizes that do not fit the env.
    """
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no Decision Transformer folder at {folder} (config.json missing)")
    config = DecisionTransformerConfig.from_pretrained(folder)
    if config.model_type != "decision_transformer":
        raise ValueError(f"{folder} holds a {config.model_type!r} model, not a decision_transformer")
    info_path = folder / INFO_FILE
    if info_path.is_file():
        if stats is not None:
            raise ValueError(f"{folder} has its own {INFO_FILE}; do not pass state statistics for it")
        info = DTInfo.from_json(json.loads(info_path.read_text()))
    else:
        info = _snapshot_info(folder, stats, config)
    if env is not None and info.env != env:
        raise ValueError(f"{folder} is a DT for {info.env!r}, not {env!r}; pass --env {info.env}")
    check_sizes(config, info.gym_id, len(info.state_mean))
    if not any((folder / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
        raise FileNotFoundError(f"no weights (model.safetensors or pytorch_model.bin) in {folder}")
    model = DecisionTransformerModel.from_pretrained(folder, config=config).to(device).eval()
    return model, info

"""``python -m namm_transfer.rl``: zero-shot transfer of a text-trained NAMM to a Decision Transformer.

Runs the same episodes (same env seeds) under every condition of :mod:`namm_transfer.rl.conditions` (the DT's own
K-window loop, the whole episode in the cache, the NAMM, and H2O / L2 / recency / random at the NAMM's budget and at
the window's size), then reports returns with 95% intervals, D4RL- and Minari-normalised scores, KV memory and
speed. Results folder: one run folder per condition (``config.json``, ``predictions.jsonl`` with one line per
episode, written as each seed's batch finishes, ``metrics.json``), ``summary.json``, a table on stdout and three
plots. A rerun skips finished batches.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from namm_transfer.cli import (
    ArgumentParser,
    IntRange,
    check_device,
    check_output_dir,
    check_readable_dir,
    check_readable_file,
    name_list,
    run_program,
)
from namm_transfer.atomic import atomic_write
from namm_transfer.evals.control import ENVS, control_env
from namm_transfer.evals.report import RunFolder, format_table
from namm_transfer.namm.checkpoint import load_namm
from namm_transfer.rl import plots
from namm_transfer.rl.checkpoint import load_dt
from namm_transfer.rl.conditions import ALL_LABELS, Condition, run_condition
from namm_transfer.rl.rollout import BatchResult, RolloutSettings
from namm_transfer.rl.summary import condition_metrics, paired_difference
from namm_transfer.runtime.cache import CacheConfig
from namm_transfer.shipped import shipped_weights

SEED_STRIDE = 10_000
"""Episode ``i`` of seed ``s`` resets its env with seed ``SEED_STRIDE * s + i``."""


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m namm_transfer.rl",
        description="Evaluate a Decision Transformer on MuJoCo under the full cache, a NAMM and the baselines.",
    )
    parser.add_argument("--env", default="hopper", help=f"control env: {', '.join(ENVS)} (default hopper)")
    parser.add_argument("--model", default=None,
                        help="DT folder (ours, or a local edbeeching/decision-transformer-gym-* snapshot); "
                             "default: the shipped weights/dt/<env>-medium")
    parser.add_argument("--stats", default=None,
                        help="JSON with state_mean/state_std for a hub snapshot folder without dt.json")
    parser.add_argument("--namm", default=None, help="NAMM weights folder or file (default: the shipped weights/namm)")
    parser.add_argument("--episodes", type=IntRange(1, 1000), default=10,
                        help="episodes per seed, run together in one batch (%(type)s, default 10)")
    parser.add_argument("--seeds", type=name_list, default=("0",),
                        help="comma-separated seeds; episode i of seed s uses env seed 10000 s + i (default 0)")
    parser.add_argument("--target-return", type=float, default=None,
                        help="initial return-to-go, unscaled (default: the DT's first target, e.g. 3600 for hopper)")
    parser.add_argument("--conditions", type=name_list, default=ALL_LABELS,
                        help=f"comma-separated subset of {', '.join(ALL_LABELS)} (default all)")
    parser.add_argument("--update-every", type=IntRange(3, 3000), default=48,
                        help="tokens between policy steps, a multiple of 3 and of the NAMM's STFT hop 16 "
                             "(%(type)s, default 48 = 16 timesteps)")
    parser.add_argument("--max-episode-steps", type=IntRange(1, 1000), default=1000,
                        help="episode length limit (%(type)s, default 1000)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    parser.add_argument("--out", default=None, help="results folder (default results/rl/<env>)")
    return parser


def _parse_seeds(texts: Sequence[str]) -> list[int]:
    seeds = []
    for text in texts:
        try:
            seeds.append(int(text))
        except ValueError:
            raise ValueError(f"--seeds: {text!r} is not an integer") from None
    if not seeds or min(seeds) < 0 or max(seeds) > 99_999 or len(set(seeds)) != len(seeds):
        raise ValueError("--seeds needs distinct integers in 0..99999")
    return seeds


def _conditions(labels: Sequence[str]) -> list[Condition]:
    conditions = [Condition.parse(label) for label in labels]
    if not conditions:
        raise ValueError(f"--conditions: none given; valid: {', '.join(ALL_LABELS)}")
    if any(c.budget == "matched" for c in conditions) and not any(c.rule == "namm" for c in conditions):
        raise ValueError("--conditions: a '@matched' baseline needs 'namm' in the same run")
    # the NAMM runs before the baselines that replay its budget
    return sorted(conditions, key=lambda c: ALL_LABELS.index(c.label))


def _budget_path(folder: RunFolder, seed: int) -> Path:
    return folder.path / f"budget_seed{seed}.json"


def _save_budget(folder: RunFolder, seed: int, result: BatchResult) -> None:
    folder.path.mkdir(parents=True, exist_ok=True)
    rows = [[step, layer, value] for (step, layer), value in sorted(result.visible_by_step.items())]
    atomic_write(_budget_path(folder, seed), json.dumps(rows) + "\n")


def _load_budget(folder: RunFolder, seed: int) -> dict[tuple[int, int], float]:
    path = _budget_path(folder, seed)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: the NAMM's budget of seed {seed} is unreadable ({error}); delete the namm folder "
                         "and rerun") from None
    return {(int(step), int(layer)): float(value) for step, layer, value in rows}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # every check before any load or write
    env = control_env(args.env)
    seeds = _parse_seeds(args.seeds)
    conditions = _conditions(args.conditions)
    if args.update_every % 3 or args.update_every % 16:
        raise ValueError(f"--update-every must be a multiple of 3 and of 16 (48, 96, ...), got {args.update_every}")
    device = check_device(args.device)
    model_dir = check_readable_dir(args.model, "--model") if args.model else shipped_weights(f"dt/{env.name}-medium")
    stats = check_readable_file(args.stats, "--stats") if args.stats else None
    uses_namm = any(c.rule == "namm" for c in conditions)
    namm_path = (args.namm or shipped_weights("namm")) if uses_namm else None
    out = check_output_dir(args.out or Path("results") / "rl" / env.name, "--out")

    namm = load_namm(namm_path) if uses_namm else None
    model, info = load_dt(model_dir, stats, device=str(device), env=env.name)
    torch.manual_seed(0)
    settings = RolloutSettings(
        gym_id=env.gym_id, state_mean=info.state_mean, state_std=info.state_std,
        target_return=args.target_return if args.target_return is not None else info.target_returns[0],
        return_scale=info.return_scale, context=info.context, max_episode_steps=args.max_episode_steps,
    )
    cache_config = CacheConfig(update_every=args.update_every)  # numerics: the NAMM's own declaration
    ref_scores = None
    if info.ref_min_score is not None and info.ref_max_score is not None:
        ref_scores = (info.ref_min_score, info.ref_max_score)
    identity = {
        "env": env.name, "model": str(Path(model_dir).resolve()), "namm": str(Path(namm_path).resolve()) if namm_path else None,
        "target_return": settings.target_return, "update_every": args.update_every,
        "max_episode_steps": args.max_episode_steps, "episodes_per_seed": args.episodes, "device_type": device.type,
    }
    folders = {}
    for condition in conditions:
        folder = RunFolder(out, condition.label.replace("@", "_at_"))
        folder.start({**identity, "condition": condition.label})
        folders[condition.label] = folder

    # seed-major: every finished seed holds all conditions, so a cut run still gives a complete table
    done = {label: folder.done_ids() for label, folder in folders.items()}
    seconds = {label: folder.metrics().get("seconds", 0.0) for label, folder in folders.items()}
    with tqdm(total=len(conditions) * len(seeds), desc=f"{env.name} batches", unit="batch", file=sys.stderr) as bar:
        for seed in seeds:
            env_seeds = [SEED_STRIDE * seed + i for i in range(args.episodes)]
            ids = [f"{seed}-{i}" for i in range(args.episodes)]
            for condition in conditions:
                folder = folders[condition.label]
                bar.set_postfix_str(f"seed {seed} {condition.label}")
                if all(i in done[condition.label] for i in ids):
                    bar.update()
                    continue
                namm_budget = _load_budget(folders["namm"], seed) if condition.budget == "matched" else None
                start = time.perf_counter()
                result = run_condition(condition, model, env_seeds, settings, cache_config, namm=namm,
                                       namm_visible_by_step=namm_budget, seed=seed)
                seconds[condition.label] += time.perf_counter() - start
                if condition.rule == "namm":
                    _save_budget(folder, seed, result)
                for item_id, episode in zip(ids, result.episodes):
                    if item_id not in done[condition.label]:
                        folder.append_prediction({"item_id": item_id, **asdict(episode)})
                folder.write_metrics({"seconds": seconds[condition.label]}, update=True)
                bar.update()

    records = {label: folder.predictions() for label, folder in folders.items()}
    metrics = {}
    for label, folder in folders.items():
        metrics[label] = condition_metrics(records[label], env, ref_scores, seconds[label])
        folder.write_metrics(metrics[label], update=True)
    paired = {}
    if "namm" in records:
        for label in records:
            if label != "namm":
                paired[f"namm - {label}"] = paired_difference(records["namm"], records[label], env)
    summary = {"config": identity, "seeds": seeds, "dt": info.to_json(),
               "conditions": metrics, "paired_d4rl_difference": paired}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    _report(out, env.name, metrics, records, model)
    return 0


def _report(out: Path, env_name: str, metrics: dict, records: dict, model) -> None:
    rows = []
    for label, m in metrics.items():
        row = {
            "condition": label, "episodes": m["episodes"],
            "return": f"{m['return_mean']:.0f} ± {m['return_std']:.0f}",
            "D4RL score [95% CI]": f"{m['d4rl_score']:.1f} [{m['d4rl_score_ci95'][0]:.1f}, {m['d4rl_score_ci95'][1]:.1f}]",
        }
        if "minari_score" in m:
            row["Minari score"] = round(m["minari_score"], 1)
        row.update({
            "KV tokens/layer mean": round(m["kv_tokens_mean"], 1), "peak": round(m["kv_tokens_peak"], 1),
            "KV KiB mean": round(m["kv_bytes_mean"] / 1024, 1),
            "KV+policy KiB mean": round(m["total_bytes_mean"] / 1024, 1), "steps/s": round(m["env_steps_per_second"] or 0, 0),
        })
        rows.append(row)
    print(format_table(rows, float_digits=1))
    title = f"{env_name}: DT with an evicting KV cache"
    plots.plot_score_vs_memory(metrics, out / "score_vs_kv.png", title)
    curves = {label: [r["cache_curve"] for r in recs] for label, recs in records.items()}
    plots.plot_cache_curves(curves, out / "cache_size.png", title)
    if "namm" in records:
        heads_x_layers = model.config.n_layer * model.config.n_head
        plots.plot_kept_by_age(plots.kept_share_by_age(records["namm"], heads_x_layers), out / "namm_kept_by_age.png",
                               f"{env_name}: what the NAMM keeps")
    print(f"results: {out}")


if __name__ == "__main__":
    sys.exit(run_program(main, interrupted="interrupted: finished seed batches are saved; rerun the same command "
                                           "to resume"))

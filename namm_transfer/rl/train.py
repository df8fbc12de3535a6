"""``python -m namm_transfer.rl.train``: train a Decision Transformer on a local Minari dataset.

A ``transformers.DecisionTransformerModel`` (GPT-2 backbone) in the size of Beeching & Simonini's Hugging Face
checkpoints (hidden 128, 3 layers, 1 head, ReLU, K = 20, max_ep_len 1000, tanh actions) with the usual recipe
(Chen et al. 2021): K-step segments drawn in proportion to episode length, returns-to-go scaled by 1000, states
normalised by the dataset's mean/std, MSE on the predicted actions, AdamW (lr 1e-4, weight decay 1e-4) with a
linear warm-up, gradient norm clipped to 0.25, dropout 0.1. Every ``--eval-every`` steps a quick evaluation plays
a few episodes with the standard K-window rollout at the env's high target return. The output folder holds the
``save_pretrained`` files, ``dt.json`` (what :func:`namm_transfer.rl.checkpoint.load_dt` needs plus the training
record: command, wall time, dataset, final evaluation) and ``train_log.jsonl`` (loss and evaluations over time).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from namm_transfer.cli import ArgumentParser, run_program

LOG_FILE = "train_log.jsonl"
EVAL_SEED = 10_000_000
"""First env seed of the quick evaluations (far from the dataset's episode seeds)."""


@dataclass(frozen=True)
class TrainConfig:
    """DT size and training recipe (defaults: Beeching & Simonini's checkpoints and the original DT gym recipe,
    except the number of steps and the warm-up, sized for a 2-core CPU: the original runs 100k steps of which
    10k warm up).

    Attributes:
        steps: gradient steps.
        batch_size: segments per step.
        learning_rate, weight_decay: AdamW.
        warmup_steps: the learning rate rises linearly from lr / warmup_steps to lr over these steps, then stays.
        grad_clip: max gradient norm.
        context: K, timesteps per segment.
        hidden_size, n_layer, n_head, dropout: GPT-2 backbone (dropout on residuals, attention and embeddings).
        max_ep_len: timesteps the timestep embedding covers.
        return_scale: returns-to-go are divided by it.
        seed: torch and segment sampling.
        log_every: steps between loss records (mean loss over them).
        eval_every: steps between quick evaluations (0: only at the end).
        eval_episodes: episodes per quick evaluation.
        max_minutes: wall-time limit: training stops after the first step past it (evaluated and saved, the steps
            done recorded), for a shared CPU; None: no limit.
    """

    steps: int = 2_000
    batch_size: int = 64
    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    grad_clip: float = 0.25
    context: int = 20
    hidden_size: int = 128
    n_layer: int = 3
    n_head: int = 1
    dropout: float = 0.1
    max_ep_len: int = 1000
    return_scale: float = 1000.0
    seed: int = 0
    log_every: int = 100
    eval_every: int = 500
    eval_episodes: int = 5
    max_minutes: float | None = None

    def __post_init__(self) -> None:
        problems = []
        for name in ("steps", "batch_size", "warmup_steps", "context", "hidden_size", "n_layer", "n_head",
                     "max_ep_len", "log_every", "eval_episodes"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.max_minutes is not None and not self.max_minutes > 0:
            problems.append("max_minutes must be > 0")
        if self.eval_every < 0:
            problems.append("eval_every must be >= 0")
        if self.hidden_size % self.n_head:
            problems.append(f"n_head {self.n_head} must divide hidden_size {self.hidden_size}")
        if not (self.learning_rate > 0 and self.weight_decay >= 0 and self.grad_clip > 0 and self.return_scale > 0):
            problems.append("learning_rate, grad_clip and return_scale must be > 0, weight_decay >= 0")
        if not 0 <= self.dropout < 1:
            problems.append("dropout must be in [0, 1)")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))


def build_model(config: TrainConfig, state_dim: int, act_dim: int):
    """A freshly initialised ``DecisionTransformerModel`` of ``config``'s size (torch's RNG: seed it first)."""
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    return DecisionTransformerModel(DecisionTransformerConfig(
        state_dim=state_dim, act_dim=act_dim, hidden_size=config.hidden_size, max_ep_len=config.max_ep_len,
        action_tanh=True, n_layer=config.n_layer, n_head=config.n_head, n_inner=4 * config.hidden_size,
        activation_function="relu", n_positions=1024, resid_pdrop=config.dropout, embd_pdrop=config.dropout,
        attn_pdrop=config.dropout, bos_token_id=None, eos_token_id=None,
    ))


def action_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean squared error of the predicted actions over the unpadded positions of a segment batch."""
    predicted = model(**batch, return_dict=True).action_preds
    valid = batch["attention_mask"].bool()
    return torch.mean((predicted[valid] - batch["actions"][valid]) ** 2)


def quick_eval(model, info, episodes: int, target_return: float) -> dict:
    """Mean/std return and mean length of ``episodes`` window-rollout episodes (seeds from :data:`EVAL_SEED`)."""
    from namm_transfer.evals.control import control_env
    from namm_transfer.rl.rollout import RolloutSettings, window_rollout

    settings = RolloutSettings(info.gym_id, info.state_mean, info.state_std, target_return, info.return_scale,
                               info.context, control_env(info.env).max_episode_steps)
    was_training = model.training
    model.eval()
    result = window_rollout(model, list(range(EVAL_SEED, EVAL_SEED + episodes)), settings)
    model.train(was_training)
    returns = np.array([e.episode_return for e in result.episodes])
    return {"target_return": target_return, "episodes": episodes, "return_mean": float(returns.mean()),
            "return_std": float(returns.std()), "length_mean": float(np.mean([e.length for e in result.episodes])),
            "seconds": round(result.seconds, 1)}


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m namm_transfer.rl.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="local Minari dataset id (namm-transfer/hopper/medium-v0)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/dt/<env>-<quality>)")
    defaults = TrainConfig()
    p.add_argument("--steps", type=int, default=defaults.steps, help=f"gradient steps (default {defaults.steps})")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.learning_rate)
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    p.add_argument("--context", type=int, default=defaults.context, help="K (default 20)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--log-every", type=int, default=defaults.log_every)
    p.add_argument("--eval-every", type=int, default=defaults.eval_every, help="steps between quick evaluations")
    p.add_argument("--eval-episodes", type=int, default=defaults.eval_episodes)
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop after this wall time (the steps done are recorded); default: no limit")
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    return p


def _default_out(dataset_id: str) -> Path:
    parts = dataset_id.split("/")
    return Path("runs") / "dt" / f"{parts[-2]}-{parts[-1].rsplit('-v', 1)[0]}" if len(parts) >= 2 else Path("runs/dt")


def train(config: TrainConfig, data, out: Path, command: str, device: str = "cpu"):
    """Train a DT on ``data`` (:class:`namm_transfer.rl.dataset.Trajectories`) and save it into ``out``.

    Writes the ``save_pretrained`` files, :data:`namm_transfer.rl.checkpoint.INFO_FILE` and :data:`LOG_FILE`
    (streamed as training goes); returns ``(model in eval mode, DTInfo)``, what ``load_dt(out)`` gives back.
    """
    from tqdm.auto import tqdm

    from namm_transfer.rl.checkpoint import INFO_FILE, DTInfo
    from namm_transfer.rl.dataset import provenance
    from namm_transfer.rl.segments import SegmentSampler

    torch.manual_seed(config.seed)
    info = DTInfo(env=data.env.name, state_mean=data.state_mean.tolist(), state_std=data.state_std.tolist(),
                  target_returns=data.env.target_returns, return_scale=config.return_scale, context=config.context,
                  dataset_id=data.dataset_id, ref_min_score=data.ref_min_score, ref_max_score=data.ref_max_score)
    model = build_model(config, data.states[0].shape[1], data.actions[0].shape[1]).to(device)
    sampler = SegmentSampler(data, config.context, config.max_ep_len, config.return_scale, config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min((step + 1) / config.warmup_steps, 1.0))
    summary = data.summary()
    print(f"dataset {data.dataset_id}: {summary['episodes']} episodes, {summary['steps']} steps, return "
          f"{summary['return_mean']:.1f} +- {summary['return_std']:.1f}; "
          f"DT with {sum(p.numel() for p in model.parameters()):,} parameters")
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG_FILE
    log_path.write_text("")
    target = info.target_returns[0]
    start, losses, evaluation = time.perf_counter(), [], None
    model.train()
    bar = tqdm(range(1, config.steps + 1), desc="DT", unit="step", mininterval=2.0)
    with log_path.open("a") as log:
        for step in bar:
            batch = {name: value.to(device) for name, value in sampler.sample(config.batch_size).items()}
            loss = action_loss(model, batch)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            record = None
            if step % config.log_every == 0:
                record = {"step": step, "loss": float(np.mean(losses)), "lr": schedule.get_last_lr()[0]}
                losses = []
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            last = step == config.steps or (
                config.max_minutes is not None and time.perf_counter() - start > 60 * config.max_minutes)
            if (config.eval_every and step % config.eval_every == 0) or last:
                evaluation = quick_eval(model, info, config.eval_episodes, target)
                record = {**(record or {"step": step}), "eval": evaluation}
                bar.write(f"step {step}: quick evaluation return {evaluation['return_mean']:.1f} "
                          f"+- {evaluation['return_std']:.1f} (length {evaluation['length_mean']:.0f})")
            if record is not None:
                log.write(json.dumps({**record, "seconds": round(time.perf_counter() - start, 1)}) + "\n")
                log.flush()
            if last:
                break
    bar.close()
    seconds = time.perf_counter() - start
    model.eval()
    model.save_pretrained(out)
    import transformers

    training = {
        "command": command, "seconds": round(seconds, 1), "steps_done": step, "config": asdict(config),
        "dataset": summary,
        "dataset_provenance": provenance(data.dataset_id), "final_eval": evaluation, "log_file": LOG_FILE,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    (out / INFO_FILE).write_text(json.dumps({**info.to_json(), "training": training}, indent=1) + "\n")
    print(f"saved {out} in {seconds:.0f} s; quick evaluation at target {target:.0f}: return "
          f"{evaluation['return_mean']:.1f} +- {evaluation['return_std']:.1f} over {config.eval_episodes} episodes")
    return model, info


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
                         weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, context=args.context,
                         seed=args.seed, log_every=args.log_every, eval_every=args.eval_every,
                         eval_episodes=args.eval_episodes, max_minutes=args.max_minutes)
    out = args.out or _default_out(args.dataset)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"{out} is not empty; pass --overwrite to replace it")
    from namm_transfer.rl.dataset import load_trajectories

    data = load_trajectories(args.dataset)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    train(config, data, out, "python -m namm_transfer.rl.train " + shlex.join(argv), args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_program(main))

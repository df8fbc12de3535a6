"""``python -m namm_transfer.evolve``: evolve a NAMM with CMA-ES on the built-in text tasks.

Incremental stages (namm-spec.md §5.3), each a task list and a number of generations, run on one CMA-ES whose
whole state carries over. The run folder is checkpointed after every generation (ES state, the mean as a NAMM
file, a JSONL log); rerunning the same command resumes exactly. ``--export DIR`` writes the final mean with its
provenance (command, base model, tasks, fitness history, wall time). Several processes
(``torchrun --nproc_per_node N -m namm_transfer.evolve ...``) split the population; CMA-ES runs on rank 0.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np

from namm_transfer import __version__
from namm_transfer.cli import ArgumentParser, run_program
from namm_transfer.evals.text_tasks import TASKS
from namm_transfer.evolve.distributed import World
from namm_transfer.evolve.loop import Stage, evolve
from namm_transfer.evolve.state import MEAN_LINK, namm_mean_saver, read_log
from namm_transfer.evolve.strategy import EvolutionConfig
from namm_transfer.evolve.text_fitness import TextFitness, TextFitnessConfig
from namm_transfer.methods import cache_config_for
from namm_transfer.namm.checkpoint import load_namm, save_namm
from namm_transfer.namm.config import NammConfig

RUN_CONFIG = "run_config.json"


def parse_stage(text: str) -> Stage:
    """``"passkey,two_hop:20"`` -> Stage(tasks=(passkey, two_hop), generations=20)."""
    tasks_text, sep, generations = text.rpartition(":")
    if not sep or not tasks_text:
        raise ValueError(f"stage {text!r} must look like 'task1,task2:GENERATIONS'")
    tasks = tuple(t for t in tasks_text.split(",") if t)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"stage {text!r}: unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    try:
        count = int(generations)
    except ValueError:
        raise ValueError(f"stage {text!r}: generations must be an integer") from None
    return Stage(name="+".join(tasks), tasks=tasks, generations=count)


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m namm_transfer.evolve", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="runs/evolve", help="run folder (checkpoints, log); resumed if present")
    p.add_argument("--model", default=None, help="local HF folder or cached hub id (default: embedded SmolLM2)")
    p.add_argument("--stage", action="append", default=None, metavar="TASKS:GENS",
                   help="a stage, e.g. 'passkey:10'; repeat for incremental stages (default: passkey,two_hop:4)")
    p.add_argument("--population", type=int, default=8, help="CMA-ES population (32 in the paper)")
    p.add_argument("--sigma0", type=float, default=0.065)
    p.add_argument("--init-score", type=float, default=0.0, help="score the initial mean gives every token")
    p.add_argument("--full-covariance", action="store_true", help="full CMA-ES (default: diagonal, sep-CMA-ES)")
    p.add_argument("--prompts-per-task", type=int, default=2)
    p.add_argument("--pool-size", type=int, default=16, help="train items per task the prompts are drawn from")
    p.add_argument("--length", type=int, default=1024, help="prompt length in tokens")
    p.add_argument("--members-per-batch", type=int, default=8, help="members answering a prompt in one forward")
    p.add_argument("--memory-weight", type=float, default=0.0, help="fitness penalty per unit of retained KV")
    p.add_argument("--update-every", type=int, default=512, help="NAMM period (namm-spec §1.3)")
    p.add_argument("--chunk-size", type=int, default=128)
    p.add_argument("--protect-prompt-tail", type=int, default=0, help="always keep the last N prompt tokens")
    p.add_argument("--protect-sink", type=int, default=0, help="always keep the first N tokens (attention sinks)")
    p.add_argument("--seed", type=int, default=1337, help="CMA-ES seed (prompt draws use --prompt-seed)")
    p.add_argument("--prompt-seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    p.add_argument("--device", default="cpu", help="cpu, cuda (each rank takes cuda:LOCAL_RANK)")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop after the generation that passes this wall time (rerun to continue)")
    p.add_argument("--export", default=None, help="write the final mean as a NAMM here (e.g. weights/namm)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _run_config(args, stages: list[Stage]) -> dict:
    keys = ("model", "population", "sigma0", "init_score", "full_covariance", "prompts_per_task", "pool_size",
            "length", "members_per_batch", "memory_weight", "update_every", "chunk_size", "protect_prompt_tail", "protect_sink",
            "seed", "prompt_seed", "dtype")
    return {**{k: getattr(args, k) for k in keys}, "stages": [[list(s.tasks), s.generations] for s in stages]}


def _check_run_config(run_dir: Path, config: dict) -> None:
    """Write the run's settings, or refuse to resume a folder started with other ones (stages may grow)."""
    path = run_dir / RUN_CONFIG
    if path.exists():
        old = json.loads(path.read_text())
        fixed = lambda c: {k: v for k, v in c.items() if k != "stages"}  # noqa: E731
        if fixed(old) != fixed(config):
            changed = sorted(k for k in fixed(config) if old.get(k) != config.get(k))
            raise ValueError(f"{run_dir} was started with other settings ({', '.join(changed)}); use another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")


def export(run_dir: Path, target: Path, provenance: dict) -> Path:
    """Copy the run's current mean to ``target`` with the full fitness history and wall time."""
    weights = load_namm(run_dir / MEAN_LINK)
    log = read_log(run_dir)
    history = [{"generation": r["generation"], "stage": r["stage"], "fitness_mean": r["fitness"]["mean"],
                "fitness_max": r["fitness"]["max"], "sigma": r["sigma"],
                "kv_retained_mean": r["extra"].get("kv_retained", {}).get("mean")} for r in log]
    record = {**weights.provenance, **provenance, "generations": len(log), "fitness_history": history,
              "wall_seconds": sum(r["wall_s"] for r in log)}
    save_namm(target, weights.params, weights.norm_mean, weights.norm_var, weights.config, record)
    (Path(target) / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    return Path(target)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    stages = [parse_stage(s) for s in (args.stage or ["passkey,two_hop:4"])]
    namm_config = NammConfig(update_every=args.update_every, protect_prompt_tail=args.protect_prompt_tail,
                             protect_sink=args.protect_sink)
    evolution = EvolutionConfig(num_params=namm_config.num_params, population_size=args.population,
                                sigma0=args.sigma0, init_score=args.init_score, seed=args.seed,
                                diagonal=not args.full_covariance)
    fitness_config = TextFitnessConfig(prompts_per_task=args.prompts_per_task, pool_size=args.pool_size,
                                       length=args.length, members_per_batch=args.members_per_batch,
                                       memory_weight=args.memory_weight, seed=args.prompt_seed)
    run_dir = Path(args.run_dir)
    world = World.from_env()
    if world.is_main:
        _check_run_config(run_dir, _run_config(args, stages))

    from namm_transfer.models import load_model  # heavy import after the arguments are known to be good
    from namm_transfer.text_eval import TextGenerator

    device = str(world.device) if args.device == "cuda" and world.world_size > 1 else args.device
    loaded = load_model(args.model, dtype=args.dtype, device=device)
    generator = TextGenerator(loaded.model, loaded.tokenizer, cache_config_for(namm_config), args.chunk_size)
    fitness = TextFitness(generator, namm_config, fitness_config, run_dir if world.is_main else None)
    command = "python -m namm_transfer.evolve " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    provenance = {"base_model": loaded.name, "tasks": [list(s.tasks) for s in stages], "seed": args.seed,
                  "command": command, "library_version": __version__, "evolution": asdict(evolution),
                  "fitness": asdict(fitness_config)}
    state = evolve(fitness, evolution, run_dir, stages,
                   estimate_statistics=lambda: fitness.estimate_statistics(stages[0].tasks),
                   save_mean=namm_mean_saver(namm_config, provenance), world=world, progress=not args.quiet,
                   stop_after_seconds=args.time_limit)
    if world.is_main and state is not None:
        log = read_log(run_dir)
        last = log[-1]
        print(f"generations: {len(log)}  fitness mean/max: {last['fitness']['mean']:.3f}/{last['fitness']['max']:.3f}"
              f"  sigma: {last['sigma']:.4f}  mean retained KV: "
              f"{100 * last['extra'].get('kv_retained', {}).get('mean', float('nan')):.1f}%")
        print(f"run folder: {run_dir}  (mean: {run_dir / MEAN_LINK})")
        if args.export:
            print(f"exported: {export(run_dir, Path(args.export), provenance)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_program(main))

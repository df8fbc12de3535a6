"""``python -m namm_transfer.evolve``: evolve a NAMM with CMA-ES on the built-in text tasks.

Incremental stages (docs/algorithm.md §5.3), each a task list and a number of generations, run on one CMA-ES whose
whole state carries over. The run folder is checkpointed after every generation (ES state, the mean as a NAMM
file, a JSONL log), and each call ends by drawing its learning curve there
(:mod:`namm_transfer.evolve.learning_curve`); rerunning the same command resumes exactly. With
``--validation-items`` the mean is scored on validation items (the dense score,
:mod:`namm_transfer.evolve.validation`) before generation 0 and every ``--validate-every`` generations, and the best
validated mean is kept. ``--export DIR`` writes the best validated
mean (else the final mean) with its provenance (command, base model, tasks, fitness and validation history, wall
time). ``--init-from`` starts the mean, and the normalisation statistics, from a NAMM file (e.g. a warm start,
``python -m namm_transfer.evolve.warm_start``). Several processes
(``torchrun --nproc_per_node N -m namm_transfer.evolve ...``) split the population; CMA-ES runs on rank 0.
"""

from __future__ import annotations

import json
import shlex
import sys
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from namm_transfer import __version__
from namm_transfer.atomic import atomic_write
from namm_transfer.cli import ArgumentParser, FloatRange, InputError, IntRange, check_output_dir, run_program
from namm_transfer.evals.report import RunIdentityError, identity_difference
from namm_transfer.evals.text_tasks import TASKS
from namm_transfer.evolve.distributed import World
from namm_transfer.evolve.learning_curve import draw as draw_learning_curve
from namm_transfer.evolve.loop import Stage, evolve
from namm_transfer.evolve.state import (
    BEST_DIR,
    LOG_NAME,
    MEAN_LINK,
    STATE_NAME,
    VALIDATION_NAME,
    CheckpointError,
    best_validation,
    namm_mean_saver,
    read_log,
    read_validation,
    resume,
)
from namm_transfer.evolve.strategy import EvolutionConfig
from namm_transfer.evolve.text_fitness import (
    REFERENCES_NAME,
    SCORES,
    TextFitness,
    TextFitnessConfig,
    frozen_stats,
)
from namm_transfer.evolve.validation import Validator, validation_items
from namm_transfer.jsonl import JsonlFile
from namm_transfer.methods import cache_config_for
from namm_transfer.models import add_model_options, load_model, resolve_model
from namm_transfer.namm.checkpoint import check_namm_settings, load_namm, namm_paths, save_namm
from namm_transfer.namm.config import NUMERICS, NammConfig
from namm_transfer.run_lock import RunLock, check_not_locked
from namm_transfer.text_eval import CHUNK_TOKENS, PERIOD_TOKENS, PROMPT_TOKENS, TextGenerator

RUN_CONFIG = "run_config.json"
INTERRUPTED = "interrupted: every finished generation is saved in the run folder; rerun the same command to resume"
GENERATIONS = IntRange(1, 100_000)
POPULATION = IntRange(4, 1024)
PROMPTS = IntRange(1, 1024)
POOL = IntRange(1, 4096)
MEMBERS = IntRange(1, 1024)
PROTECTED = IntRange(0, 65_536)
SEEDS = IntRange(0, 2**31 - 1)
SIGMA = FloatRange(0.0, 10.0, open_low=True)
INIT_SCORE = FloatRange(-100.0, 100.0)
MEMORY_WEIGHT = FloatRange(0.0, 100.0)
MEMORY_TARGET = FloatRange(0.0, 1.0)
ANSWER_TOKENS = IntRange(1, 512)
VALIDATION_ITEMS = IntRange(0, 10_000)
TIME_LIMIT = FloatRange(0.0, 1e7, open_low=True)
EXPORT_BYTES = 1 * 2**20


def parse_stage(text: str) -> Stage:
    """``"passkey,two_hop:20"`` -> Stage(tasks=(passkey, two_hop), generations=20)."""
    tasks_text, sep, generations = text.rpartition(":")
    if not sep or not tasks_text:
        raise InputError(f"stage {text!r} must look like 'task1,task2:GENERATIONS'")
    tasks = tuple(t for t in tasks_text.split(",") if t)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise InputError(f"stage {text!r}: unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    try:
        count = GENERATIONS(generations)
    except InputError as error:
        raise InputError(f"stage {text!r}: generations must be an integer in {GENERATIONS} ({error})") from None
    return Stage(name="+".join(tasks), tasks=tasks, generations=count)


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m namm_transfer.evolve", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="runs/evolve", help="run folder (checkpoints, log); resumed if present")
    add_model_options(p)
    p.add_argument("--stage", action="append", type=parse_stage, default=None, metavar="TASKS:GENS",
                   help=f"a stage, e.g. 'passkey:10' (generations {GENERATIONS}); repeat for incremental stages "
                        "(default: passkey,two_hop:4)")
    p.add_argument("--population", type=POPULATION, default=8, help=f"CMA-ES population ({POPULATION}; 32 in the paper)")
    p.add_argument("--sigma0", type=SIGMA, default=0.065, help=f"initial CMA-ES step size {SIGMA}")
    p.add_argument("--init-score", type=INIT_SCORE, default=0.0, help=f"score the initial mean gives every token {INIT_SCORE}")
    p.add_argument("--full-covariance", action="store_true", help="full CMA-ES (default: diagonal, sep-CMA-ES)")
    p.add_argument("--prompts-per-task", type=PROMPTS, default=2, help=f"prompts per task and generation ({PROMPTS})")
    p.add_argument("--pool-size", type=POOL, default=16, help=f"train items per task the prompts are drawn from ({POOL})")
    p.add_argument("--length", type=PROMPT_TOKENS, default=1024, help=f"prompt length in tokens ({PROMPT_TOKENS})")
    p.add_argument("--members-per-batch", type=MEMBERS, default=8, help=f"members answering a prompt in one forward ({MEMBERS})")
    p.add_argument("--score", default="likelihood", choices=SCORES,
                   help="per-prompt score: the reference answer's likelihood against the full cache (dense, default) "
                        "or the task metric of the greedy answer (the paper's)")
    p.add_argument("--answer-tokens", type=ANSWER_TOKENS, default=24,
                   help=f"reference answer tokens the likelihood scores ({ANSWER_TOKENS})")
    p.add_argument("--memory-weight", type=MEMORY_WEIGHT, default=0.0,
                   help=f"fitness penalty per unit of retained KV above --memory-target {MEMORY_WEIGHT}")
    p.add_argument("--memory-target", type=MEMORY_TARGET, default=0.0,
                   help=f"retained KV share below which memory costs nothing {MEMORY_TARGET}")
    p.add_argument("--attention-dtype", default="float32", choices=NUMERICS,
                   help="numerics of the attention the NAMM's features read (float32 is fast on CPU; bfloat16 is the "
                        "official code's)")
    p.add_argument("--init-from", default=None,
                   help="start the mean and the normalisation statistics from this NAMM (a folder or either file)")
    p.add_argument("--validation-items", type=VALIDATION_ITEMS, default=4,
                   help=f"validation items per task scored with the dense score ({VALIDATION_ITEMS}; 0: no validation)")
    p.add_argument("--validate-every", type=GENERATIONS, default=10, help="generations between validations of the mean")
    p.add_argument("--update-every", type=PERIOD_TOKENS, default=512,
                   help=f"NAMM period in tokens ({PERIOD_TOKENS}, a multiple of 16; docs/algorithm.md §1.3)")
    p.add_argument("--chunk-size", type=CHUNK_TOKENS, default=128, help=f"prefill chunk in tokens ({CHUNK_TOKENS})")
    p.add_argument("--protect-prompt-tail", type=PROTECTED, default=0, help=f"always keep the last N prompt tokens ({PROTECTED})")
    p.add_argument("--protect-sink", type=PROTECTED, default=0, help=f"always keep the first N tokens, attention sinks ({PROTECTED})")
    p.add_argument("--seed", type=SEEDS, default=1337, help=f"CMA-ES seed ({SEEDS}; prompt draws use --prompt-seed)")
    p.add_argument("--prompt-seed", type=SEEDS, default=0, help=f"seed of the per-generation prompt draw ({SEEDS})")
    p.add_argument("--time-limit", type=TIME_LIMIT, default=None, metavar="SECONDS",
                   help=f"stop after the generation that passes this wall time {TIME_LIMIT} (rerun to continue)")
    p.add_argument("--export", default=None,
                   help="write the best validated mean (else the final mean) as a NAMM here (e.g. weights/namm)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _run_config(args, stages: list[Stage]) -> dict:
    keys = ("model", "population", "sigma0", "init_score", "full_covariance", "prompts_per_task", "pool_size",
            "length", "members_per_batch", "score", "answer_tokens", "memory_weight", "memory_target", "attention_dtype",
            "init_from", "validation_items", "validate_every", "update_every", "chunk_size", "protect_prompt_tail",
            "protect_sink", "seed", "prompt_seed", "dtype")
    return {**{k: getattr(args, k) for k in keys}, "stages": [[list(s.tasks), s.generations] for s in stages]}


def _stage_changes(old: list, new: list) -> list[str]:
    """What a rerun changes in the stages of a run: only stages may be appended and the last one lengthened
    or shortened (the loop checks that every finished generation keeps its stage)."""
    changes = []
    if len(new) < len(old):
        changes.append(f"stages (was {len(old)}, now {len(new)})")
    for index, ((old_tasks, old_gens), (new_tasks, new_gens)) in enumerate(zip(old, new)):
        if old_tasks != new_tasks:
            changes.append(f"stage {index + 1} tasks (was {','.join(old_tasks)}, now {','.join(new_tasks)})")
        if index < len(old) - 1 and old_gens != new_gens:
            changes.append(f"stage {index + 1} generations (was {old_gens}, now {new_gens})")
    return changes


def check_run_identity(run_dir: Path, config: dict) -> None:
    """Refuse a run folder started with other settings or stages, naming every difference; writes nothing."""
    path = run_dir / RUN_CONFIG
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        old_stages = old.pop("stages")
    except (ValueError, KeyError, AttributeError) as error:
        raise RunIdentityError(f"{path}: not a run config ({' '.join(str(error).split())})") from None
    new = dict(config)
    changes = identity_difference(old, {k: v for k, v in new.items() if k != "stages"})
    changes += _stage_changes(old_stages, new["stages"])
    if changes:
        raise RunIdentityError(f"{run_dir} was started with other settings: {'; '.join(changes)}; use another --run-dir")


def check_run_folder(run_dir: Path, config: dict, evolution: EvolutionConfig) -> None:
    """Everything a resumed run folder must pass before the model loads: the same identity, a readable
    checkpoint of the same CMA-ES settings, and log and reference files damaged at most in their last line."""
    check_run_identity(run_dir, config)
    state = resume(run_dir)
    if state is not None and state.strategy.config != evolution:
        raise CheckpointError(f"{run_dir / STATE_NAME} was started with {state.strategy.config}, not {evolution}")
    for name in (LOG_NAME, REFERENCES_NAME, VALIDATION_NAME):
        JsonlFile(run_dir / name).check()


def state_bytes(evolution: EvolutionConfig) -> int:
    """Room a run folder needs: the ES state twice (atomic replace), for a full covariance two n x n float64
    matrices (C and B), plus weights and logs."""
    n = evolution.num_params
    state = (2 * 8 * n * n if not evolution.diagonal else 64 * n) + 2**20
    return 2 * state + 8 * 2**20


def export(run_dir: Path, target: Path, provenance: dict, namm_config: NammConfig) -> Path:
    """Copy the run's best validated mean (or, without validation, its current mean) to ``target`` with the full
    fitness and validation history and wall time (refused when the mean's settings are not ``namm_config``)."""
    best = best_validation(run_dir)
    source = run_dir / BEST_DIR if best is not None else run_dir / MEAN_LINK
    weights = load_namm(source)
    check_namm_settings(weights, source, **namm_config.to_dict())
    log = read_log(run_dir)
    history = [{"generation": r["generation"], "stage": r["stage"], "fitness_mean": r["fitness"]["mean"],
                "fitness_max": r["fitness"]["max"], "sigma": r["sigma"],
                "kv_retained_mean": r["extra"].get("kv_retained", {}).get("mean"), "signal": r.get("signal")}
               for r in log]
    validation = [{k: v for k, v in r.items() if k != "per_item"} for r in read_validation(run_dir)]
    exported = ("the final mean" if best is None else
                f"the best validated mean: after {best['generations']} generations, validation fitness {best['fitness']:.4f}")
    record = {**weights.provenance, **provenance, "generations": len(log), "exported": exported,
              "fitness_history": history, "validation_history": validation,
              "wall_seconds": sum(r["wall_s"] for r in log)}
    save_namm(target, weights.params, weights.norm_mean, weights.norm_var, weights.config, record)
    atomic_write(namm_paths(target)[0].parent / "log.jsonl", "".join(json.dumps(r) + "\n" for r in log))
    return Path(target)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    stages = args.stage or [parse_stage("passkey,two_hop:4")]
    namm_config = NammConfig(update_every=args.update_every, protect_prompt_tail=args.protect_prompt_tail,
                             protect_sink=args.protect_sink, attention_dtype=args.attention_dtype)
    init = None
    if args.init_from is not None:  # checked before the model loads
        init = load_namm(args.init_from)
        check_namm_settings(init, args.init_from, **namm_config.to_dict())
    evolution = EvolutionConfig(num_params=namm_config.num_params, population_size=args.population,
                                sigma0=args.sigma0, init_score=args.init_score, seed=args.seed,
                                diagonal=not args.full_covariance)
    fitness_config = TextFitnessConfig(prompts_per_task=args.prompts_per_task, pool_size=args.pool_size,
                                       length=args.length, members_per_batch=args.members_per_batch,
                                       memory_weight=args.memory_weight, memory_target=args.memory_target,
                                       score=args.score, answer_tokens=args.answer_tokens, seed=args.prompt_seed)
    run_dir = Path(args.run_dir)
    run_config = _run_config(args, stages)
    world = World.from_env()
    if world.is_main:  # every check passes before the model loads or a file is written
        check_output_dir(run_dir, "--run-dir", state_bytes(evolution))
        if args.export:
            check_output_dir(namm_paths(args.export)[0].parent, "--export", EXPORT_BYTES)
        check_run_folder(run_dir, run_config, evolution)
        check_not_locked(run_dir)
    resolve_model(args.model)
    device = str(world.device) if args.device.type == "cuda" and world.world_size > 1 else str(args.device)
    loaded = load_model(args.model, dtype=args.dtype, device=device)

    generator = TextGenerator(loaded.model, loaded.tokenizer, cache_config_for(namm_config), args.chunk_size)
    command = "python -m namm_transfer.evolve " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    provenance = {"base_model": loaded.name, "tasks": [list(s.tasks) for s in stages], "seed": args.seed,
                  "command": command, "library_version": __version__, "evolution": asdict(evolution),
                  "fitness": asdict(fitness_config)}
    with RunLock(run_dir) if world.is_main else nullcontext():
        if world.is_main:  # the identity is fixed here, with the first write
            check_run_identity(run_dir, run_config)
            text = json.dumps(run_config, indent=2) + "\n"
            path = run_dir / RUN_CONFIG
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                atomic_write(path, text)
            JsonlFile(run_dir / REFERENCES_NAME).repair()
        fitness = TextFitness(generator, namm_config, fitness_config, run_dir if world.is_main else None)
        if init is None:
            estimate = lambda: fitness.estimate_statistics(stages[0].tasks)  # noqa: E731
        else:
            estimate = lambda: {"norm_mean": init.norm_mean.numpy(), "norm_var": init.norm_var.numpy()}  # noqa: E731
        validate = None
        if args.validation_items and world.is_main:
            tasks = sorted({task for stage in stages for task in stage.tasks}, key=TASKS.index)
            validator = Validator(generator, validation_items(generator, tasks, args.validation_items, args.length,
                                                              fitness_config.depths), args.answer_tokens)

            def validate(mean, statistics):
                result = validator(mean, frozen_stats(statistics), namm_config)
                penalty = args.memory_weight * max(0.0, result["kv_retained"] - args.memory_target)
                return {"fitness": result["dense"] - penalty, **result}

        state = evolve(fitness, evolution, run_dir, stages, estimate_statistics=estimate,
                       save_mean=namm_mean_saver(namm_config, provenance), world=world, progress=not args.quiet,
                       stop_after_seconds=args.time_limit, initial_mean=None if init is None else init.params.numpy(),
                       validate=validate, validate_every=args.validate_every)
        if world.is_main and state is not None:
            log = read_log(run_dir)
            last = log[-1]
            print(f"generations: {len(log)}  fitness mean/max: {last['fitness']['mean']:.3f}/{last['fitness']['max']:.3f}"
                  f"  sigma: {last['sigma']:.4f}  mean retained KV: "
                  f"{100 * last['extra'].get('kv_retained', {}).get('mean', float('nan')):.1f}%")
            if "signal" in last:
                print(f"signal: rank correlation between prompt halves {last['signal']['rank_correlation']:.2f}, "
                      f"member spread {last['signal']['member_spread']:.4f}, prompt noise {last['signal']['prompt_noise']:.4f}")
            best = best_validation(run_dir)
            if best is not None:
                print(f"best validation: {best['fitness']:+.4f} after {best['generations']} generations "
                      f"(dense {best['dense']:+.4f}, KV kept {100 * best['kv_retained']:.1f}%)")
            print(f"learning curve: {draw_learning_curve(run_dir)}")
            print(f"run folder: {run_dir}  (mean: {run_dir / MEAN_LINK})")
            if args.export:
                print(f"exported: {export(run_dir, Path(args.export), provenance, namm_config)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_program(main, interrupted=INTERRUPTED))

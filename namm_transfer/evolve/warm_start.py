"""``python -m namm_transfer.evolve.warm_start``: fit a NAMM by gradient to a keep target (oracle, recency, both).

For each train item, one full-cache pass of the prompt followed by its reference answer records the NAMM's
features at every step (:mod:`~namm_transfer.evolve.feature_recorder`, which also gives the normalisation
statistics), and one eager pass gives the attention every later query, the answer's included, pays to each token
(:mod:`~namm_transfer.evolve.oracle`). The BAM is then fitted (:mod:`~namm_transfer.evolve.scorer_fit`) to keep
a ``--target`` set (:mod:`~namm_transfer.evolve.keep_target`): the tokens holding ``--coverage`` of that future
attention, the tokens younger than ``--recency-window``, or both; checked on held-back items, scored on validation items
with the dense score (:mod:`~namm_transfer.evolve.validation`) and written as a NAMM file, ready for
``python -m namm_transfer.evolve --init-from``. Collected items are kept in the run folder, so a rerun skips them.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from namm_transfer import __version__
from namm_transfer.answer_likelihood import ANSWER_TOKENS, answer_ids
from namm_transfer.atomic import atomic_write
from namm_transfer.cli import (
    ArgumentParser,
    FloatRange,
    IntRange,
    check_choices,
    check_output_dir,
    float_list,
    name_list,
    run_program,
)
from namm_transfer.evals.text_tasks import TASKS, make_item, token_counter
from namm_transfer.evolve.feature_recorder import FeatureRecorder, StepRecord
from namm_transfer.evolve.keep_target import TARGET_KINDS, KeepTarget
from namm_transfer.evolve.oracle import OracleConfig, future_attention
from namm_transfer.evolve.scorer_fit import FitConfig, evaluate, fit_scorer, initial_params, make_examples
from namm_transfer.evolve.validation import Validator, validation_items
from namm_transfer.methods import cache_config_for
from namm_transfer.models import add_model_options, load_model, resolve_model
from namm_transfer.namm.checkpoint import save_namm
from namm_transfer.namm.config import NUMERICS, NammConfig
from namm_transfer.namm.features import NormalisationStats, StatsAccumulator
from namm_transfer.run_lock import RunLock, check_not_locked
from namm_transfer.runtime.runner import EvictingRunner
from namm_transfer.text_eval import PERIOD_TOKENS, PROMPT_TOKENS, TextGenerator

INTERRUPTED = "interrupted: every collected item is saved in the run folder; rerun the same command to continue"
ITEMS = IntRange(1, 10_000)
EPOCHS = IntRange(1, 100_000)
PROTECTED = IntRange(0, 65_536)
ANSWER = IntRange(1, 512)
WINDOW = IntRange(1, 131_072)
RUN_BYTES = 2 * 2**30
"""Room the run folder needs: the collected features (about 20 MB per 1k-token item in fp16)."""


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m namm_transfer.evolve.warm_start", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="runs/warm-start", help="run folder (collected items, log, the fitted NAMM)")
    add_model_options(p)
    p.add_argument("--tasks", type=name_list, default=("passkey", "multikey_needle", "variable_tracking", "two_hop"),
                   help=f"built-in train tasks, comma-separated ({','.join(TASKS)})")
    p.add_argument("--items-per-task", type=ITEMS, default=8, help=f"train items per task ({ITEMS})")
    p.add_argument("--held-back", type=ITEMS, default=1, help="of those, items per task kept out of the fit to check it")
    p.add_argument("--validation-items", type=IntRange(0, 10_000), default=4,
                   help="validation items per task scored with the dense score (0: skip)")
    p.add_argument("--length", type=PROMPT_TOKENS, default=1024, help=f"prompt length in tokens ({PROMPT_TOKENS})")
    p.add_argument("--depths", type=float_list(FloatRange(0.0, 1.0)), default=(0.1, 0.3, 0.5, 0.7, 0.9),
                   help="needle depths the items cycle through")
    p.add_argument("--update-every", type=PERIOD_TOKENS, default=256, help=f"NAMM period in tokens ({PERIOD_TOKENS})")
    p.add_argument("--protect-sink", type=PROTECTED, default=4, help="always keep the first N tokens")
    p.add_argument("--protect-prompt-tail", type=PROTECTED, default=64, help="always keep the last N prompt tokens")
    p.add_argument("--attention-dtype", default="float32", choices=NUMERICS,
                   help="numerics of the attention the features read (float32 is fast on CPU)")
    p.add_argument("--answer-tokens", type=ANSWER, default=ANSWER_TOKENS, help=f"reference answer tokens ({ANSWER})")
    p.add_argument("--target", choices=TARGET_KINDS, default="oracle",
                   help="what the scorer learns to keep: the oracle's set, a recency window, or their union")
    p.add_argument("--coverage", type=FloatRange(0.0, 1.0, open_low=True), default=0.9,
                   help="share of the future attention the oracle's keep set holds, in (0, 1]")
    p.add_argument("--recency-window", type=WINDOW, default=512,
                   help=f"tokens younger than this are in the recency target ({WINDOW})")
    p.add_argument("--answer-weight", type=FloatRange(0.0, 1e6), default=1.0,
                   help="weight of the answer's queries against the later prompt queries")
    p.add_argument("--epochs", type=EPOCHS, default=20, help=f"passes over the examples ({EPOCHS})")
    p.add_argument("--learning-rate", type=FloatRange(0.0, 10.0, open_low=True), default=3e-3)
    p.add_argument("--positive-weight", type=FloatRange(0.0, 1e6, open_low=True), default=2.0,
                   help="loss weight of a token the target keeps")
    p.add_argument("--seed", type=IntRange(0, 2**31 - 1), default=0, help="seed of the initial parameters")
    p.add_argument("--export", default=None, help="also write the fitted NAMM here (e.g. weights/namm)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _collect(generator: TextGenerator, item, config: NammConfig, oracle: OracleConfig, answer_tokens: int,
             destination: Path) -> None:
    """Record one item's steps and their future attention into ``destination`` (features in fp16)."""
    prompt = generator.encode(item.prompt).to(generator.device)
    answer = answer_ids(generator, item, answer_tokens).to(generator.device)
    recorder = FeatureRecorder(config)
    runner = EvictingRunner(generator.adapter, generator.model, recorder, generator.runner_config)
    full = runner.score_continuation(prompt, answer)
    ends = sorted({r.tokens_seen for r in recorder.records if r.tokens_seen < prompt.shape[1] + answer.numel()})
    layers = sorted({r.layer for r in recorder.records})
    sequence = torch.cat([prompt, answer[None]], dim=1)
    masses = future_attention(generator.model, sequence, prompt.shape[1], ends, layers, oracle.answer_weight)
    records = [{"layer": r.layer, "tokens_seen": r.tokens_seen, "ema": r.ema.half(), "arrival": r.arrival.int(),
                "attendable": r.attendable} for r in recorder.records]
    payload = {"records": records, "masses": {f"{k[0]}:{k[1]}": v.half() for k, v in masses.items()},
               "prompt_length": prompt.shape[1], "full_log_prob": float(full.log_probs.mean()),
               "statistics": recorder.accumulator.to_tensor()}
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(destination)


def collected_steps(payload: dict) -> list[StepRecord]:
    """The recorded steps of one collected item (a file written by :func:`_collect`), features back in fp32."""
    return [StepRecord(r["layer"], r["tokens_seen"], r["ema"].float(), r["arrival"].long(), r["attendable"])
            for r in payload["records"]]


def collected_statistics(payloads: Iterable[dict], config: NammConfig) -> NormalisationStats:
    """The normalisation statistics (namm-spec §2.4) of every collected item together."""
    accumulator = StatsAccumulator(config.spectrogram_bins)
    for payload in payloads:
        accumulator.merge(StatsAccumulator.from_tensor(payload["statistics"]))
    return accumulator.freeze()


def _examples(payload: dict, stats, config: NammConfig, target: KeepTarget):
    records = collected_steps(payload)
    masses = {tuple(int(x) for x in k.split(":")): v.float() for k, v in payload["masses"].items()}
    return make_examples(records, masses, stats, config, payload["prompt_length"], target)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    check_choices(args.tasks, TASKS, "--tasks")
    if args.held_back >= args.items_per_task:
        raise ValueError(f"--held-back ({args.held_back}) must be smaller than --items-per-task ({args.items_per_task})")
    config = NammConfig(update_every=args.update_every, protect_sink=args.protect_sink,
                        protect_prompt_tail=args.protect_prompt_tail, attention_dtype=args.attention_dtype)
    oracle = OracleConfig(answer_weight=args.answer_weight)
    target = KeepTarget(kind=args.target, coverage=args.coverage, recency_window=args.recency_window)
    fit = FitConfig(epochs=args.epochs, learning_rate=args.learning_rate, positive_weight=args.positive_weight,
                    seed=args.seed)
    run_dir = Path(args.run_dir)
    check_output_dir(run_dir, "--run-dir", RUN_BYTES)
    if args.export:
        check_output_dir(args.export, "--export", 2**20)
    check_not_locked(run_dir)
    resolve_model(args.model)
    loaded = load_model(args.model, dtype=args.dtype, device=str(args.device))
    generator = TextGenerator(loaded.model, loaded.tokenizer, cache_config_for(config))
    count = token_counter(loaded.tokenizer)
    began = time.perf_counter()
    command = "python -m namm_transfer.evolve.warm_start " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    with RunLock(run_dir):
        items = [make_item(task, i, args.length, args.depths[i % len(args.depths)], count, "train")
                 for task in args.tasks for i in range(args.items_per_task)]
        collected = run_dir / "collected" / f"t{args.length}-p{args.update_every}-a{args.answer_tokens}-{args.attention_dtype}"
        saved = {item.item_id: collected / f"{item.item_id}-w{args.answer_weight:g}.pt" for item in items}
        for item in tqdm(items, desc="collect", unit="item", disable=args.quiet):
            if not saved[item.item_id].exists():
                _collect(generator, item, config, oracle, args.answer_tokens, saved[item.item_id])
        collect_seconds = time.perf_counter() - began
        payloads = {item_id: torch.load(path) for item_id, path in saved.items()}
        stats = collected_statistics(payloads.values(), config)
        held_back = {item.item_id for item in items if item.seed >= args.items_per_task - args.held_back}
        train, check = [], []
        for item_id, payload in payloads.items():
            (check if item_id in held_back else train).extend(_examples(payload, stats, config, target))
        fit_began = time.perf_counter()
        params, history = fit_scorer(train, config, fit, progress=not args.quiet)
        fit_seconds = time.perf_counter() - fit_began
        agreement = {"initial": {"train": evaluate(initial_params(config, fit), train, config, fit),
                                 "held_back": evaluate(initial_params(config, fit), check, config, fit)},
                     "fitted": {"train": evaluate(params, train, config, fit),
                                "held_back": evaluate(params, check, config, fit)}}
        validation = None
        if args.validation_items:
            validator = Validator(generator, validation_items(generator, args.tasks, args.validation_items,
                                                              args.length, args.depths), args.answer_tokens)
            validation = validator(params, stats, config)
        wall = time.perf_counter() - began
        record = {"command": command, "base_model": loaded.name, "library_version": __version__,
                  "tasks": list(args.tasks), "train_items": [i.item_id for i in items if i.item_id not in held_back],
                  "held_back_items": sorted(held_back), "oracle": asdict(oracle), "target": asdict(target),
                  "fit": asdict(fit),
                  "examples": {"train": len(train), "held_back": len(check)}, "history": history,
                  "agreement": agreement, "validation": validation, "collect_seconds": collect_seconds,
                  "fit_seconds": fit_seconds, "wall_seconds": wall}
        provenance = {k: record[k] for k in ("command", "base_model", "tasks", "oracle", "target", "fit",
                                             "wall_seconds")}
        provenance["method"] = f"warm start: gradient fit to the {target.kind} keep target"
        provenance["validation"] = None if validation is None else {k: validation[k] for k in ("dense", "kv_retained")}
        save_namm(run_dir / "namm", params, stats.mean, stats.var, config, provenance)
        atomic_write(run_dir / "warm_start.json", json.dumps(record, indent=2) + "\n")
        if args.export:
            save_namm(args.export, params, stats.mean, stats.var, config, provenance)
    fitted = agreement["fitted"]["held_back"]
    print(f"examples: {len(train)} train, {len(check)} held back; held-back loss {fitted['loss']:.4f} "
          f"(initial {agreement['initial']['held_back']['loss']:.4f}), precision {fitted['precision']:.3f}, "
          f"recall {fitted['recall']:.3f}, kept {100 * fitted['kept_share']:.1f}% (target {100 * fitted['target_share']:.1f}%)")
    if validation is not None:
        print(f"validation ({len(validation['per_item'])} items): dense score {validation['dense']:+.4f} nats/token "
              f"against the full cache, KV kept {100 * validation['kv_retained']:.1f}%")
    print(f"NAMM: {run_dir / 'namm'}   wall time {wall:.0f} s (collect {collect_seconds:.0f} s, fit {fit_seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_program(main, interrupted=INTERRUPTED))

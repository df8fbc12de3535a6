"""``python -m namm_transfer.demo``: one long-context question, answered by the embedded SmolLM2 with the full
cache, with the shipped NAMM, and with a baseline given the NAMM's own per-layer budget.

Prints whether each answer is right, the share of the KV cache kept (overall and per layer), the peak memory
held (K/V, the policy's own bytes and their total) and the time taken, then each whole answer (wrapped). Runs
offline on CPU in about a minute and writes no files.
"""

from __future__ import annotations

import textwrap
from typing import Sequence

from namm_transfer.cli import ArgumentParser, FloatRange, run_program
from namm_transfer.evals.report import format_table
from namm_transfer.evals.text_tasks import TASKS, make_item, token_counter
from namm_transfer.methods import MATCHED, Method, build_policy, cache_config_for, load_namm_option
from namm_transfer.models import add_model_options, load_model, resolve_model
from namm_transfer.namm.baselines import BASELINES
from namm_transfer.text_eval import PROMPT_TOKENS, SEED, TextGenerator

INTERRUPTED = "interrupted: the demo writes no files, so nothing is lost; run it again to see the answers"
WIDTH = 100
"""Characters per line of the printed answers."""
MIB = 2**20


def verdict(score: float) -> str:
    """The ``correct`` column: ``yes`` for full credit, ``no`` otherwise (with the credit when partial)."""
    if score >= 1.0:
        return "yes"
    return "no" if score <= 0.0 else f"no (partial {score:.2f})"


def wrapped_answers(answers: dict[str, str], width: int = WIDTH) -> str:
    """Every answer in full under its method's label, wrapped to ``width`` characters, line breaks kept."""
    indent = " " * (max(len(label) for label in answers) + 4)
    blocks = []
    for label, answer in answers.items():
        lines = [line for part in (answer or "(empty)").splitlines() or [""]
                 for line in textwrap.wrap(part, width - len(indent)) or [""]]
        blocks.append("\n".join(f"  {label:<{len(indent) - 4}}  {line}" if i == 0 else f"{indent}{line}"
                                for i, line in enumerate(lines)))
    return "\n".join(blocks)


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m namm_transfer.demo", description=__doc__.split("\n\n")[0])
    add_model_options(p, dtypes=("auto", "bfloat16", "float32"))
    p.add_argument("--namm", default=None, help="NAMM weights, a folder or either file (default: the shipped NAMM)")
    p.add_argument("--task", default="passkey", choices=TASKS)
    p.add_argument("--length", type=PROMPT_TOKENS, default=1536, help=f"prompt length in tokens ({PROMPT_TOKENS})")
    p.add_argument("--depth", type=FloatRange(0.0, 1.0), default=0.5, help="needle depth in [0, 1]")
    p.add_argument("--seed", type=SEED, default=0, help=f"held-out item seed ({SEED})")
    p.add_argument("--baseline", default="h2o", choices=sorted(set(BASELINES) - {"full"}))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    namm = load_namm_option(args.namm)
    resolve_model(args.model)  # every check passes before the model loads
    loaded = load_model(args.model, dtype=args.dtype, device=str(args.device))

    item = make_item(args.task, args.seed, args.length, args.depth, token_counter(loaded.tokenizer), "heldout")
    generator = TextGenerator(loaded.model, loaded.tokenizer, cache_config_for(namm.config))
    print(f"model: {loaded.name}   task: {item.task} (held-out), depth {item.depth}, "
          f"NAMM period {namm.config.update_every} tokens")
    print(f"question: {item.prompt.strip().splitlines()[-1][:160]}")
    print(f"expected: {' | '.join(item.answers)}\n")
    rows, per_layer, answers, namm_retention = [], {}, {}, None
    for method in (Method("full"), Method("namm"), Method(args.baseline, MATCHED)):
        policy = build_policy(method, namm, namm_retention, seed=args.seed, device=args.device)
        run = generator.run(item, policy)
        if method.rule == "namm":
            namm_retention = run.retention
        answers[method.label] = run.predictions[0]
        rows.append({
            "method": method.label, "correct": verdict(item.score(run.predictions[0])),
            "KV kept %": 100 * run.kv_retained[0], "peak KV MiB": run.kv_bytes_peak / MIB,
            "peak policy MiB": run.policy_bytes_peak / MIB, "peak total MiB": run.total_bytes_peak / MIB,
            "total MiB at end": run.total_bytes_final / MIB, "seconds": run.seconds,
        })
        per_layer[method.label] = [round(100 * f) for f in run.kept_per_layer]
    print(format_table(rows, float_digits=2))
    print(f"\nanswers:\n{wrapped_answers(answers)}")
    print(f"\nprompt: {run.prompt_tokens} tokens; KV kept per layer (% of tokens seen):")
    for label, values in per_layer.items():
        print(f"  {label:<12} {' '.join(f'{v:3d}' for v in values)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_program(main, interrupted=INTERRUPTED))

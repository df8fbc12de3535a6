"""CPU benchmark: chunked prefill + greedy decoding with the full cache, a NAMM and the hand-made rules.

For each prompt length the same prompt runs through :class:`~namm_transfer.runtime.runner.EvictingRunner` with

* ``full``: no policy (the same code path, so times and bytes compare like with like);
* ``namm``: a fixed random NAMM that evicts (see :func:`random_namm_params` and :func:`calibrate_bias`), with
  normalisation statistics from one statistics pass (namm-spec.md §5.6) on the longest prompt;
* ``h2o``, ``l2``, ``recency``, ``random``: at the NAMM's matched budget (its per-(step, layer) counts on the same
  prompt, ARCHITECTURE.md "Budgets and fair comparisons").

Every number is the median over ``--repeats`` runs (methods interleaved within a repeat, so load from other
processes hits them alike) after one warm-up run of each method. Run ``--help`` for the options and bench/README.md
for what each number means. The helpers here are shared with bench/gpu_llama8b_shape.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def ensure_importable() -> None:
    """Make ``namm_transfer`` (and its mapped ``adapters``/``evals`` folders) importable from a plain checkout: the
    GPU machine has the repository on PYTHONPATH but no install, and the ``package-dir`` mapping of pyproject.toml
    exists only in an install."""
    root = Path(__file__).resolve().parents[1]
    if importlib.util.find_spec("namm_transfer") is None:
        sys.path.insert(0, str(root))
    import namm_transfer

    for name in ("adapters", "evals"):
        full = f"namm_transfer.{name}"
        if full in sys.modules or importlib.util.find_spec(full) is not None:
            continue
        folder = root / name
        spec = importlib.util.spec_from_file_location(full, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
        setattr(namm_transfer, name, module)


ensure_importable()

import torch  # noqa: E402

from namm_transfer.adapters.base import adapter_for  # noqa: E402
from namm_transfer.namm.baselines import make_baseline  # noqa: E402
from namm_transfer.namm.budget import MatchedBudget, RetentionRecord  # noqa: E402
from namm_transfer.namm.config import NammConfig  # noqa: E402
from namm_transfer.namm.features import NormalisationStats, StatsAccumulator  # noqa: E402
from namm_transfer.namm.interface import EvictionPolicy, KeepDecision, LayerView, StepRequirements  # noqa: E402
from namm_transfer.namm.policy import NammPolicy  # noqa: E402
from namm_transfer.runtime.cache import CacheConfig  # noqa: E402
from namm_transfer.runtime.runner import EvictingRunner, GenerationResult, RunnerConfig  # noqa: E402

BASELINE_RULES = ("h2o", "l2", "recency", "random")
METHODS = ("full", "namm") + BASELINE_RULES


def random_namm_params(config: NammConfig, seed: int, std: float, bias: float) -> torch.Tensor:
    """(num_params,) fp32 BAM parameters drawn N(0, std^2) from ``torch.Generator().manual_seed(seed)``, with the
    read-out bias (the last entry, namm-spec.md §3.2) set to ``bias``: a fixed NAMM that evicts when bias < 0."""
    params = torch.randn(config.num_params, generator=torch.Generator().manual_seed(seed)) * std
    params[-1] = bias
    return params


class TimedPolicy:
    """An :class:`EvictionPolicy` that delegates to ``inner`` and adds up where its steps spend time, in wall seconds
    (synchronised on CUDA) and in this process's CPU seconds (robust to other processes on a shared CPU).

    Attributes:
        attention_seconds, attention_cpu_seconds: recomputing the recent queries' attention rows
            (``LayerView.attention``), only for policies that ask for them (NAMM, H2O).
        policy_seconds, policy_cpu_seconds: the rest of ``inner.step`` (NAMM: STFT/EMA features, BAM scores,
            selection, state gather).
        steps: layer steps taken.
    """

    def __init__(self, inner: EvictionPolicy, device: torch.device):
        self.inner = inner
        self.name = inner.name
        self.requirements = getattr(inner, "requirements", StepRequirements())
        self.device = device
        self.attention_seconds = self.policy_seconds = 0.0
        self.attention_cpu_seconds = self.policy_cpu_seconds = 0.0
        self.steps = 0

    def begin(self, batch_size: int, num_layers: int) -> None:
        self.inner.begin(batch_size, num_layers)

    def state_bytes(self) -> int:
        """The inner policy's per-sequence state bytes (0 when it keeps none)."""
        state = getattr(self.inner, "state_bytes", None)
        return 0 if state is None else state()

    def step(self, view: LayerView) -> KeepDecision:
        compute = view.attention_fn
        spent = [0.0, 0.0]  # wall, CPU

        def timed_attention() -> torch.Tensor:
            wall, cpu = _now(self.device), time.process_time()
            rows = compute()
            spent[0] += _now(self.device) - wall
            spent[1] += time.process_time() - cpu
            return rows

        wall, cpu = _now(self.device), time.process_time()
        decision = self.inner.step(dataclasses.replace(view, attention_fn=timed_attention))
        wall, cpu = _now(self.device) - wall, time.process_time() - cpu
        self.attention_seconds += spent[0]
        self.attention_cpu_seconds += spent[1]
        self.policy_seconds += wall - spent[0]
        self.policy_cpu_seconds += cpu - spent[1]
        self.steps += 1
        return decision


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclasses.dataclass
class Run:
    """One timed generation: the runner's result, the timing wrapper of its policy (None for the full cache), and
    this process's CPU seconds for the whole call (all threads), which a loaded machine distorts less than wall
    time."""

    result: GenerationResult
    timed: TimedPolicy | None
    cpu_seconds: float


def run_once(model, policy: EvictionPolicy | None, input_ids: torch.Tensor, chunk_size: int, decode: int,
             cache: CacheConfig, adapter=None) -> Run:
    """One :meth:`EvictingRunner.generate` (no eos, exactly ``decode`` tokens); the policy is wrapped in a
    :class:`TimedPolicy`. ``adapter`` defaults to the model's registered adapter."""
    device = next(model.parameters()).device
    timed = None if policy is None else TimedPolicy(policy, device)
    runner = EvictingRunner(adapter or adapter_for(model), model, timed,
                            RunnerConfig(chunk_size=chunk_size, max_new_tokens=decode, cache=cache))
    cpu_start = time.process_time()
    result = runner.generate(input_ids, max_new_tokens=decode, eos_token_id=None)
    return Run(result, timed, time.process_time() - cpu_start)


def statistics_pass(model, input_ids: torch.Tensor, chunk_size: int, cache: CacheConfig,
                    config: NammConfig) -> NormalisationStats:
    """Normalisation statistics of the spectrogram features with the full cache (statistics-mode NAMM keeps every
    token, namm-spec.md §5.6) on ``input_ids``."""
    accumulator = StatsAccumulator(config.spectrogram_bins)
    run_once(model, NammPolicy(config, accumulator=accumulator), input_ids, chunk_size, 1, cache)
    return accumulator.freeze()


def evicted_per_step(result: GenerationResult) -> float:
    """Mean over (step, layer) of the fraction of slots a step evicted: 1 - kept / slots_before."""
    if not result.retention:
        return 0.0
    return 1.0 - statistics.fmean(r.kept / r.slots_before for r in result.retention)


def calibrate_bias(model, input_ids: torch.Tensor, chunk_size: int, cache: CacheConfig, config: NammConfig,
                   stats: NormalisationStats, seed: int, std: float, target: float, iterations: int = 7,
                   low: float = -1.0, high: float = 1.0) -> tuple[float, float]:
    """Bisect the read-out bias so that the random NAMM evicts about ``target`` of the slots per step on
    ``input_ids`` (a larger bias keeps more). Returns (bias, evicted fraction at that bias)."""
    best = None
    for _ in range(iterations):
        bias = 0.5 * (low + high)
        params = random_namm_params(config, seed, std, bias)
        evicted = evicted_per_step(run_once(model, NammPolicy(config, params, stats), input_ids, chunk_size, 1,
                                            cache).result)
        if best is None or abs(evicted - target) < abs(best[1] - target):
            best = (bias, evicted)
        if evicted > target:
            low = bias
        else:
            high = bias
    return best


def kept_slots_at_peak(result: GenerationResult, prompt_length: int, chunk_size: int, update_every: int) -> int:
    """Slots, summed over layers, held when the physical K/V peaked, rebuilt from the retention log (every layer
    managed, as for Llama models).

    The cache measures its bytes after every layer's update. Between policy steps every layer only grows, so the
    candidates are: right before a step (each layer holds its ``slots_before``); during the forward that runs the step
    (layers 0..i already pruned to ``kept`` and given that forward's tokens, the others not yet); and the end of the
    run. Step s runs in the forward that brings arrival ``(s + 1) * update_every``: a prefill chunk (cut at multiples
    of ``update_every``), one decoded token, or nothing when the final flush runs it."""
    by_step: dict[int, dict[int, RetentionRecord]] = {}
    for record in result.retention:
        by_step.setdefault(record.step, {})[record.layer] = record
    best = sum(result.kept_per_layer)
    for step, layers in by_step.items():
        boundary = (step + 1) * update_every
        if boundary >= result.tokens_seen:
            appended = 0  # run by the final flush
        elif boundary < prompt_length:
            appended = min(chunk_size, prompt_length - boundary, update_every)
        else:
            appended = 1
        total = sum(r.slots_before for r in layers.values())
        best = max(best, total)
        for layer in sorted(layers):
            total += layers[layer].kept + appended - layers[layer].slots_before
            best = max(best, total)
    return best


def kv_bytes_per_slot(model, batch: int) -> int:
    """Bytes of keys + values of one slot in one layer: 2 * batch * KV heads * head dim * element size."""
    geometry = adapter_for(model).geometry(model)
    element = next(model.parameters()).element_size()
    return 2 * batch * geometry.num_kv_heads * geometry.head_dim * element


def summarise(method: str, length: int, runs: list[Run], bytes_per_slot: int, chunk_size: int,
              update_every: int) -> dict:
    """Median times over the runs and the memory of the first run (memory is deterministic)."""
    first = runs[0].result
    kept = first.kept_per_layer
    peak_slots = kept_slots_at_peak(first, length, chunk_size, update_every)
    return {
        "length": length,
        "method": method,
        "prefill_s": statistics.median(r.result.prefill_seconds for r in runs),
        "decode_s": statistics.median(r.result.decode_seconds for r in runs),
        "total_s": statistics.median(r.result.prefill_seconds + r.result.decode_seconds for r in runs),
        "cpu_s": statistics.median(r.cpu_seconds for r in runs),
        "kv_bytes_peak": first.kv_bytes_peak,
        "kv_bytes_final": first.kv_bytes_final,
        "policy_bytes_peak": first.policy_bytes_peak,
        "policy_bytes_final": first.policy_bytes_final,
        "total_bytes_peak": first.total_bytes_peak,
        "total_bytes_final": first.total_bytes_final,
        "total_peak_vs_kept_pct": 100.0 * first.total_bytes_peak / (peak_slots * bytes_per_slot),
        "total_final_vs_kv_pct": 100.0 * first.total_bytes_final / first.kv_bytes_final,
        "kept_tokens_final": statistics.fmean(kept),
        "kept_tokens_min_layer": min(kept),
        "kept_tokens_max_layer": max(kept),
        "tokens_seen": first.tokens_seen,
        "retention_final": statistics.fmean(kept) / first.tokens_seen,
        "evicted_per_step": evicted_per_step(first),
        "kept_slots_at_peak": peak_slots,
        "peak_vs_kept_pct": 100.0 * first.kv_bytes_peak / (peak_slots * bytes_per_slot),
        "attention_s": statistics.median(r.timed.attention_seconds if r.timed else 0.0 for r in runs),
        "policy_s": statistics.median(r.timed.policy_seconds if r.timed else 0.0 for r in runs),
        "attention_cpu_s": statistics.median(r.timed.attention_cpu_seconds if r.timed else 0.0 for r in runs),
        "policy_cpu_s": statistics.median(r.timed.policy_cpu_seconds if r.timed else 0.0 for r in runs),
        "policy_steps": runs[0].timed.steps if runs[0].timed else 0,
        "runs_total_s": [r.result.prefill_seconds + r.result.decode_seconds for r in runs],
    }


def add_ratios(rows: list[dict]) -> None:
    """``*_vs_full`` ratios against the full cache at the same length, measured in the same run."""
    full = {row["length"]: row for row in rows if row["method"] == "full"}
    for row in rows:
        ref = full.get(row["length"])
        if ref is None:
            continue
        row["time_vs_full"] = row["total_s"] / ref["total_s"]
        row["cpu_vs_full"] = row["cpu_s"] / ref["cpu_s"]
        row["prefill_vs_full"] = row["prefill_s"] / ref["prefill_s"]
        row["peak_vs_full"] = row["kv_bytes_peak"] / ref["kv_bytes_peak"]
        row["final_vs_full"] = row["kv_bytes_final"] / ref["kv_bytes_final"]
        row["total_peak_vs_full"] = row["total_bytes_peak"] / ref["total_bytes_peak"]


def make_prompt(tokenizer, length: int, seed: int) -> torch.Tensor:
    """(1, length) int64: the first ``length`` tokens of a built-in passkey item made a little longer than that."""
    from namm_transfer.evals.text_tasks import make_item, token_counter

    item = make_item("passkey", seed, length + 64, 0.5, token_counter(tokenizer), "train")
    ids = tokenizer.encode(item.prompt, add_special_tokens=True)
    if len(ids) < length:
        raise ValueError(f"the passkey prompt has {len(ids)} tokens, fewer than the {length} asked for")
    return torch.tensor(ids[:length], dtype=torch.long)[None]


def build_policy(method: str, namm: NammPolicy, namm_result: GenerationResult | None) -> EvictionPolicy | None:
    """The policy of ``method``; the baselines get the NAMM's matched budget from ``namm_result``."""
    if method == "full":
        return None
    if method == "namm":
        return namm
    return make_baseline(method, MatchedBudget.from_retention(namm_result.retention))


TABLE_COLUMNS = ("length", "method", "prefill_s", "decode_s", "total_s", "time_vs_full", "cpu_s", "cpu_vs_full",
                 "peak_MiB", "peak_vs_full", "final_MiB", "policy_peak_MiB", "policy_final_MiB", "total_peak_MiB",
                 "total_peak_vs_full", "total_final_vs_kv_pct", "kept_tokens_final", "retention_final",
                 "peak_vs_kept_pct", "total_peak_vs_kept_pct",
                 "attention_s", "policy_s", "attention_cpu_s", "policy_cpu_s")


def table_rows(rows: list[dict]) -> list[dict]:
    """The rows with bytes shown in MiB, for :func:`namm_transfer.evals.report.format_table`."""
    shown = []
    for row in rows:
        shown.append({**row, "peak_MiB": row["kv_bytes_peak"] / 2**20, "final_MiB": row["kv_bytes_final"] / 2**20,
                      "policy_peak_MiB": row["policy_bytes_peak"] / 2**20,
                      "policy_final_MiB": row["policy_bytes_final"] / 2**20,
                      "total_peak_MiB": row["total_bytes_peak"] / 2**20})
    return shown


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--lengths", default="1024,2048,4096", help="prompt lengths in tokens, comma-separated")
    parser.add_argument("--decode", type=int, default=32, help="tokens generated after each prompt")
    parser.add_argument("--chunk-size", type=int, default=128, help="prefill chunk (namm-spec.md §1.3: 128)")
    parser.add_argument("--update-every", type=int, default=512, help="policy period in tokens")
    parser.add_argument("--layers-per-step", type=int, default=8,
                        help="due layers the NAMM steps in one call (1: one step call per layer, as before issue 6)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method and length (median)")
    parser.add_argument("--methods", default=",".join(METHODS), help="methods, comma-separated; baselines need namm")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads (1 on a shared machine: 2 threads stall when the cores are busy)")
    parser.add_argument("--model", default=None, help="model name or folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random NAMM parameters and the prompt")
    parser.add_argument("--param-std", type=float, default=0.05, help="std of the random NAMM parameters")
    parser.add_argument("--bias", type=float, default=None,
                        help="NAMM read-out bias; default: bisected so that each step evicts --target-evicted")
    parser.add_argument("--target-evicted", type=float, default=0.45, help="fraction evicted per step to aim at")
    parser.add_argument("--out", default="results/bench/cpu.json", help="JSON output file")
    args = parser.parse_args(argv)
    args.lengths = [int(v) for v in args.lengths.split(",") if v]
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    if set(args.methods) & set(BASELINE_RULES) and "namm" not in args.methods:
        parser.error("the baselines use the NAMM's matched budget: include namm")
    if min(args.lengths, default=0) < args.update_every or args.repeats < 1 or args.decode < 1:
        parser.error("lengths must be >= --update-every, --repeats and --decode >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    from namm_transfer.evals.report import format_table
    from namm_transfer.models import load_model

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, dtype="bfloat16", device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    cache = CacheConfig(update_every=args.update_every, attention_dtype="bfloat16",
                        layers_per_step=args.layers_per_step)
    config = NammConfig(update_every=args.update_every)
    prompts = {length: make_prompt(tokenizer, length, args.seed) for length in args.lengths}
    longest = prompts[max(args.lengths)]

    started = time.perf_counter()
    print(f"statistics pass on {longest.shape[1]} tokens ...", flush=True)
    stats = statistics_pass(model, longest, args.chunk_size, cache, config)
    calibration_prompt = longest[:, : 2 * args.update_every]
    if args.bias is None:
        print(f"bisecting the read-out bias on {calibration_prompt.shape[1]} tokens ...", flush=True)
        bias, evicted = calibrate_bias(model, calibration_prompt, args.chunk_size, cache, config, stats, args.seed,
                                       args.param_std, args.target_evicted)
    else:
        bias = args.bias
        namm = NammPolicy(config, random_namm_params(config, args.seed, args.param_std, bias), stats)
        evicted = evicted_per_step(run_once(model, namm, calibration_prompt, args.chunk_size, 1, cache).result)
    params = random_namm_params(config, args.seed, args.param_std, bias)
    print(f"NAMM read-out bias {bias:+.4f}: evicts {100 * evicted:.1f}% per step on the calibration prompt "
          f"({time.perf_counter() - started:.0f} s)", flush=True)

    bytes_per_slot = kv_bytes_per_slot(model, batch=1)
    rows: list[dict] = []
    report = {
        "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else argv)),
        "args": vars(args),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads},
        "model": loaded.name,
        "bytes_per_slot_per_layer": bytes_per_slot,
        "namm": {"seed": args.seed, "param_std": args.param_std, "bias": bias, "evicted_per_step_calibration": evicted,
                 "stats_mean": stats.mean.tolist(), "stats_var": stats.var.tolist()},
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for length in args.lengths:
        input_ids = prompts[length]
        runs: dict[str, list[Run]] = {m: [] for m in args.methods}
        namm_result = None
        for repeat in range(args.repeats + 1):  # repeat 0 is the warm-up, not recorded
            for method in args.methods:
                policy = build_policy(method, NammPolicy(config, params, stats), namm_result)
                run = run_once(model, policy, input_ids, args.chunk_size, args.decode, cache)
                if method == "namm":
                    namm_result = run.result
                if repeat:
                    runs[method].append(run)
                print(f"  {length} tokens, {'warm-up' if not repeat else f'repeat {repeat}'}, {method}: "
                      f"{run.result.prefill_seconds + run.result.decode_seconds:.2f} s", flush=True)
        summaries = [summarise(m, length, runs[m], bytes_per_slot, args.chunk_size, args.update_every)
                     for m in args.methods]
        for row in summaries:
            row["load_average_1min"] = os.getloadavg()[0]  # other processes on this machine distort times
        rows.extend(summaries)
        add_ratios(rows)
        print(format_table(table_rows([r for r in rows if r["length"] == length]), TABLE_COLUMNS), flush=True)
        out.write_text(json.dumps(report, indent=2))  # after every length, so a run cut short keeps its results
    print(format_table(table_rows(rows), TABLE_COLUMNS))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()

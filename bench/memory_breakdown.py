"""Every byte a method holds, by class: the shipped NAMM against the full cache on the embedded SmolLM2 (issue 6,
item 7).

For each prompt length the first ``length`` tokens of a built-in passkey item run through
:class:`~namm_transfer.runtime.runner.EvictingRunner` (chunked prefill, greedy decoding) twice: with the full cache and
with the shipped NAMM (``weights/namm``, its own period and attention numerics). For each run it reports
:meth:`~namm_transfer.runtime.cache.EvictingCache.bytes_by_class` at the moment the total (K/V + policy bytes) peaked
and at the end:

* ``kv``: physical keys and values; ``attendable``: per-slot validity (bool); ``arrival``: per-slot arrival index
  (int32); ``queries``: the recent-query buffer (post-RoPE queries since the layer's last step); ``incoming``: tokens
  of a chunk held back at a period boundary; ``ema`` and ``tail``: the NAMM's per-slot spectrogram EMA and STFT tail.
  Bytes are storage bytes (views count their whole storage, so spare capacity shows).

and the ratios ``total / kv`` at the same moment (the issue's goal: <= 110% at 4k tokens and beyond) and
``total(NAMM) / total(full)``. Besides what is held between forwards, a NAMM step allocates working memory (the
attention rows of the recent queries, the STFT frames of every slot): ``step_working_set_peak`` is the largest
allocation peak of one ``step_layers`` call above what was allocated before it, measured with torch's profiler (CPU
allocations of the ops themselves; temporaries an op frees before it returns are not seen, so it is a lower bound).

Run: ``OMP_NUM_THREADS=1 python bench/memory_breakdown.py`` (about 10 minutes on one shared CPU thread; the profiler
slows the NAMM steps). The JSON goes to ``bench/results/memory_breakdown.json`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_prefill_decode import make_prompt  # noqa: E402  (also makes namm_transfer importable from a plain checkout)

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from namm_transfer.adapters.base import adapter_for  # noqa: E402
from namm_transfer.methods import cache_config_for, load_namm_option, namm_policy  # noqa: E402
from namm_transfer.models import load_model  # noqa: E402
from namm_transfer.namm.policy import NammPolicy  # noqa: E402
from namm_transfer.runtime.cache import CacheConfig, EvictingCache  # noqa: E402
from namm_transfer.runtime.runner import EvictingRunner, RunnerConfig  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "memory_breakdown.json"


def namm_state_by_class(policy: NammPolicy, num_layers: int) -> dict[str, int]:
    """Bytes of the NAMM's carried per-slot state now, by tensor: ``ema`` (B, H, K, S) and ``tail`` (B, H, K, T) summed
    over the model's ``num_layers`` layers (what ``policy.state_bytes()`` sums)."""
    if policy.state_bytes() == 0:  # also before begin(), when layer_state refuses
        return {"ema": 0, "tail": 0}
    held = [s for s in map(policy.layer_state, range(num_layers)) if s is not None]
    return {"ema": sum(s.ema.numel() * s.ema.element_size() for s in held),
            "tail": sum(s.tail.numel() * s.tail.element_size() for s in held)}


class StepWorkingSet:
    """Wraps ``policy.step_layers`` to measure, per call, the peak CPU bytes allocated above the level at the call's
    start (torch profiler, ops' own allocations and frees in time order).

    Attributes:
        peak: the largest such peak over all calls, in bytes.
        peak_call: (layers, slots of the longest layer, n_new) of the call that reached it.
    """

    def __init__(self, policy: NammPolicy):
        self.peak, self.peak_call = 0, None
        self._inner = policy.step_layers
        policy.step_layers = self.step_layers

    def step_layers(self, views):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            decisions = self._inner(views)
        level = peak = 0
        for event in sorted(prof.events(), key=lambda e: e.time_range.start):
            level += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
            peak = max(peak, level)
        if peak > self.peak:
            self.peak = peak
            self.peak_call = (len(views), max(v.num_slots for v in views), views[0].n_new)
        return decisions


class KeepingRunner(EvictingRunner):
    """An :class:`EvictingRunner` that keeps its last cache (``self.cache``) for inspection."""

    def new_cache(self) -> EvictingCache:
        self.cache = super().new_cache()
        return self.cache


def measure(model, ids: torch.Tensor, policy: NammPolicy | None, cache: CacheConfig, chunk_size: int,
            decode: int) -> dict:
    """Bytes by class of one chunked prefill of ``ids`` (1, L) plus ``decode`` greedy tokens under ``policy``."""
    runner = KeepingRunner(adapter_for(model), model, policy,
                           RunnerConfig(chunk_size=chunk_size, max_new_tokens=decode, cache=cache))
    if policy is not None:
        layers = runner.geometry.num_layers  # the EMA/tail split of state_bytes(), read by EvictingCache.bytes_by_class
        policy.state_bytes_by_class = lambda: namm_state_by_class(policy, layers)
        working = StepWorkingSet(policy)
    result = runner.generate(ids, max_new_tokens=decode)
    peak, final = runner.cache.total_bytes_peak_by_class, runner.cache.bytes_by_class()
    row = {
        "tokens_seen": result.tokens_seen,
        "kept_tokens_final": statistics.fmean(result.kept_per_layer),
        "peak": peak, "final": final,
        "total_peak": sum(peak.values()), "kv_at_total_peak": peak["kv"],
        "total_final": sum(final.values()), "kv_final": final["kv"],
        "kv_bytes_peak": result.kv_bytes_peak,
        "total_peak_vs_kv_pct": 100.0 * sum(peak.values()) / peak["kv"],
        "total_final_vs_kv_pct": 100.0 * sum(final.values()) / final["kv"],
    }
    if policy is not None:
        row["step_working_set_peak"] = working.peak
        row["step_working_set_call"] = working.peak_call
        row["total_peak_with_step_working_set"] = row["total_peak"] + working.peak
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--lengths", default="1024,2048,4096", help="prompt lengths in tokens, comma-separated")
    parser.add_argument("--decode", type=int, default=16, help="tokens generated after each prompt")
    parser.add_argument("--chunk-size", type=int, default=128, help="prefill chunk")
    parser.add_argument("--layers-per-step", type=int, default=8, help="due layers the NAMM steps in one call")
    parser.add_argument("--namm", default=None, help="NAMM folder or file (default: the shipped NAMM)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--dtype", default="bfloat16", help="model dtype (K/V and queries are held in it)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON written here")
    args = parser.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",")]
    return args


def mib(size: int) -> str:
    return f"{size / 2**20:7.2f}"


def print_row(length: int, method: str, row: dict, classes: list[str]) -> None:
    peak = row["peak"]
    cells = " ".join(mib(peak.get(name, 0)) for name in classes)
    extra = f" step+{mib(row['step_working_set_peak'])}" if "step_working_set_peak" in row else ""
    print(f"{length:5d} {method:5s} {cells} | total {mib(row['total_peak'])} = {row['total_peak_vs_kv_pct']:6.1f}% "
          f"of K/V; final {row['total_final_vs_kv_pct']:6.1f}%{extra}", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_model("smollm2", dtype=args.dtype)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    weights = load_namm_option(args.namm)
    cache = dataclasses.replace(cache_config_for(weights.config), layers_per_step=args.layers_per_step)
    classes = ["kv", "attendable", "arrival", "queries", "incoming", "ema", "tail"]
    print(f"MiB at the total's peak: {' '.join(f'{c:>7s}' for c in classes)}", flush=True)
    rows = []
    for length in args.lengths:
        ids = make_prompt(tokenizer, length, seed=0)
        by_method = {}
        for method in ("full", "namm"):
            policy = namm_policy(weights) if method == "namm" else None
            by_method[method] = row = {"length": length, "method": method,
                                       **measure(model, ids, policy, cache, args.chunk_size, args.decode)}
            print_row(length, method, row, classes)
        namm, full = by_method["namm"], by_method["full"]
        namm["total_peak_vs_full"] = namm["total_peak"] / full["total_peak"]
        namm["kv_peak_vs_full"] = namm["kv_bytes_peak"] / full["kv_bytes_peak"]
        print(f"      NAMM total peak / full total peak = {namm['total_peak_vs_full']:.3f}, K/V peak ratio "
              f"{namm['kv_peak_vs_full']:.3f}", flush=True)
        rows.extend(by_method.values())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "model": loaded.name, "dtype": args.dtype, "namm": args.namm or "shipped",
            "update_every": cache.update_every, "attention_numerics": cache.attention_dtype,
            "chunk_size": args.chunk_size, "decode": args.decode,
            "layers_per_step": args.layers_per_step, "threads": args.threads, "torch": torch.__version__,
            "machine": platform.machine(), "results": rows,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()

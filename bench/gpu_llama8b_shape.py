"""GPU benchmark on a Llama-3-8B-shaped model with random bf16 weights (the paper's base model shape, namm-spec.md
§1.1): the fused Triton kernel for a NAMM step's attention rows, and NAMM-managed chunked prefill against the full
cache at 8k and 32k tokens.

Sections (each guarded: an error is recorded in the JSON and the next section runs):

* ``a`` correctness: :func:`~namm_transfer.runtime.triton_attention.fused_recent_attention` against the torch path
  of :func:`~namm_transfer.runtime.attention_rows.attention_rows` on 512 queries x 32 heads over 8k and 32k slots with
  evicted gaps and padding slots: max abs difference, share of differing entries, row-sum error.
* ``c`` recompute: the attention rows of 512 recent queries over N cached keys for every layer (32 x 8 KV heads),
  the torch way vs the Triton kernel (median of ``--repeats``), at each ``--recompute-slots``.
* ``d`` prefill: :class:`~namm_transfer.runtime.runner.EvictingRunner` chunked prefill (chunk 512, policy every 512
  tokens) of random token ids with the full cache, a random evicting NAMM (same recipe as bench/cpu_prefill_decode.py;
  statistics from a short statistics pass on the first ``--stats-tokens`` tokens; read-out bias bisected on 1024
  tokens) and the same NAMM with the torch attention path (``namm_torch``); time ratio, peak KV bytes, peak GPU memory.
* ``b`` one 512-token prefill chunk at 32k context with the full cache: taken from section ``d``'s full-cache run at
  the longest length (the time of its last chunk, context ``length - 512`` tokens), so it costs no extra device time.

Results go to ``$OUT/gpu_bench.json`` when OUT is set (else ``--out``), rewritten after every section so a run cut
short still leaves what it measured. ``--smoke`` runs everything on a tiny config (CPU works; without CUDA/triton the
kernel parts record that they were skipped).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_prefill_decode import (  # noqa: E402  (also makes namm_transfer importable from a plain checkout)
    calibrate_bias,
    evicted_per_step,
    kept_slots_at_peak,
    kv_bytes_per_slot,
    random_namm_params,
    run_once,
    statistics_pass,
)

import torch  # noqa: E402

from namm_transfer.adapters.base import adapter_for  # noqa: E402
from namm_transfer.namm.config import NammConfig  # noqa: E402
from namm_transfer.namm.features import NormalisationStats  # noqa: E402
from namm_transfer.namm.policy import NammPolicy  # noqa: E402
from namm_transfer.runtime import triton_attention  # noqa: E402
from namm_transfer.runtime.attention_rows import attention_rows  # noqa: E402
from namm_transfer.runtime.cache import CacheConfig  # noqa: E402

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=32768)
SMOKE = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=4096)


def log(started: float, message: str) -> None:
    print(f"[{time.perf_counter() - started:6.1f} s] {message}", flush=True)


def sync_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@contextlib.contextmanager
def torch_path():
    """Run :func:`attention_rows` on its torch path (the fused kernel switched off) inside the block."""
    previous = os.environ.get(triton_attention.ENV_SWITCH)
    os.environ[triton_attention.ENV_SWITCH] = "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[triton_attention.ENV_SWITCH]
        else:
            os.environ[triton_attention.ENV_SWITCH] = previous


class ChunkTimer:
    """An adapter wrapper that records the synchronised seconds of every forward chunk (policy steps included,
    since a due step runs inside the next forward)."""

    def __init__(self, inner, device: torch.device):
        self.inner, self.device, self.name = inner, device, inner.name
        self.seconds: list[float] = []

    def decoder(self, model):
        return self.inner.decoder(model)

    def geometry(self, model):
        return self.inner.geometry(model)

    def attach(self, model):
        return self.inner.attach(model)

    def forward_chunk(self, model, cache, **kwargs):
        start = sync_time(self.device)
        out = self.inner.forward_chunk(model, cache, **kwargs)
        self.seconds.append(sync_time(self.device) - start)
        return out


def attention_inputs(q_heads: int, kv_heads: int, queries: int, slots: int, dim: int, device: torch.device,
                     evicted: bool, seed: int) -> dict:
    """Recent queries over a cache: with ``evicted``, arrival indices have gaps (a pruned cache) and 10% of the old
    slots are padding; otherwise a full cache (token_index = 0..N-1)."""
    gen = torch.Generator().manual_seed(seed)
    old = slots - queries
    if evicted:
        first = 3 * old
        old_index = torch.stack([torch.randperm(first, generator=gen)[:old].sort().values for _ in range(kv_heads)])
        valid = torch.cat([torch.rand(kv_heads, old, generator=gen) > 0.1, torch.ones(kv_heads, queries, dtype=bool)],
                          dim=-1)
    else:
        first = old
        old_index = torch.arange(old).expand(kv_heads, old)
        valid = torch.ones(kv_heads, slots, dtype=torch.bool)
    query_index = torch.arange(first, first + queries)
    token_index = torch.cat([old_index, query_index.expand(kv_heads, queries)], dim=-1)
    tensors = dict(
        queries=torch.randn(1, q_heads, queries, dim, generator=gen).to(torch.bfloat16),
        keys=(2.0 * torch.randn(1, kv_heads, slots, dim, generator=gen)).to(torch.bfloat16),
        token_index=token_index[None], valid=valid[None], query_index=query_index,
        query_valid=torch.ones(1, kv_heads, queries, dtype=torch.bool),
    )
    return {name: t.to(device) for name, t in tensors.items()}


def section_correctness(args, device, geometry) -> dict:
    """(a) fused kernel vs torch path on realistic shapes."""
    if not triton_attention.available() or device.type != "cuda":
        return {"skipped": "the fused kernel needs CUDA and triton"}
    q_heads, kv_heads, dim = geometry
    rows = []
    for slots in args.check_slots:
        inputs = attention_inputs(q_heads, kv_heads, args.queries, slots, dim, device, evicted=True, seed=slots)
        scaling = dim**-0.5
        got = triton_attention.fused_recent_attention(**inputs, scaling=scaling, numerics="bfloat16")
        with torch_path():
            want = attention_rows(**inputs, scaling=scaling, numerics="bfloat16", chunk=128).float()
        diff = (got - want).abs()
        rows.append({
            "slots": slots, "queries": args.queries, "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": dim,
            "max_abs_diff": diff.max().item(),
            "differing_fraction": (diff > 0).float().mean().item(),
            "max_row_sum_error": (got.sum(-1) - 1.0).abs().max().item(),
            "nonzero_where_reference_zero": int((got[want == 0] != 0).sum().item()),
        })
        del got, want, diff, inputs
    return {"checks": rows}


def section_recompute(args, device, geometry, layers: int) -> dict:
    """(c) attention rows of the recent queries for every layer: torch path vs fused kernel."""
    q_heads, kv_heads, dim = geometry
    results = []
    use_kernel = triton_attention.available() and device.type == "cuda"
    for slots in args.recompute_slots:
        per_layer = [attention_inputs(q_heads, kv_heads, args.queries, slots, dim, device, evicted=False, seed=i)
                     for i in range(layers)]
        scaling = dim**-0.5

        def all_layers() -> None:
            for inputs in per_layer:
                attention_rows(**inputs, scaling=scaling, numerics="bfloat16", chunk=128).float()

        row = {"slots": slots, "queries": args.queries, "layers": layers}
        paths = [("torch", torch_path)] + ([("triton", contextlib.nullcontext)] if use_kernel else [])
        for name, context in paths:
            with context():
                all_layers()  # warm-up (and compilation)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                times = []
                for _ in range(args.repeats):
                    start = sync_time(device)
                    all_layers()
                    times.append(sync_time(device) - start)
            row[f"{name}_s"] = statistics.median(times)
            if device.type == "cuda":
                row[f"{name}_extra_peak_MiB"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        if use_kernel:
            row["speedup"] = row["torch_s"] / row["triton_s"]
        results.append(row)
        del per_layer
    return {"results": results, "kernel": use_kernel}


def build_model(args, device):
    """A LlamaForCausalLM with the Llama-3-8B shape (or the smoke shape) and random bf16 weights, created directly
    on ``device``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**(SMOKE if args.smoke else LLAMA3_8B), attn_implementation="sdpa")
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def section_prefill(args, device, model, started: float) -> dict:
    """(d) full cache vs NAMM (fused kernel and torch path) chunked prefill."""
    cache = CacheConfig(update_every=args.update_every, attention_dtype="bfloat16",
                        layers_per_step=args.layers_per_step)
    config = NammConfig(update_every=args.update_every)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, model.config.vocab_size, (1, max(args.lengths)), generator=gen).to(device)
    stats = statistics_pass(model, ids[:, : args.stats_tokens], args.chunk_size, cache, config)
    stats = NormalisationStats(stats.mean.to(device), stats.var.to(device))
    log(started, f"statistics pass on {args.stats_tokens} tokens done")
    if args.bias is None:
        bias, evicted = calibrate_bias(model, ids[:, : 2 * args.update_every], args.chunk_size, cache, config, stats,
                                       args.seed, args.param_std, args.target_evicted)
    else:
        bias, evicted = args.bias, None
    params = random_namm_params(config, args.seed, args.param_std, bias).to(device)
    log(started, f"NAMM read-out bias {bias:+.4f} (evicts {evicted} per step on 1024 tokens)")
    bytes_per_slot = kv_bytes_per_slot(model, batch=1)
    rows = []
    for length in args.lengths:
        for method in args.methods:
            if time.perf_counter() - started > args.time_budget:
                rows.append({"length": length, "method": method, "skipped": "time budget"})
                continue
            policy = None if method == "full" else NammPolicy(config, params, stats)
            path = torch_path if method == "namm_torch" else contextlib.nullcontext
            runs = []
            for _ in range(args.repeats):
                timer = ChunkTimer(adapter_for(model), device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                with path():
                    runs.append((run_once(model, policy, ids[:, :length], args.chunk_size, 1, cache, timer),
                                 timer.seconds))
            result, chunks = runs[0][0].result, runs[0][1]
            row = {
                "length": length, "method": method,
                "prefill_s": statistics.median(r.result.prefill_seconds for r, _ in runs),
                "final_step_s": statistics.median(r.result.decode_seconds for r, _ in runs),
                "total_s": statistics.median(r.result.prefill_seconds + r.result.decode_seconds for r, _ in runs),
                "kv_bytes_peak": result.kv_bytes_peak, "kv_bytes_final": result.kv_bytes_final,
                "policy_bytes_peak": result.policy_bytes_peak, "policy_bytes_final": result.policy_bytes_final,
                "total_bytes_peak": result.total_bytes_peak, "total_bytes_final": result.total_bytes_final,
                "kept_tokens_final": statistics.fmean(result.kept_per_layer),
                "evicted_per_step": evicted_per_step(result),
                "peak_vs_kept_pct": 100.0 * result.kv_bytes_peak / (
                    kept_slots_at_peak(result, length, args.chunk_size, args.update_every) * bytes_per_slot),
                "attention_s": statistics.median(r.timed.attention_seconds if r.timed else 0.0 for r, _ in runs),
                "policy_s": statistics.median(r.timed.policy_seconds if r.timed else 0.0 for r, _ in runs),
                "first_chunk_s": chunks[0], "last_chunk_s": chunks[-1], "chunks": len(chunks),
                "gpu_peak_MiB": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
            }
            rows.append(row)
            log(started, f"{length} tokens, {method}: {row['total_s']:.2f} s, peak KV "
                         f"{row['kv_bytes_peak'] / 2**20:.0f} MiB, policy {row['policy_bytes_peak'] / 2**20:.1f} MiB, "
                         f"total {row['total_bytes_peak'] / 2**20:.1f} MiB")
    full = {r["length"]: r for r in rows if r["method"] == "full" and "total_s" in r}
    for row in rows:
        if "total_s" in row and row["length"] in full:
            row["time_vs_full"] = row["total_s"] / full[row["length"]]["total_s"]
            row["peak_vs_full"] = row["kv_bytes_peak"] / full[row["length"]]["kv_bytes_peak"]
            row["total_peak_vs_full"] = row["total_bytes_peak"] / full[row["length"]]["total_bytes_peak"]
    return {"bias": bias, "evicted_per_step_calibration": evicted, "stats_tokens": args.stats_tokens,
            "chunk_size": args.chunk_size, "update_every": args.update_every, "results": rows}


def chunk_at_context(prefill: dict, chunk_size: int) -> dict:
    """(b) from the full-cache run at the longest length: its last chunk's time and the context it attended."""
    runs = [r for r in prefill["results"] if r["method"] == "full" and "last_chunk_s" in r]
    if not runs:
        return {"skipped": "no full-cache prefill run"}
    longest = max(runs, key=lambda r: r["length"])
    return {"chunk_tokens": chunk_size, "context_tokens": longest["length"] - chunk_size,
            "seconds": longest["last_chunk_s"], "tokens_per_s": chunk_size / longest["last_chunk_s"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model and sizes (runs on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sections", default="a,c,d,b", help="sections to run, comma-separated")
    parser.add_argument("--lengths", default="8192,32768", help="prefill lengths of section d")
    parser.add_argument("--methods", default="full,namm,namm_torch", help="methods of section d")
    parser.add_argument("--check-slots", default="8192,32768", help="cached slots of section a")
    parser.add_argument("--recompute-slots", default="32768,4096", help="cached slots of section c")
    parser.add_argument("--queries", type=int, default=512, help="recent queries (the NAMM period)")
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--update-every", type=int, default=512)
    parser.add_argument("--layers-per-step", type=int, default=8,
                        help="due layers the NAMM steps in one call (1: one step call per layer, as before issue 6)")
    parser.add_argument("--stats-tokens", type=int, default=2048, help="tokens of the statistics pass")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--param-std", type=float, default=0.05)
    parser.add_argument("--bias", type=float, default=None, help="NAMM read-out bias (default: bisected)")
    parser.add_argument("--target-evicted", type=float, default=0.45)
    parser.add_argument("--time-budget", type=float, default=200.0,
                        help="seconds after which the remaining runs are skipped (recorded as skipped)")
    parser.add_argument("--out", default="results/bench/gpu.json", help="JSON output when $OUT is not set")
    args = parser.parse_args(argv)
    if args.smoke:
        args.lengths, args.check_slots, args.recompute_slots = "1024,2048", "1024", "2048"
        args.stats_tokens = 1024
    for name in ("lengths", "check_slots", "recompute_slots"):
        setattr(args, name, [int(v) for v in getattr(args, name).split(",") if v])
    args.sections = [s for s in args.sections.split(",") if s]
    args.methods = [m for m in args.methods.split(",") if m]
    if set(args.methods) - {"full", "namm", "namm_torch"}:
        parser.error("methods are full, namm, namm_torch")
    if os.environ.get("OUT"):
        args.out = str(Path(os.environ["OUT"]) / "gpu_bench.json")
    return args


def environment(device: torch.device) -> dict:
    import transformers

    info = {"platform": platform.platform(), "torch": torch.__version__, "transformers": transformers.__version__,
            "device": str(device), "kernel_available": triton_attention.available()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if triton_attention.available():
        info["triton"] = triton_attention.triton.__version__
    return info


def main(argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    args = parse_args(argv)
    device = torch.device(args.device)
    shape = SMOKE if args.smoke else LLAMA3_8B
    geometry = (shape["num_attention_heads"], shape["num_key_value_heads"],
                shape["hidden_size"] // shape["num_attention_heads"])
    report = {"args": vars(args), "environment": environment(device), "model_shape": shape, "sections": {},
              "errors": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def run(name: str, fn):
        if name not in args.sections:
            return None
        log(started, f"section {name} ...")
        try:
            report["sections"][name] = fn()
        except Exception as error:  # recorded, and the next section runs
            report["errors"][name] = f"{type(error).__name__}: {error}"
            traceback.print_exc()
        report["elapsed_s"] = time.perf_counter() - started
        out.write_text(json.dumps(report, indent=2))
        return report["sections"].get(name)

    with torch.no_grad():
        run("a", lambda: section_correctness(args, device, geometry))
        run("c", lambda: section_recompute(args, device, geometry, shape["num_hidden_layers"]))
        model = None
        if "d" in args.sections:
            log(started, "building the model ...")
            try:
                model = build_model(args, device)
            except Exception as error:  # recorded; section d cannot run
                report["errors"]["model"] = f"{type(error).__name__}: {error}"
                traceback.print_exc()
        prefill = run("d", lambda: section_prefill(args, device, model, started)) if model is not None else None
        if prefill is not None:
            run("b", lambda: chunk_at_context(prefill, args.chunk_size))
    print(summary(report), flush=True)
    print(f"wrote {out}", flush=True)
    return report


def summary(report: dict) -> str:
    """A few lines for the log."""
    lines = [f"environment: {report['environment']}"]
    sections = report["sections"]
    for check in sections.get("a", {}).get("checks", []):
        lines.append(f"(a) N={check['slots']}: max |triton - torch| {check['max_abs_diff']:.2e}, "
                     f"differing {100 * check['differing_fraction']:.4f}%")
    for row in sections.get("c", {}).get("results", []):
        kernel = f", triton {row['triton_s'] * 1e3:.1f} ms ({row['speedup']:.1f}x)" if "triton_s" in row else ""
        lines.append(f"(c) N={row['slots']}, {row['layers']} layers: torch {row['torch_s'] * 1e3:.1f} ms{kernel}")
    if "b" in sections and "seconds" in sections["b"]:
        b = sections["b"]
        lines.append(f"(b) {b['chunk_tokens']}-token chunk at {b['context_tokens']} context: {b['seconds']:.3f} s")
    for row in sections.get("d", {}).get("results", []):
        if "total_s" in row:
            lines.append(f"(d) {row['length']} {row['method']}: total {row['total_s']:.2f} s "
                         f"(x{row.get('time_vs_full', float('nan')):.2f} full), peak KV "
                         f"{row['kv_bytes_peak'] / 2**20:.0f} MiB (x{row.get('peak_vs_full', float('nan')):.2f}), "
                         f"policy {row['policy_bytes_peak'] / 2**20:.1f} MiB, total "
                         f"{row['total_bytes_peak'] / 2**20:.1f} MiB (x{row.get('total_peak_vs_full', float('nan')):.2f}), "
                         f"attention rows {row['attention_s']:.2f} s, policy {row['policy_s']:.2f} s")
    for name, error in report["errors"].items():
        lines.append(f"error in {name}: {error}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Operator launches of the NAMM's policy steps with the layers batched per call (``CacheConfig.layers_per_step``).

A GPU runs the NAMM's step on tiny tensors (a few hundred slots per layer), so its time is set by the number of
kernels it launches, not by their work (issue 6, item 9: 2.3 ms per layer step on an H200, launch-bound). This script
counts, on CPU with torch's profiler, the aten operators one prefill's policy steps call when
:class:`~namm_transfer.runtime.cache.EvictingCache` hands the policy 1, 8 (the default) or all layers per
``step_layers`` call, and checks that every setting keeps exactly the same slots (and the same NAMM state).

The prefill: ``--steps`` x the policy period (the shipped NAMM's 256) random tokens in chunks of ``--chunk-size``
(128), one greedy token, then the final flush; with ``--steps 1`` every managed layer steps exactly once, all layers
due together at the flush. The model (``--model``): ``llama8b-shape`` is a LlamaForCausalLM with the Llama-3-8B
layer count and head layout (32 layers, 32 query heads, 8 KV heads, head dim 128) but tiny hidden and vocabulary
sizes (random bf16 weights); ``smollm2`` is the embedded SmolLM2-135M (30 layers, 9 query / 3 KV heads). The policy
is the shipped NAMM (``load_namm_option(None)``, keep bias 0).

What is counted (every step call is wrapped in a ``record_function`` range, the attention-row recomputation in
another):

* ``top_level_ops``: aten operators called directly by the step code (an aten op inside another aten op is part of
  its parent): the operator dispatches a GPU run would make;
* ``launching_ops``: those top-level ops that can launch a kernel (their subtree holds an op that is not a view,
  metadata, allocation or pure dispatch wrapper such as ``aten::view``, ``aten::expand``, ``aten::empty``,
  ``aten::to`` with nothing to convert);
* ``kernel_ops``: the leaf aten ops of those subtrees that are not views etc. (``matmul`` counts its ``bmm``,
  ``to`` its ``copy_``): an estimate of the kernels launched (a CUDA op may launch more than one: an FFT, a sort);
* ``host_syncs``: ``aten::_local_scalar_dense`` and ``aten::nonzero`` (``.item()``, ``bool(tensor)``, boolean
  indexing): each waits for the GPU.

Counts are given per step call, in total over the prefill, and per layer step. As a cross-check the whole run's
top-level aten ops minus those of the same run with the full cache are given (``run_minus_full``: it also holds the
query buffering in the attention and the cache's gathers, which are outside the policy step).

Run: ``OMP_NUM_THREADS=1 python bench/step_launches.py`` (about a minute on one shared CPU thread; writes
``bench/results/step_launches.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_prefill_decode import ensure_importable  # noqa: E402,F401  (importing it makes namm_transfer importable)

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import namm_transfer.runtime.cache as cache_module  # noqa: E402
from namm_transfer.adapters.base import adapter_for  # noqa: E402
from namm_transfer.methods import load_namm_option, namm_policy  # noqa: E402
from namm_transfer.runtime.cache import CacheConfig, EvictingCache  # noqa: E402
from namm_transfer.runtime.runner import EvictingRunner, RunnerConfig  # noqa: E402

STEP_RANGE = "namm_step_call"
# aten ops that launch no kernel themselves: views, metadata, allocations, and wrappers that only dispatch (their
# children are counted when they do real work, e.g. aten::to -> aten::_to_copy -> aten::copy_)
NO_KERNEL = frozenset(f"aten::{name}" for name in (
    "view", "_unsafe_view", "reshape", "as_strided", "slice", "select", "transpose", "t", "permute", "expand",
    "expand_as", "unsqueeze", "squeeze", "alias", "detach", "view_as", "unbind", "split", "split_with_sizes",
    "chunk", "narrow", "flatten", "unflatten", "empty", "empty_strided", "empty_like", "lift_fresh", "resolve_conj",
    "resolve_neg", "result_type", "to", "contiguous", "type_as", "movedim", "numpy_T", "matmul",
    "view_as_real", "view_as_complex", "real", "imag", "_reshape_alias", "broadcast_tensors", "size", "stride",
    "is_same_size", "is_nonzero", "item", "dim", "_has_compatible_shallow_copy_type",
))
SYNCS = frozenset({"aten::_local_scalar_dense", "aten::nonzero"})
LLAMA3_8B_HEADS = dict(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       hidden_size=256, intermediate_size=512, vocab_size=512, rope_theta=500000.0,
                       max_position_embeddings=32768)


class ProfiledCache(EvictingCache):
    """An :class:`EvictingCache` whose every policy step call runs inside a ``record_function`` range."""

    def _step(self, *layers):
        with record_function(STEP_RANGE):
            return super()._step(*layers)


class ProfiledRunner(EvictingRunner):
    """An :class:`EvictingRunner` on a :class:`ProfiledCache`, kept as ``self.cache`` for inspection."""

    def new_cache(self) -> EvictingCache:
        self.cache = ProfiledCache(self.policy, self.geometry.num_layers, self.geometry.managed_layers,
                                   self.config.cache)
        return self.cache


def _parts():
    """(owner, attribute, part name) of the functions whose calls get their own ``record_function`` range: the
    attention rows, the batched feature/score stages, and the per-layer selection and state gather."""
    import namm_transfer.namm.features as features
    import namm_transfer.namm.policy as policy_module

    return [
        (policy_module.NammPolicy, "step_layers", "policy_other"),
        (cache_module, "attention_rows", "attention_rows"),
        (policy_module, "spectral_ema_step", "spectral_ema"),
        (policy_module, "token_features", "token_features"),
        (policy_module, "bam_scores", "bam_scores"),
        (policy_module, "protected_slots", "protected_slots"),
        (policy_module, "select_tokens", "selection"),
        (features.SpectralState, "gather", "state_gather"),
    ]


PARTS = ("attention_rows", "spectral_ema", "token_features", "bam_scores", "protected_slots", "selection",
         "state_gather", "policy_other", "cache_bookkeeping")
RANGE_PREFIX = "part:"


@contextmanager
def ranged_parts():
    """Wrap each of :func:`_parts` in a ``record_function`` range named ``part:<name>``."""
    saved = []
    for owner, attr, name in _parts():
        inner = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)

        def wrapped(*args, _inner=inner, _name=RANGE_PREFIX + name, **kwargs):
            with record_function(_name):
                return _inner(*args, **kwargs)

        saved.append((owner, attr, inner))
        setattr(owner, attr, wrapped)
    try:
        yield
    finally:
        for owner, attr, inner in reversed(saved):
            setattr(owner, attr, inner)


def build_model(name: str):
    if name == "smollm2":
        from namm_transfer.models import load_model

        return load_model("smollm2", dtype="bfloat16").model.eval()
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**LLAMA3_8B_HEADS, attn_implementation="sdpa")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


def _ancestors(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def _is_aten(event) -> bool:
    return event.name.startswith("aten::")


def _kernel_leaves(event) -> int:
    """Leaf aten ops of ``event``'s subtree that are not views etc. (an op with aten children counts only them)."""
    children = [child for child in event.cpu_children if _is_aten(child)]
    if children:
        below = sum(_kernel_leaves(child) for child in children)
        if below or event.name in NO_KERNEL:
            return below
    return 0 if event.name in NO_KERNEL else 1


def _subtree(event):
    yield event
    for child in event.cpu_children:
        yield from _subtree(child)


def count_ops(events) -> dict:
    """Top-level aten ops of the whole profile, and per step call (inside ``STEP_RANGE``), split by part."""
    whole = 0
    calls: dict[int, Counter] = {}
    names: Counter = Counter()
    for event in events:
        if event.name == STEP_RANGE:
            calls.setdefault(event.id, Counter())
        if not _is_aten(event):
            continue
        chain = list(_ancestors(event))
        if any(_is_aten(a) for a in chain):
            continue
        whole += 1
        step = next((a for a in chain if a.name == STEP_RANGE), None)
        if step is None:
            continue
        inner = next((a.name for a in chain if a.name.startswith(RANGE_PREFIX)), None)
        part = "cache_bookkeeping" if inner is None else inner[len(RANGE_PREFIX):]
        kernels = _kernel_leaves(event)
        syncs = sum(1 for e in _subtree(event) if e.name in SYNCS)
        counter = calls.setdefault(step.id, Counter())
        counter["top_level_ops"] += 1
        counter["launching_ops"] += kernels > 0
        counter["kernel_ops"] += kernels
        counter["host_syncs"] += syncs
        counter[f"{part}:top_level_ops"] += 1
        counter[f"{part}:kernel_ops"] += kernels
        counter[f"{part}:host_syncs"] += syncs
        names[event.name] += 1
    return {"run_top_level_ops": whole, "calls": [dict(calls[k]) for k in sorted(calls)], "names": names}


def run_once(model, ids: torch.Tensor, policy, cache: CacheConfig, chunk_size: int) -> tuple[dict, EvictingCache]:
    runner = ProfiledRunner(adapter_for(model), model, policy, RunnerConfig(chunk_size=chunk_size, cache=cache))
    with ranged_parts(), profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        runner.generate(ids, max_new_tokens=1)
        seconds = time.perf_counter() - started
    counts = count_ops(prof.events())
    counts["seconds_profiled"] = seconds
    return counts, runner.cache


def kept_signature(cache: EvictingCache, policy, num_layers: int) -> list[tuple[torch.Tensor, ...]]:
    """Per layer: arrival indices and visibility of the kept slots, and the NAMM's carried EMA and tail."""
    out = []
    for i, layer in enumerate(cache.layers):
        state = policy.layer_state(i) if policy is not None and i < num_layers else None
        out.append((layer.arrival.clone(), layer.attendable.clone(),
                    None if state is None else state.ema.clone(), None if state is None else state.tail.clone()))
    return out


def same(a, b) -> tuple[bool, bool]:
    """(kept sets identical, NAMM state bit-identical) for two :func:`kept_signature` lists."""
    kept = all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))
    state = all((x[2] is None and y[2] is None) or (torch.equal(x[2], y[2]) and torch.equal(x[3], y[3]))
                for x, y in zip(a, b, strict=True))
    return kept, state


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("llama8b-shape", "smollm2"), default="llama8b-shape")
    parser.add_argument("--steps", type=int, default=1, help="policy steps per layer in the prefill")
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--layers-per-step", default="1,8,all",
                        help="comma-separated CacheConfig.layers_per_step values; 'all' = the model's layer count")
    parser.add_argument("--gpu-length", type=int, default=32768,
                        help="prefill length the per-step counts are scaled to (the issue's 32k)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "step_launches.json"))
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    model = build_model(args.model)
    weights = load_namm_option(None)
    period = weights.config.update_every
    num_layers = model.config.num_hidden_layers
    length = args.steps * period
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    settings = [num_layers if s.strip() == "all" else int(s) for s in args.layers_per_step.split(",")]

    full, _ = run_once(model, ids, None, CacheConfig(), args.chunk_size)
    rows, reference = [], None
    for lps in settings:
        policy = namm_policy(weights)
        counts, cache = run_once(model, ids, policy, CacheConfig(layers_per_step=lps), args.chunk_size)
        signature = kept_signature(cache, policy, num_layers)
        if reference is None:
            reference = signature
        kept_same, state_same = same(reference, signature)
        calls = counts["calls"]
        layer_steps = len(cache.retention)
        total = Counter()
        for call in calls:
            total.update(call)
        row = {
            "layers_per_step": lps,
            "step_calls": len(calls),
            "layer_steps": layer_steps,
            "per_call_top_level_ops": sorted({c["top_level_ops"] for c in calls}),
            "per_call_kernel_ops": sorted({c["kernel_ops"] for c in calls}),
            **{f"total_{k}": total[k] for k in ("top_level_ops", "launching_ops", "kernel_ops", "host_syncs")},
            "by_part": {part: {k: total[f"{part}:{k}"] for k in ("top_level_ops", "kernel_ops", "host_syncs")}
                        for part in PARTS},
            "top_level_ops_per_layer_step": total["top_level_ops"] / layer_steps,
            "kernel_ops_per_layer_step": total["kernel_ops"] / layer_steps,
            "host_syncs_per_layer_step": total["host_syncs"] / layer_steps,
            "run_top_level_ops": counts["run_top_level_ops"],
            "run_minus_full": counts["run_top_level_ops"] - full["run_top_level_ops"],
            "kept_sets_identical_to_first": kept_same,
            "namm_state_identical_to_first": state_same,
            "kept_slots_per_layer": cache.kept_per_layer(),
            "seconds_profiled": counts["seconds_profiled"],
            "top_ops": dict(counts["names"].most_common(12)),
        }
        # a 32k prefill steps every layer gpu_length / period times, in ceil(layers / lps) calls each time
        steps_32k = args.gpu_length // period
        row["gpu_length_step_calls"] = steps_32k * math.ceil(num_layers / lps)
        row["gpu_length_kernel_ops_est"] = steps_32k * total["kernel_ops"] // args.steps
        row["gpu_length_top_level_ops_est"] = steps_32k * total["top_level_ops"] // args.steps
        rows.append(row)
        print(f"layers_per_step={lps}: done ({counts['seconds_profiled']:.1f} s)", flush=True)

    base = rows[0]
    for row in rows:
        row["kernel_ops_vs_first"] = row["total_kernel_ops"] / base["total_kernel_ops"]
        row["kernel_ops_removed_vs_first"] = base["total_kernel_ops"] - row["total_kernel_ops"]
    result = {
        "model": args.model,
        "model_shape": {k: getattr(model.config, k) for k in ("num_hidden_layers", "num_attention_heads",
                                                              "num_key_value_heads", "head_dim", "hidden_size")},
        "namm": "shipped (load_namm_option(None)), keep bias 0",
        "period": period, "prompt_tokens": length, "chunk_size": args.chunk_size, "steps_per_layer": args.steps,
        "gpu_length": args.gpu_length,
        "full_cache_run_top_level_ops": full["run_top_level_ops"],
        "torch": torch.__version__, "python": platform.python_version(),
        "no_kernel_ops": sorted(NO_KERNEL), "sync_ops": sorted(SYNCS),
        "rows": rows,
        "all_kept_sets_identical": all(r["kept_sets_identical_to_first"] for r in rows),
        "all_namm_states_identical": all(r["namm_state_identical_to_first"] for r in rows),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")

    print(f"\n{args.model}: {num_layers} layers, shipped NAMM (period {period}), {length}-token prefill in chunks of "
          f"{args.chunk_size}, {args.steps} step(s) per layer; full-cache run: {full['run_top_level_ops']} "
          "top-level ops")
    header = ("layers/call", "calls", "top ops/call", "kernel ops/call", "top ops", "kernel ops", "syncs",
              "kernel ops/layer step", "run - full", f"calls @{args.gpu_length // 1024}k", "kernel ops @32k",
              "kept same")
    print(" | ".join(header))
    for r in rows:
        print(" | ".join(str(x) for x in (
            r["layers_per_step"], r["step_calls"], r["per_call_top_level_ops"], r["per_call_kernel_ops"],
            r["total_top_level_ops"], r["total_kernel_ops"], r["total_host_syncs"],
            f"{r['kernel_ops_per_layer_step']:.1f}", r["run_minus_full"], r["gpu_length_step_calls"],
            r["gpu_length_kernel_ops_est"], r["kept_sets_identical_to_first"] and r["namm_state_identical_to_first"],
        )))
    print("\nkernel ops (host syncs) by part, all step calls of the prefill:")
    print(" | ".join(("part",) + tuple(f"{r['layers_per_step']} layers/call" for r in rows)))
    for part in PARTS:
        print(" | ".join((part,) + tuple(f"{r['by_part'][part]['kernel_ops']} ({r['by_part'][part]['host_syncs']})"
                                         for r in rows)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

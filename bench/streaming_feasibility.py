"""Could a NAMM step fold each chunk's attention rows into its per-slot state as the chunk arrives (no buffer of
``update_every`` queries), keeping every kept set? Two measurements on the embedded SmolLM2 with the shipped NAMM
(issue 6, item 7):

1. **Rows at arrival.** Between two steps a layer only appends, so the attention row of a recent query over the slots
   present when it arrived is, in exact arithmetic, its row at the step (later slots are masked by causality). For
   every step of a run this recomputes the rows chunk by chunk over the slots present at each chunk's arrival
   (``attention_rows`` on the prefix) and counts entries that are not bit-equal to the step's rows.
2. **EMA summation order.** Streaming adds each frame's share to the EMA when the frame completes; today's step sums
   the frames in one matmul (``slot_weights @ frames``) and then adds the decayed old EMA. The run is repeated with
   ``spectral_ema_step`` replaced by one that sums in the streaming order (old EMA decayed first, then frame by
   frame), and every kept set of every (step, layer) is compared with the stock run's.

Run: ``OMP_NUM_THREADS=1 python bench/streaming_feasibility.py`` (a few minutes on one CPU thread); JSON to
``bench/results/streaming_feasibility.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_prefill_decode import make_prompt  # noqa: E402  (also makes namm_transfer importable from a plain checkout)
from memory_breakdown import KeepingRunner  # noqa: E402

import torch  # noqa: E402

from namm_transfer.adapters.base import adapter_for  # noqa: E402
from namm_transfer.methods import cache_config_for, load_namm_option, namm_policy  # noqa: E402
from namm_transfer.models import load_model  # noqa: E402
from namm_transfer.namm import features  # noqa: E402
from namm_transfer.runtime.attention_rows import attention_rows  # noqa: E402
from namm_transfer.runtime.runner import RunnerConfig  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "streaming_feasibility.json"


def streaming_order_ema_step(attention: torch.Tensor, previous, config):
    """``features.spectral_ema_step`` with the EMA summed in the order a streaming step would use: the decayed old EMA
    first, then each frame's weighted spectrogram as the frame completes (frame 0 first). Same frames, same weights,
    same tail; only the fp32 summation order differs."""
    stock = _STOCK_EMA_STEP(attention, previous, config)
    batch, heads, n_new, slots = attention.shape
    n_old = slots - n_new
    tail = torch.zeros(batch, heads, slots, config.n_fft - config.hop)
    if previous is not None:
        tail[:, :, :n_old] = previous.tail.float()
    frames = features.spectrogram(torch.cat([tail, attention.float().transpose(-1, -2)], dim=-1), config)
    num_frames = n_new // config.hop
    weights = features.ema_frame_weights(num_frames, config).to(torch.float32)
    first_frame = torch.cat([torch.zeros(n_old, dtype=torch.long), torch.arange(n_new) // config.hop])
    ema = torch.zeros_like(stock.ema)
    if previous is not None:
        ema[:, :, :n_old] = torch.tensor(config.ema_coeff**n_new, dtype=torch.float32) * previous.ema.float()
    for frame in range(num_frames):
        seen = (first_frame <= frame).to(torch.float32)[:, None]  # (N, 1): slots that exist at this frame
        ema += weights[frame] * seen * frames[:, :, :, frame]
    EMA_DIFFERENCE["entries"] += ema.numel()
    EMA_DIFFERENCE["not_bit_equal"] += int((ema != stock.ema).sum())
    relative = ((ema - stock.ema).abs() / stock.ema.abs().clamp_min(1e-30)).max()
    EMA_DIFFERENCE["max_relative_diff"] = max(EMA_DIFFERENCE["max_relative_diff"], float(relative))
    return features.SpectralState(ema=ema, tail=stock.tail)


EMA_DIFFERENCE = {"entries": 0, "not_bit_equal": 0, "max_relative_diff": 0.0}
"""How the streaming-order EMA differs from the stock EMA over all steps of the current length's run (fp32, before
the state is stored in bf16)."""


_STOCK_EMA_STEP = features.spectral_ema_step


class Recorder:
    """Wraps ``policy.step_layers``: keeps every decision's indices per (step, layer) and, when ``runner`` is given,
    compares each layer's attention rows with the rows recomputed chunk by chunk at arrival."""

    def __init__(self, policy, runner: KeepingRunner | None, chunk: int):
        self.kept: dict[tuple[int, int], torch.Tensor] = {}
        self.entries = self.differing = self.nonzero_after_arrival = 0
        self.max_abs_diff = 0.0
        self._inner, self._runner, self._chunk = policy.step_layers, runner, chunk
        policy.step_layers = self.step_layers

    def step_layers(self, views):
        decisions = self._inner(views)
        for view, decision in zip(views, decisions):
            self.kept[(view.step, view.layer)] = view.arrival.gather(2, decision.indices).clone()
            if self._runner is not None:
                self._compare_rows(view)
        return decisions

    def _compare_rows(self, view) -> None:
        cache = self._runner.cache
        layer = cache.layers[view.layer]
        rows = view.attention()
        n_new, slots = view.n_new, view.num_slots
        query_index = torch.arange(layer.tokens_seen - n_new, layer.tokens_seen)
        for start in range(0, n_new, self._chunk):
            stop = min(start + self._chunk, n_new)
            present = slots - n_new + stop  # slots held when this chunk's queries arrived
            at_arrival = attention_rows(
                layer.queries[:, :, start:stop], view.keys[:, :, :present], view.arrival[:, :, :present],
                view.attendable[:, :, :present], query_index[start:stop],
                view.attendable[:, :, slots - n_new + start : slots - n_new + stop], layer.scaling, cache.numerics,
                cache.config.attention_chunk, layer.sliding_window,
            )
            at_step = rows[:, :, start:stop, :present]
            self.entries += at_step.numel()
            self.differing += int((at_arrival != at_step).sum())
            self.max_abs_diff = max(self.max_abs_diff, float((at_arrival.float() - at_step.float()).abs().max()))
            self.nonzero_after_arrival += int((rows[:, :, start:stop, present:] != 0).sum())


def run(model, ids, weights, cache, chunk, decode, check_rows: bool, ema_step=None) -> Recorder:
    policy = namm_policy(weights)
    runner = KeepingRunner(adapter_for(model), model, policy,
                           RunnerConfig(chunk_size=chunk, max_new_tokens=decode, cache=cache))
    recorder = Recorder(policy, runner if check_rows else None, chunk)
    patch = contextlib.nullcontext()
    if ema_step is not None:
        patch = mock.patch("namm_transfer.namm.policy.spectral_ema_step", ema_step)
    with patch:
        runner.generate(ids, max_new_tokens=decode)
    return recorder


def compare_kept(a: Recorder, b: Recorder) -> dict:
    """(step, layer) pairs and kept tokens (per KV head) that differ between two runs."""
    pairs = tokens = total = 0
    for key, kept in a.kept.items():
        other = b.kept.get(key)
        total += kept.numel()
        if other is None or other.shape != kept.shape or not torch.equal(other, kept):
            pairs += 1
            if other is None or other.shape != kept.shape:
                tokens += kept.numel()
            else:
                tokens += int((other != kept).sum())
    return {"layer_steps": len(a.kept), "layer_steps_differing": pairs + len(set(b.kept) - set(a.kept)),
            "kept_entries": total, "kept_entries_differing": tokens}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="1024,2048,4096", help="prompt lengths, comma-separated")
    parser.add_argument("--chunk-size", type=int, default=128, help="prefill chunk (the arrival unit of the rows)")
    parser.add_argument("--decode", type=int, default=16, help="tokens generated after each prompt")
    parser.add_argument("--dtype", default="bfloat16", help="model dtype")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON written here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    loaded = load_model("smollm2", dtype=args.dtype)
    weights = load_namm_option(None)
    cache = cache_config_for(weights.config)
    results = []
    for length in (int(x) for x in args.lengths.split(",")):
        ids = make_prompt(loaded.tokenizer, length, seed=0)
        stock = run(loaded.model, ids, weights, cache, args.chunk_size, args.decode, check_rows=True)
        EMA_DIFFERENCE.update(entries=0, not_bit_equal=0, max_relative_diff=0.0)
        ordered = run(loaded.model, ids, weights, cache, args.chunk_size, args.decode, check_rows=False,
                      ema_step=streaming_order_ema_step)
        row = {"length": length, "rows_compared": stock.entries, "rows_not_bit_equal": stock.differing,
               "rows_max_abs_diff": stock.max_abs_diff, "rows_nonzero_after_arrival": stock.nonzero_after_arrival,
               "streaming_order_ema": {**compare_kept(stock, ordered), **EMA_DIFFERENCE}}
        print(json.dumps(row), flush=True)
        results.append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "model": loaded.name, "dtype": args.dtype, "namm": "shipped", "update_every": cache.update_every,
            "attention_numerics": cache.attention_dtype, "chunk_size": args.chunk_size, "decode": args.decode,
            "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()

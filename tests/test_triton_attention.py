"""The attention rows a NAMM step reads (namm_transfer/runtime/attention_rows.py): the torch path against a naive loop
for every numerics ("official" bf16 logits, "bfloat16", "float32"; namm-spec.md §1.2, §7), the query-head mean, and
the fused Triton kernel (namm_transfer/runtime/triton_attention.py) that replaces the torch path on CUDA.

On CPU (no CUDA, usually no triton): the dispatch falls back to torch, the torch path matches a naive loop over
query heads, bad inputs are refused. With triton installed and numpy < 2.4, the kernel also runs in Triton's CPU
interpreter against the torch path. On a CUDA machine with triton the compiled kernel is compared on a realistic
shape (Llama-3-8B heads).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from namm_transfer.runtime import triton_attention
from namm_transfer.runtime.attention_rows import attention_rows, query_head_mean

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available() and HAS_TRITON


def _numpy_scalar_ok() -> bool:
    """Triton's interpreter turns 1-element arrays into ints, which numpy >= 2.4 refuses."""
    return np.lib.NumpyVersion(np.__version__) < "2.4.0"


def make_inputs(batch, q_heads, kv_heads, queries, slots, dim, dtype, device="cpu", seed=0):
    """Random recent queries over a cache that was pruned per head earlier: arrival indices increase along N with
    gaps (evicted tokens), the last ``queries`` slots are the queries' own tokens, some slots and queries are
    padding."""
    gen = torch.Generator().manual_seed(seed)
    old = slots - queries
    first_query = 3 * old + 5
    old_index = torch.stack(
        [torch.randperm(first_query, generator=gen)[:old].sort().values for _ in range(batch * kv_heads)]
    ).view(batch, kv_heads, old)
    query_index = torch.arange(first_query, first_query + queries)
    token_index = torch.cat([old_index, query_index.expand(batch, kv_heads, queries)], dim=-1)
    valid = torch.rand(batch, kv_heads, slots, generator=gen) > 0.15
    valid[..., -queries:] = True
    query_valid = torch.ones(batch, kv_heads, queries, dtype=torch.bool)
    query_valid[0, :, :2] = False  # left padding of row 0: its first queries see nothing
    valid[0, :, slots - queries : slots - queries + 2] = False
    tensors = dict(
        queries=torch.randn(batch, q_heads, queries, dim, generator=gen).to(dtype),
        keys=(2.0 * torch.randn(batch, kv_heads, slots, dim, generator=gen)).to(dtype),
        token_index=token_index,
        valid=valid,
        query_index=query_index,
        query_valid=query_valid,
    )
    return {name: t.to(device) for name, t in tensors.items()}


def naive_recent_attention(queries, keys, token_index, valid, query_index, query_valid, scaling, numerics,
                           window=None):
    """One softmax per (row, query head, query) over the slots it may see, rounded to the numerics' dtype, then the
    mean of each KV head's query heads taken in that dtype (namm-spec.md §1.2: heads h*g .. h*g+g-1 use KV head h).
    "official" logits: the bf16 product of bf16 operands divided by sqrt(D) in bf16, as the official eager code."""
    dtype = torch.float32 if numerics == "float32" else torch.bfloat16
    batch, q_heads, num_queries, _ = queries.shape
    kv_heads, slots = keys.shape[1], keys.shape[2]
    groups = q_heads // kv_heads
    per_head = torch.zeros(batch, q_heads, num_queries, slots)
    for b in range(batch):
        for hq in range(q_heads):
            h = hq // groups
            for i in range(num_queries):
                if not query_valid[b, h, i]:
                    continue
                seen = valid[b, h] & (token_index[b, h] <= query_index[i])
                if window is not None:
                    seen &= token_index[b, h] > query_index[i] - window
                if numerics == "official":
                    product = keys[b, h, seen].bfloat16() @ queries[b, hq, i].bfloat16()
                    logits = (product / (1.0 / scaling)).float()
                else:
                    logits = (keys[b, h, seen].float() @ queries[b, hq, i].float()) * scaling
                per_head[b, hq, i, seen] = torch.softmax(logits, dim=0)
    rounded = per_head.to(dtype).view(batch, kv_heads, groups, num_queries, slots)
    return rounded.mean(dim=2)


@pytest.mark.parametrize(
    "q_heads, kv_heads, numerics, window",
    [(6, 2, "bfloat16", None), (4, 4, "float32", None), (8, 2, "bfloat16", 7), (6, 2, "official", None),
     (8, 2, "official", 7)],
)
def test_torch_path_matches_a_naive_per_head_loop(q_heads, kv_heads, numerics, window):
    inputs = make_inputs(2, q_heads, kv_heads, queries=6, slots=17, dim=8, dtype=torch.float32)
    got = attention_rows(**inputs, scaling=0.3, numerics=numerics, chunk=4, sliding_window=window)
    want = naive_recent_attention(**inputs, scaling=0.3, numerics=numerics, window=window)
    assert got.dtype == want.dtype and got.shape == (2, kv_heads, 6, 17)
    # the torch path's bf16 mean may round the group sum once more than the loop's: one bf16 ulp at most
    torch.testing.assert_close(got.float(), want.float(), atol=1e-6 if numerics == "float32" else 4e-3, rtol=0)
    assert (got[0, :, :2] == 0).all()  # padding queries
    assert (got[~inputs["valid"][:, :, None, :].expand_as(got)] == 0).all()  # padding slots


def test_official_numerics_differ_from_fp32_logits():
    """bf16 logits (the official eager attention) move attention values against fp32 logits: the option matters."""
    inputs = make_inputs(1, 8, 2, queries=32, slots=120, dim=64, dtype=torch.float32, seed=5)
    official = attention_rows(**inputs, scaling=64**-0.5, numerics="official", chunk=16).float()
    bf16 = attention_rows(**inputs, scaling=64**-0.5, numerics="bfloat16", chunk=16).float()
    assert (official != bf16).float().mean() > 0.05
    torch.testing.assert_close(official.sum(-1), bf16.sum(-1), atol=3e-2, rtol=0)


def test_query_head_mean_groups_consecutive_heads_and_averages_in_the_numerics_dtype():
    # 4 query heads -> 2 KV heads: heads 0,1 -> KV 0 and heads 2,3 -> KV 1.
    values = torch.tensor([1.0, 3.0, 10.0, 30.0]).view(1, 4, 1, 1).expand(1, 4, 2, 3)
    out = query_head_mean(values, 2, "float32")
    assert out.shape == (1, 2, 2, 3)
    assert torch.equal(out[0, :, 0, 0], torch.tensor([2.0, 20.0]))
    # Rounded to bf16 first: 1 + 2^-10 is not representable in bf16 and rounds to 1, so the bf16 mean of
    # (1 + 2^-10, 1 + 2^-10) is exactly 1 while the fp32 mean is not.
    close = torch.full((1, 2, 1, 1), 1.0 + 2.0**-10)
    for numerics in ("bfloat16", "official"):
        assert query_head_mean(close, 1, numerics).dtype == torch.bfloat16
        assert query_head_mean(close, 1, numerics).item() == 1.0
    assert query_head_mean(close, 1, "float32").item() == 1.0 + 2.0**-10
    with pytest.raises(ValueError, match="does not divide"):
        query_head_mean(torch.zeros(1, 6, 2, 2), 4, "float32")
    with pytest.raises(ValueError, match="numerics"):
        query_head_mean(close, 1, "float16")


def test_cpu_tensors_take_the_torch_path_even_when_the_kernel_is_available(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the fused kernel must not run on CPU tensors")

    monkeypatch.setattr(triton_attention, "available", lambda: True)
    monkeypatch.setattr(triton_attention, "fused_recent_attention", refuse)
    inputs = make_inputs(1, 4, 2, queries=4, slots=9, dim=8, dtype=torch.float32)
    assert not triton_attention.use_fused(inputs["queries"])
    got = attention_rows(**inputs, scaling=0.5, numerics="float32", chunk=2)
    torch.testing.assert_close(got, naive_recent_attention(**inputs, scaling=0.5, numerics="float32"), atol=1e-6,
                               rtol=0)


def test_unavailable_without_triton_or_when_switched_off(monkeypatch):
    monkeypatch.setenv(triton_attention.ENV_SWITCH, "0")
    assert not triton_attention.available()
    monkeypatch.delenv(triton_attention.ENV_SWITCH)
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    monkeypatch.setattr(triton_attention, "triton", None)
    monkeypatch.setattr(triton_attention, "tl", None)
    assert not triton_attention.available()
    inputs = make_inputs(1, 4, 2, queries=4, slots=9, dim=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="needs triton"):
        triton_attention.fused_recent_attention(**inputs, scaling=0.5, numerics="bfloat16")


def test_bad_inputs_are_refused_before_any_kernel_runs():
    inputs = make_inputs(1, 4, 2, queries=4, slots=9, dim=8, dtype=torch.float32)
    call = triton_attention.fused_recent_attention
    with pytest.raises(ValueError, match="numerics"):
        call(**inputs, scaling=0.5, numerics="float16")
    with pytest.raises(ValueError, match="out_dtype"):
        call(**inputs, scaling=0.5, numerics="bfloat16", out_dtype=torch.int32)
    with pytest.raises(ValueError, match="sliding_window"):
        call(**inputs, scaling=0.5, numerics="bfloat16", sliding_window=0)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        call(**{**inputs, "queries": inputs["queries"][:, :3]}, scaling=0.5, numerics="bfloat16")
    with pytest.raises(ValueError, match="share a float dtype"):
        call(**{**inputs, "keys": inputs["keys"].double()}, scaling=0.5, numerics="bfloat16")
    with pytest.raises(ValueError, match="token_index"):
        call(**{**inputs, "valid": inputs["valid"][..., 1:]}, scaling=0.5, numerics="bfloat16")
    with pytest.raises(ValueError, match="query_valid"):
        call(**{**inputs, "query_valid": inputs["query_valid"][:, :1]}, scaling=0.5, numerics="bfloat16")


INTERPRETER_CASES = [  # q_heads, kv_heads, input dtype, numerics, window
    (6, 2, "bfloat16", "bfloat16", None),  # G = 3: padded group rows
    (4, 1, "float32", "float32", None),
    (8, 2, "bfloat16", "bfloat16", 9),
    (6, 2, "bfloat16", "official", None),
    (4, 2, "float32", "official", 9),
]

_INTERPRETER_CHILD = """
import runpy, sys, torch
from namm_transfer.runtime import triton_attention
from namm_transfer.runtime.attention_rows import attention_rows
helpers = runpy.run_path(sys.argv[1])
results = []
for q_heads, kv_heads, dtype, numerics, window in helpers["INTERPRETER_CASES"]:
    inputs = helpers["make_inputs"](2, q_heads, kv_heads, queries=20, slots=90, dim=32, dtype=getattr(torch, dtype))
    options = dict(scaling=32**-0.5, numerics=numerics, sliding_window=window)
    results.append(dict(
        want=attention_rows(**inputs, chunk=8, **options).float(),
        got=triton_attention.fused_recent_attention(**inputs, **options),
        as_bf16=triton_attention.fused_recent_attention(**inputs, out_dtype=torch.bfloat16, **options),
    ))
torch.save(results, sys.argv[2])
"""


@pytest.mark.skipif(not (HAS_TRITON and _numpy_scalar_ok()), reason="needs triton and numpy < 2.4 (interpreter)")
def test_kernel_in_the_triton_interpreter_matches_the_torch_path(tmp_path):
    """Runs in a child process: TRITON_INTERPRET must be set before triton (and its jitted standard library) is
    imported, and transformers may import triton early."""
    out = tmp_path / "results.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    child = subprocess.run([sys.executable, "-c", _INTERPRETER_CHILD, __file__, str(out)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    for (_, _, _, numerics, _), result in zip(INTERPRETER_CASES, torch.load(out)):
        got, want = result["got"], result["want"]
        assert got.shape == want.shape and got.dtype == torch.float32
        exact = numerics != "float32"  # fp32 sums may differ in their last bit, bf16 values rarely
        torch.testing.assert_close(got, want, atol=4e-3 if exact else 1e-6, rtol=0)
        assert (got[want == 0] == 0).all()
        if exact:
            assert (got != want).float().mean() < 1e-3
            assert result["as_bf16"].dtype == torch.bfloat16 and torch.equal(result["as_bf16"].float(), got)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("window", [None, 1000])
def test_compiled_kernel_matches_the_torch_path_on_llama_8b_heads(monkeypatch, window):
    inputs = make_inputs(1, 32, 8, queries=512, slots=2048 + 512, dim=128, dtype=torch.bfloat16, device="cuda")
    scaling = 128**-0.5
    got = triton_attention.fused_recent_attention(**inputs, scaling=scaling, numerics="bfloat16",
                                                  sliding_window=window)
    assert triton_attention.use_fused(inputs["queries"])
    monkeypatch.setenv(triton_attention.ENV_SWITCH, "0")  # the torch path, same device
    want = attention_rows(**inputs, scaling=scaling, numerics="bfloat16", chunk=128,
                          sliding_window=window).float()
    torch.testing.assert_close(got, want, atol=4e-3, rtol=0)
    assert (got != want).float().mean() < 1e-3
    assert (got[want == 0] == 0).all()
    torch.testing.assert_close(got.sum(-1)[inputs["query_valid"]], torch.ones_like(got.sum(-1)[inputs["query_valid"]]),
                               atol=0.05, rtol=0)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and triton")
def test_compiled_kernel_handles_gqa_groups_of_three_and_fp32_inputs(monkeypatch):
    bf16 = make_inputs(2, 9, 3, queries=64, slots=300, dim=64, dtype=torch.bfloat16, device="cuda", seed=3)
    fp32 = make_inputs(1, 4, 2, queries=32, slots=100, dim=64, dtype=torch.float32, device="cuda", seed=4)
    got = [triton_attention.fused_recent_attention(**bf16, scaling=0.125, numerics="bfloat16"),
           triton_attention.fused_recent_attention(**fp32, scaling=0.125, numerics="float32")]
    monkeypatch.setenv(triton_attention.ENV_SWITCH, "0")
    want = [attention_rows(**bf16, scaling=0.125, numerics="bfloat16", chunk=16).float(),
            attention_rows(**fp32, scaling=0.125, numerics="float32", chunk=16)]
    torch.testing.assert_close(got[0], want[0], atol=4e-3, rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=0)

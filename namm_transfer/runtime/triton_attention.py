"""A fused Triton kernel for the attention rows a NAMM step reads (namm-spec.md §1.2, §7; ARCHITECTURE.md, "The
data flow of one NAMM step", step 3).

At a policy step the runtime recomputes, for the Q buffered recent queries of a layer, the post-softmax attention
over the layer's N cached slots, rounds it to bf16 per query head and averages the G = Hq / H query heads of each KV
head. The torch path of :func:`namm_transfer.runtime.attention_rows.attention_rows` does this in query blocks, which
materialises (B, Hq, chunk, N) fp32 logits several times over (matmul, mask, softmax, rounding, mean). This kernel
produces the same (B, H, Q, N) result in one launch and writes it once:

* one program per (block of ``BLOCK_Q`` queries, batch row, KV head) holds the G query heads of its queries as one
  (G' * BLOCK_Q, D) tile (G' = G rounded up to a power of two; the extra rows are masked), so every key tile is
  loaded once for the whole group and multiplied on tensor cores;
* pass 1 walks the N slots in tiles of ``BLOCK_N`` and keeps an online running max and sum of exp per query row
  (the logsumexp), in fp32;
* pass 2 recomputes the logits tile by tile, normalises them with that max and sum, rounds each query head's
  probability to bf16 (unless the numerics are "float32"), sums the G heads in fp32, scales by 1 / G, rounds the
  mean likewise and stores the (BLOCK_Q, BLOCK_N) tile.

Under the "official" numerics (:data:`namm_transfer.namm.interface.NUMERICS`) the operands are bf16 and each
logit is rounded to bf16 after the product and again after the division by ``sqrt(D)``, as the official eager
attention computes them in bf16.

Visibility is the rule of :func:`~namm_transfer.runtime.layer.visibility_mask`: query ``q`` (arrival index) sees
slot ``j`` iff ``valid[j]`` and ``token_index[j] <= q`` (and ``token_index[j] > q - window`` on a sliding-window
layer); padding queries see nothing. The wrapper folds validity into the indices (an invalid slot gets index
INT64_MAX, a padding query index -1), so the kernel compares two int64 values per entry. Masked entries are exactly 0.

Numerics match the torch path up to fp32 rounding order: logits are exact bf16 x bf16 products accumulated in fp32
(``Q K^T * scaling``), the softmax is fp32, the GQA mean of the bf16 values is an fp32 sum times 1 / G rounded to bf16
(what torch's CUDA ``mean`` of a bf16 tensor does). Only probabilities within an fp32 rounding error of a bf16
rounding boundary can differ, by one bf16 ulp.

Triton is imported lazily (:func:`available`): this module imports cleanly on machines without it (CPU). Setting the
environment variable ``NAMM_TRANSFER_TRITON=0`` turns the fused path off. Under ``TRITON_INTERPRET=1`` the kernel runs
on CPU tensors in Triton's interpreter (slow; for tests); there the dot product takes fp32 operands, because the
interpreter mis-multiplies bf16 ones (the products are the same: bf16 x bf16 is exact in fp32).

Shapes: B batch rows, Hq query heads, H KV heads (query head ``h * G + i`` uses KV head ``h``, transformers'
``repeat_kv`` layout), Q recent queries, N cached slots, D head dim.
"""

from __future__ import annotations

import math
import os

import torch

ENV_SWITCH = "NAMM_TRANSFER_TRITON"
"""Environment variable: "0" disables the fused kernel (the torch path runs instead)."""

_INT64_MAX = torch.iinfo(torch.int64).max
_OUTPUT_DTYPES = (torch.float32, torch.bfloat16)
_TARGET_ROWS = 64  # query rows (group heads x queries) per program

triton = None  # the triton modules, bound by _load_triton() on first use
tl = None
_KERNELS: dict[bool, object] = {}  # compiled kernel, keyed by "runs in the interpreter"
_round_bf16 = None  # the jitted _round_bf16_bits, bound by _kernel()


def _load_triton() -> bool:
    """Import triton into this module's globals once; False when it is not installed."""
    global triton, tl
    if triton is None:
        try:
            import triton as triton_module
            import triton.language as language
        except ImportError:
            return False
        triton, tl = triton_module, language
    return True


def available() -> bool:
    """True when the fused kernel can run here: CUDA is present, triton imports and ``NAMM_TRANSFER_TRITON`` is not
    "0"."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    return torch.cuda.is_available() and _load_triton()


def use_fused(queries: torch.Tensor) -> bool:
    """Whether :func:`~namm_transfer.runtime.attention_rows.attention_rows` should hand ``queries`` to this kernel:
    they live on a CUDA device and :func:`available` is true."""
    return queries.is_cuda and available()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _round_bf16_bits(x):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32; on the bits, because the interpreter's cast
    truncates. Jitted as ``_round_bf16`` together with the kernel."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)


def _recent_attention_kernel(
    q_ptr, k_ptr, slot_ptr, qkey_ptr, out_ptr,
    num_kv_heads, num_queries, num_slots, head_dim, scaling, window,
    stride_qb, stride_qh, stride_qq, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_sb, stride_sh, stride_sn,
    stride_ib, stride_ih, stride_iq,
    stride_ob, stride_oh, stride_oq, stride_on,
    GROUPS: tl.constexpr, GROUPS_P2: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_WINDOW: tl.constexpr, ROUND_BF16: tl.constexpr, DOT_FP32: tl.constexpr,
    LOGITS_BF16: tl.constexpr,
):
    """One (query block, batch row, KV head): see the module docstring. Row r of the tile is query head
    ``h * GROUPS + r // BLOCK_Q`` at query ``q0 + r % BLOCK_Q``."""
    ROWS: tl.constexpr = GROUPS_P2 * BLOCK_Q
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    h = (pid_bh % num_kv_heads).to(tl.int64)
    rows = tl.arange(0, ROWS)
    group = rows // BLOCK_Q
    query = pid_q * BLOCK_Q + rows % BLOCK_Q
    row_ok = (group < GROUPS) & (query < num_queries)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim

    q_offsets = (b * stride_qb + (h * GROUPS + group)[:, None] * stride_qh + query[:, None] * stride_qq
                 + dims[None, :] * stride_qd)
    q = tl.load(q_ptr + q_offsets, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    # arrival index of each row's query; -1 (sees nothing) for padding queries and the masked rows
    qkey = tl.load(qkey_ptr + b * stride_ib + h * stride_ih + query * stride_iq, mask=row_ok, other=-1)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    s_base = slot_ptr + b * stride_sb + h * stride_sh

    # phase 0: running max and sum of exp per row (the logsumexp), in fp32; phase 1: recompute the logits, normalise,
    # round per query head, mean over the group, store once. Both phases walk the same tiles.
    row_max = tl.full([ROWS], -3.0e38, tl.float32)
    row_sum = tl.zeros([ROWS], tl.float32)
    out_rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    out_base = out_ptr + b * stride_ob + h * stride_oh + out_rows[:, None] * stride_oq
    for phase in tl.static_range(2):
        for n0 in range(0, num_slots, BLOCK_N):
            slots = n0 + tl.arange(0, BLOCK_N)
            slot_ok = slots < num_slots
            k = tl.load(k_base + slots[:, None] * stride_kn + dims[None, :] * stride_kd,
                        mask=slot_ok[:, None] & dim_ok[None, :], other=0.0)
            # slots past N get INT64_MAX: seen by no query
            skey = tl.load(s_base + slots * stride_sn, mask=slot_ok, other=9223372036854775807)
            visible = skey[None, :] <= qkey[:, None]
            if HAS_WINDOW:
                visible = visible & (skey[None, :] > qkey[:, None] - window)
            if DOT_FP32:
                logits = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                logits = tl.dot(q, tl.trans(k))
            if LOGITS_BF16:  # official eager numerics: bf16(bf16(Q K^T) / sqrt(D))
                logits = _round_bf16(_round_bf16(logits) / (1.0 / scaling))
            else:
                logits = logits * scaling
            logits = tl.where(visible, logits, float("-inf"))
            if phase == 0:
                new_max = tl.maximum(row_max, tl.max(logits, 1))
                row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), 1)
                row_max = new_max
            else:
                probs = tl.where(visible, tl.exp(logits - row_max[:, None]) / row_sum[:, None], 0.0)
                if ROUND_BF16:
                    probs = _round_bf16(probs)
                mean = tl.sum(tl.reshape(probs, (GROUPS_P2, BLOCK_Q, BLOCK_N)), 0) * (1.0 / GROUPS)
                if ROUND_BF16:
                    mean = _round_bf16(mean)
                tl.store(out_base + slots[None, :] * stride_on, mean.to(out_ptr.dtype.element_ty),
                         mask=(out_rows < num_queries)[:, None] & slot_ok[None, :])


def _kernel():
    """The jitted kernel for the current mode (compiled or interpreted), built once per mode with its helper."""
    global _round_bf16
    interpret = _interpreting()
    if interpret not in _KERNELS:
        _round_bf16 = triton.jit(_round_bf16_bits)
        _KERNELS[interpret] = triton.jit(_recent_attention_kernel)
    return _KERNELS[interpret]


def _check_inputs(queries, keys, token_index, valid, query_index, query_valid) -> None:
    """Raise ValueError unless the shapes fit together (see :func:`fused_recent_attention`)."""
    if queries.dim() != 4 or keys.dim() != 4:
        raise ValueError(f"queries and keys must be 4-D, got {tuple(queries.shape)} and {tuple(keys.shape)}")
    batch, num_q_heads, num_queries, head_dim = queries.shape
    kb, num_kv_heads, num_slots, kd = keys.shape
    if kb != batch or kd != head_dim or num_q_heads % num_kv_heads:
        raise ValueError(
            f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} need the same batch and head dim, and "
            f"query heads a multiple of KV heads"
        )
    if queries.dtype != keys.dtype or queries.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"queries and keys must share a float dtype, got {queries.dtype} and {keys.dtype}")
    slots_shape = (batch, num_kv_heads, num_slots)
    if tuple(token_index.shape) != slots_shape or tuple(valid.shape) != slots_shape:
        raise ValueError(
            f"token_index {tuple(token_index.shape)} and valid {tuple(valid.shape)} must be {slots_shape}"
        )
    if tuple(query_index.shape) != (num_queries,) or tuple(query_valid.shape) != (batch, num_kv_heads, num_queries):
        raise ValueError(
            f"query_index {tuple(query_index.shape)} must be ({num_queries},) and query_valid "
            f"{tuple(query_valid.shape)} must be {(batch, num_kv_heads, num_queries)}"
        )


def fused_recent_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    token_index: torch.Tensor,
    valid: torch.Tensor,
    query_index: torch.Tensor,
    query_valid: torch.Tensor,
    scaling: float,
    numerics: str,
    sliding_window: int | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """GQA-averaged post-softmax attention of the recent queries over all cached slots, in one Triton launch.

    Same arguments and result as :func:`namm_transfer.runtime.attention_rows.attention_rows` (without its
    ``chunk``: the kernel tiles by itself).

    Args:
        queries: (B, Hq, Q, D) post-RoPE queries (bf16, fp16 or fp32; same dtype as ``keys``).
        keys: (B, H, N, D) cached keys.
        token_index: (B, H, N) int64 arrival index of each slot.
        valid: (B, H, N) bool slot validity.
        query_index: (Q,) int64 arrival index of each query.
        query_valid: (B, H, Q) bool, False for padding queries (their rows are zero).
        scaling: factor applied to QK^T.
        numerics: "official" (bf16 logits, rounded probabilities, bf16 mean), "bfloat16" (fp32 logits, rounded
            probabilities, bf16 mean) or "float32" (no rounding).
        sliding_window: window of a sliding-window layer, None for full attention.
        out_dtype: dtype of the result, torch.float32 (the bf16-rounded values held exactly) or torch.bfloat16.

    Returns:
        (B, H, Q, N) in ``out_dtype``.
    """
    if numerics not in ("official", "bfloat16", "float32"):
        raise ValueError(f"numerics must be 'official', 'bfloat16' or 'float32', got {numerics!r}")
    if out_dtype not in _OUTPUT_DTYPES:
        raise ValueError(f"out_dtype must be torch.float32 or torch.bfloat16, got {out_dtype}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be None or >= 1, got {sliding_window}")
    _check_inputs(queries, keys, token_index, valid, query_index, query_valid)
    if not _load_triton():
        raise ValueError("fused_recent_attention needs triton, which is not installed; use attention_rows")
    if numerics == "official":  # the official model is bf16: its Q and K are bf16
        queries, keys = queries.bfloat16(), keys.bfloat16()
    batch, num_q_heads, num_queries, head_dim = queries.shape
    num_kv_heads, num_slots = keys.shape[1], keys.shape[2]
    out = torch.empty(batch, num_kv_heads, num_queries, num_slots, dtype=out_dtype, device=keys.device)
    if out.numel() == 0:
        return out
    slot_key = torch.where(valid, token_index.long(), _INT64_MAX).contiguous()
    query_key = torch.where(query_valid, query_index.to(keys.device, torch.long).view(1, 1, -1), -1).contiguous()
    groups = num_q_heads // num_kv_heads
    groups_p2 = triton.next_power_of_2(groups)
    block_q = max(16, _TARGET_ROWS // groups_p2)
    rows = groups_p2 * block_q
    interpret = _interpreting()
    grid = (math.ceil(num_queries / block_q), batch * num_kv_heads)
    options = {} if interpret else {"num_warps": 4 if rows <= 64 else 8, "num_stages": 2}
    _kernel()[grid](
        queries, keys, slot_key, query_key, out,
        num_kv_heads, num_queries, num_slots, head_dim, float(scaling), int(sliding_window or 0),
        *queries.stride(), *keys.stride(), *slot_key.stride(), *query_key.stride(), *out.stride(),
        GROUPS=groups, GROUPS_P2=groups_p2, BLOCK_Q=block_q, BLOCK_N=64,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), HAS_WINDOW=sliding_window is not None,
        ROUND_BF16=numerics != "float32", DOT_FP32=interpret or queries.dtype == torch.float32,
        LOGITS_BF16=numerics == "official",
        **options,
    )
    return out

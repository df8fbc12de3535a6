"""BAM (Backward Attention Memory) scoring network with a population axis (namm-spec §3, §5.5).

One attention head of width h over the tokens of a (layer, KV head), where token i attends only to itself
and newer tokens (j >= i in cache order), a multiplicative + additive residual and a linear read-out:

    [Q|K|V] = X W_qkv + b_qkv;   O = softmax(mask(Q K^T / sqrt(h))) V;   [R|M] = O W_o + b_o
    H = X * (1 + M) + R;         score = H w + b

(Cetin et al., ICLR 2025, §3.2). The weights are a flat vector of ``config.num_params`` (4172) entries in
the layout of namm-spec §3.2 (matrices row-major with the input index outer). A (P, 4172) population is
scored in one batched pass: every batch row picks its member.

Shapes: P = population members, B = batch rows, H = KV heads, N = cached slots, D = feature dim (25),
h = hidden dim (32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from namm_transfer.namm.config import NammConfig

# Extra query/key dims that carry the padding-key bias; 8 keeps the head dim a multiple of 8 so fused
# (memory-efficient / flash) attention kernels stay eligible.
_BIAS_DIMS = 8


@dataclass(frozen=True)
class BamWeights:
    """The named BAM weights of P members (namm-spec §3.1-§3.2).

    Attributes:
        w_qkv: (P, D, 3h) input projection; output columns [0, h) Q, [h, 2h) K, [2h, 3h) V.
        b_qkv: (P, 3h).
        w_o: (P, h, 2D) output projection; columns [0, D) additive R, [D, 2D) multiplicative M.
        b_o: (P, 2D).
        w_out: (P, D) read-out weights.
        b_out: (P,) read-out bias.
    """

    w_qkv: torch.Tensor
    b_qkv: torch.Tensor
    w_o: torch.Tensor
    b_o: torch.Tensor
    w_out: torch.Tensor
    b_out: torch.Tensor


def weight_shapes(config: NammConfig) -> dict[str, tuple[int, ...]]:
    """Per-member shape of every weight, in flat-vector order (namm-spec §3.2)."""
    d, h = config.feature_dim, config.hidden_dim
    return {
        "w_qkv": (d, 3 * h),
        "b_qkv": (3 * h,),
        "w_o": (h, 2 * d),
        "b_o": (2 * d,),
        "w_out": (d,),
        "b_out": (),
    }


def _as_population(params: torch.Tensor, config: NammConfig) -> torch.Tensor:
    """(num_params,) or (P, num_params) -> (P, num_params) fp32."""
    if params.dim() == 1:
        params = params.unsqueeze(0)
    if params.dim() != 2 or params.shape[1] != config.num_params:
        raise ValueError(
            f"params must be ({config.num_params},) or (P, {config.num_params}), got {tuple(params.shape)}"
        )
    return params.float()


def unflatten_params(params: torch.Tensor, config: NammConfig) -> BamWeights:
    """Flat vectors (P, num_params) or (num_params,) -> :class:`BamWeights` (views, P leading)."""
    params = _as_population(params, config)
    named, start = {}, 0
    for name, shape in weight_shapes(config).items():
        size = math.prod(shape)
        named[name] = params[:, start : start + size].reshape(params.shape[0], *shape)
        start += size
    return BamWeights(**named)


def flatten_params(weights: BamWeights) -> torch.Tensor:
    """:class:`BamWeights` -> (P, num_params) flat vectors (inverse of :func:`unflatten_params`)."""
    parts = [getattr(weights, f.name) for f in fields(BamWeights)]
    return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)


def backward_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Single-head attention where slot i sees slots j >= i that are valid (namm-spec §3.1 step 2).

    The backward mask is a causal mask on the reversed sequence, so fused SDPA kernels apply and no N x N
    mask is built. Invalid keys get a logit of the fp32 minimum through an extra query/key dimension
    (query 1, key 0 or the minimum), which leaves the other logits unchanged.

    Args:
        query, key, value: (B, H, N, h) fp32.
        valid: (B, H, N) bool, False for padding slots.

    Returns:
        (B, H, N, h) fp32.
    """
    hidden = query.shape[-1]
    masked = torch.finfo(query.dtype).min
    bias_q = query.new_zeros(*query.shape[:-1], _BIAS_DIMS)
    bias_q[..., 0] = 1.0
    bias_k = key.new_zeros(*key.shape[:-1], _BIAS_DIMS)
    bias_k[..., 0] = torch.where(valid, 0.0, masked)
    q = torch.cat([query, bias_q], dim=-1).flip(2)
    k = torch.cat([key, bias_k], dim=-1).flip(2)
    v = torch.cat([value, value.new_zeros(*value.shape[:-1], _BIAS_DIMS)], dim=-1).flip(2)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(hidden))
    return out.flip(2)[..., :hidden]


def bam_scores(
    features: torch.Tensor,
    params: torch.Tensor,
    member: torch.Tensor,
    config: NammConfig,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Score every cached slot with the BAM of each row's population member (namm-spec §3.1, §5.5).

    Args:
        features: (B, H, N, D) token features (:func:`namm_transfer.namm.features.token_features`).
        params: (P, num_params) or (num_params,) flat parameter vectors (namm-spec §3.2).
        member: (B,) int64, the population row used by each batch row (values in [0, P)).
        valid: (B, H, N) bool or None (all valid); invalid slots are never attended to.

    Returns:
        (B, H, N) fp32 scores. All-zero parameters give exactly 0 everywhere.
    """
    if features.dim() != 4 or features.shape[-1] != config.feature_dim:
        raise ValueError(f"features must be (B, H, N, {config.feature_dim}), got {tuple(features.shape)}")
    batch, heads, slots, dim = features.shape
    if member.shape != (batch,):
        raise ValueError(f"member must be ({batch},), got {tuple(member.shape)}")
    if valid is None:
        valid = torch.ones(batch, heads, slots, dtype=torch.bool, device=features.device)
    elif valid.shape != features.shape[:-1]:
        raise ValueError(f"valid {tuple(valid.shape)} does not match features {tuple(features.shape)}")
    params = _as_population(params, config).to(features.device)
    w = unflatten_params(params[member.to(features.device)], config)
    hidden = config.hidden_dim
    x = features.float()
    flat = x.reshape(batch, heads * slots, dim)
    qkv = torch.baddbmm(w.b_qkv.unsqueeze(1), flat, w.w_qkv).view(batch, heads, slots, 3 * hidden)
    query, key, value = qkv.split(hidden, dim=-1)
    attended = backward_attention(query, key, value, valid)
    z = torch.baddbmm(w.b_o.unsqueeze(1), attended.reshape(batch, heads * slots, hidden), w.w_o)
    additive, multiplicative = z.view(batch, heads, slots, 2 * dim).split(dim, dim=-1)
    mixed = x * (1.0 + multiplicative) + additive
    return torch.einsum("bhnd,bd->bhn", mixed, w.w_out) + w.b_out[:, None, None]

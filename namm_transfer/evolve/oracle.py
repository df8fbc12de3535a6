"""An oracle of future attention: which cached tokens the later queries, the answer's included, will attend to.

Issue 8's warm start fits the NAMM's scorer to it. At a policy step that ends at token count t, token j < t is worth
keeping when the queries still to come read it. With the full cache the model's attention over the whole sequence
(prompt followed by the reference answer, teacher-forced) is known, so for every managed layer and KV head

    future(j) = mean over later prompt queries q in [t, L-1) of A[q, j]
              + answer_weight x mean over answer queries q in [L-1, L+T-1) of A[q, j]

where A is the post-softmax attention averaged over the query heads of each KV head (GQA, as the NAMM reads it;
namm-spec §1.2), L the prompt length and T the answer length (query L-1 predicts the first answer token). Each
group is a mean over its queries, so the answer's few queries weigh as much as the rest of the prompt. The oracle
keeps the smallest set of tokens that holds a share (``coverage``) of the future mass (a top-p set, so layers
whose attention is diffuse keep more than layers that read a few tokens); the share is part of the warm start's
:class:`~namm_transfer.evolve.keep_target.KeepTarget`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class OracleConfig:
    """How the oracle weighs the queries still to come.

    Attributes:
        answer_weight: weight of the answer's queries relative to the later prompt queries (>= 0).
    """

    answer_weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.answer_weight >= 0.0:
            raise ValueError(f"invalid OracleConfig: answer_weight must be >= 0, got {self.answer_weight}")


@torch.no_grad()
def future_attention(
    model: nn.Module,
    sequence: torch.Tensor,
    prompt_length: int,
    step_ends: list[int],
    layers: list[int],
    answer_weight: float,
) -> dict[tuple[int, int], torch.Tensor]:
    """Future attention mass of every token at every step, from one eager full-cache forward of ``sequence``.

    Args:
        model: a Hugging Face causal LM (switched to eager attention for this forward, then switched back).
        sequence: (1, S) int64, prompt (L tokens) followed by the answer.
        prompt_length: L.
        step_ends: token counts t at which policy steps end (each < S).
        layers: the managed layers.
        answer_weight: see :class:`OracleConfig`.

    Returns:
        ``{(layer, t): (H_kv, t) fp32 future mass of tokens 0 .. t-1}``.
    """
    if sequence.dim() != 2 or sequence.shape[0] != 1:
        raise ValueError(f"sequence must be (1, S), got {tuple(sequence.shape)}")
    total = sequence.shape[1]
    if not 1 <= prompt_length < total:
        raise ValueError(f"prompt_length must be in [1, {total}), got {prompt_length}")
    if any(not 0 < t < total for t in step_ends):
        raise ValueError(f"step ends must lie in (0, {total}), got {step_ends}")
    kv_heads = model.config.num_key_value_heads
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        attentions = model(sequence, output_attentions=True, use_cache=False).attentions
    finally:
        model.set_attn_implementation(previous)
    answer_start = prompt_length - 1
    masses = {}
    for layer in layers:
        weights = attentions[layer][0].float()  # (heads, S, S)
        grouped = weights.view(kv_heads, -1, total, total).mean(dim=1)  # (H_kv, S, S)
        answer = grouped[:, answer_start:total - 1].mean(dim=1)  # (H_kv, S)
        for t in step_ends:
            later = grouped[:, t:answer_start]
            prompt_part = later.mean(dim=1) if later.shape[1] else torch.zeros_like(answer)
            masses[(layer, t)] = (prompt_part + answer_weight * answer)[:, :t].contiguous()
    return masses


def oracle_keep(mass: torch.Tensor, coverage: float) -> torch.Tensor:
    """The smallest set of tokens per head holding ``coverage`` of the mass.

    Args:
        mass: (..., N) non-negative future attention.
        coverage: share in (0, 1].

    Returns:
        (..., N) bool: True for kept tokens (at least one per head).
    """
    ordered, order = mass.sort(dim=-1, descending=True)
    total = ordered.sum(dim=-1, keepdim=True)
    before = ordered.cumsum(dim=-1) - ordered  # mass of the tokens ranked above
    chosen = before < coverage * total
    chosen[..., 0] = True
    return torch.zeros_like(chosen).scatter(-1, order, chosen)

"""The NAMM eviction policy: per-sequence, per-layer state machine (namm-spec §1.4, §2-§4).

At every step of a managed layer the policy turns the attention of the ``n_new`` recent queries into
features (carrying each token's spectrogram EMA and attention tail from the previous step), scores the
cached slots with the BAM of each batch row's population member and keeps the slots selected by the
threshold rule with count alignment; its per-token state is then gathered with the kept indices
(pitfall 6).

In statistics mode (generation 0 of evolution, §5.6) the policy keeps every slot and feeds the
unnormalised spectrogram EMA of all valid slots to a :class:`StatsAccumulator` instead of scoring.

Carried state is stored narrow: the attention tail in the dtype of the attention numerics (bf16 values are
exact in bf16) and the EMA in :data:`EMA_STATE_DTYPE`; both are read back in fp32.

Shapes: B = batch rows, H = KV heads, N = cached slots, P = population members.
"""

from __future__ import annotations

import math

import torch

from namm_transfer.namm.config import NammConfig
from namm_transfer.namm.features import (
    NormalisationStats,
    SpectralState,
    StatsAccumulator,
    spectral_ema_step,
    token_features,
)
from namm_transfer.namm.interface import KeepDecision, LayerView, StepRequirements
from namm_transfer.namm.scorer import bam_scores
from namm_transfer.namm.selection import protected_slots, select_tokens


EMA_STATE_DTYPE = torch.bfloat16
"""dtype of the spectrogram EMA carried between steps."""


class NammPolicy:
    """A NAMM implementing :class:`~namm_transfer.namm.interface.EvictionPolicy` (name ``"namm"``).

    Args:
        config: feature, scorer and selection settings.
        params: (num_params,) or (P, num_params) flat BAM parameters (namm-spec §3.2); scoring mode.
        stats: frozen normalisation statistics of the spectrogram features (§2.4); scoring mode.
        accumulator: statistics mode instead of ``params``/``stats``: keep every slot and accumulate
            feature statistics (§5.6).
        keep_bias: a finite constant added to every score before the threshold selection (the memory knob):
            positive keeps more slots, negative fewer; 0 is the trained NAMM's own decisions. Scoring mode only.
    """

    name = "namm"

    def __init__(
        self,
        config: NammConfig,
        params: torch.Tensor | None = None,
        stats: NormalisationStats | None = None,
        accumulator: StatsAccumulator | None = None,
        keep_bias: float = 0.0,
    ) -> None:
        self.config = config
        if not math.isfinite(keep_bias):
            raise ValueError(f"keep_bias must be a finite number, got {keep_bias}")
        if accumulator is None:
            if params is None or stats is None:
                raise ValueError("NammPolicy needs params and stats, or an accumulator (statistics mode)")
            if params.dim() == 1:
                params = params.unsqueeze(0)
            if params.dim() != 2 or params.shape[1] != config.num_params:
                raise ValueError(
                    f"params must be ({config.num_params},) or (P, {config.num_params}), "
                    f"got {tuple(params.shape)}"
                )
            if not torch.isfinite(params).all():
                raise ValueError("params contain non-finite values")
            if stats.mean.shape != (config.spectrogram_bins,):
                raise ValueError(
                    f"stats must have {config.spectrogram_bins} features, got {tuple(stats.mean.shape)}"
                )
            params = params.float()
        else:
            if params is not None or stats is not None or keep_bias != 0.0:
                raise ValueError("statistics mode (accumulator) takes no params, stats or keep_bias")
            if accumulator.num_features != config.spectrogram_bins:
                raise ValueError(
                    f"accumulator must have {config.spectrogram_bins} features, got {accumulator.num_features}"
                )
        self.params = params
        self.stats = stats
        self.accumulator = accumulator
        self.keep_bias = float(keep_bias)
        self.requirements = StepRequirements(
            update_every=config.update_every, reads_attention=True, attention_numerics=config.attention_dtype
        )
        self._tail_dtype = torch.float32 if config.attention_dtype == "float32" else torch.bfloat16
        self._member: torch.Tensor | None = None
        self._states: list[SpectralState | None] | None = None
        self._batch_size = 0

    @property
    def population_size(self) -> int:
        """P, the number of parameter vectors (0 in statistics mode)."""
        return 0 if self.params is None else self.params.shape[0]

    def set_members(self, member: torch.Tensor) -> None:
        """Use population row ``member[b]`` for batch row b; member is (B,) int64 in [0, P)."""
        if self.params is None:
            raise ValueError("set_members needs params: this policy is in statistics mode")
        if member.dim() != 1 or member.dtype != torch.int64:
            raise ValueError(f"member must be a 1-D int64 tensor, got {member.dtype} {tuple(member.shape)}")
        if member.numel() and not (0 <= int(member.min()) and int(member.max()) < self.population_size):
            raise ValueError(f"member values must lie in [0, {self.population_size})")
        self._member = member

    def layer_state(self, layer: int) -> SpectralState | None:
        """The per-token state of ``layer`` after its last step ((B, H, K, S) EMA, (B, H, K, T) tail)."""
        if self._states is None:
            raise ValueError("NammPolicy.layer_state called before begin()")
        return self._states[layer]

    def state_bytes(self) -> int:
        """Exact bytes of the per-token state carried for every layer now."""
        return sum(state.nbytes for state in self._states or () if state is not None)

    def begin(self, batch_size: int, num_layers: int) -> None:
        """Start a new batch of sequences: drop every layer's state."""
        if batch_size < 1 or num_layers < 1:
            raise ValueError(f"batch_size and num_layers must be >= 1, got {batch_size} and {num_layers}")
        self._batch_size = batch_size
        self._states = [None] * num_layers

    def step(self, view: LayerView) -> KeepDecision:
        """Features, scores and selection for one layer: :meth:`step_layers` with one view."""
        return self.step_layers([view])[0]

    def step_layers(self, views: list[LayerView]) -> list[KeepDecision]:
        """Features, scores and selection for several layers at once; gathers each layer's state with its kept
        indices.

        The layers are stacked along the batch axis, each left-padded with invalid slots to the longest layer's
        N, so the spectrogram, features and BAM run once for all of them (one set of kernel launches instead of
        one per layer). A layer's padding lies before all its slots: the backward-masked BAM of a real slot only
        sees newer slots, and selection runs per layer on the layer's own slots, so every layer keeps exactly
        what :meth:`step` keeps for it alone.

        ``view.attention()`` is (B, H, n_new, N) GQA-averaged attention (any float dtype, used in fp32); every
        view has the same n_new. State is reset at a sequence's first step (``view.step == 0``) or when the
        layer has none; old slots are the first N - n_new and must match the state kept by the previous step.
        """
        if self._states is None:
            raise ValueError("NammPolicy.step called before begin()")
        if len({view.n_new for view in views}) != 1 or len({view.layer for view in views}) != len(views):
            raise ValueError("step_layers needs distinct layers with the same n_new")
        attentions, previous = [], []
        for view in views:
            attentions.append(self._checked_attention(view))
            state = None if view.step == 0 else self._states[view.layer]
            old = (view.batch_size, view.num_heads, view.num_slots - view.n_new)
            previous.append(state if state is not None else SpectralState(
                ema=attentions[-1].new_zeros(*old, self.config.spectrogram_bins, dtype=torch.float32),
                tail=attentions[-1].new_zeros(*old, self.config.n_fft - self.config.hop, dtype=torch.float32),
            ))
        width = max(view.num_slots for view in views)
        pads = [width - view.num_slots for view in views]

        def stacked(parts: list[torch.Tensor]) -> torch.Tensor:  # (L * B, H, width, ...)
            return torch.cat([_left_pad(t, pad) for t, pad in zip(parts, pads)], dim=0)

        prior = SpectralState(ema=stacked([p.ema.float() for p in previous]),
                              tail=stacked([p.tail.float() for p in previous]))
        attention = stacked([a.float().transpose(-1, -2) for a in attentions]).transpose(-1, -2)  # slots last
        state = spectral_ema_step(attention, prior, self.config)
        rows = [slice(i * self._batch_size, (i + 1) * self._batch_size) for i in range(len(views))]
        own = [SpectralState(ema=state.ema[r, :, pad:], tail=state.tail[r, :, pad:]) for r, pad in zip(rows, pads)]

        if self.accumulator is not None:
            decisions = []
            for view, layer_state in zip(views, own):
                self.accumulator.update(layer_state.ema, view.attendable)
                indices = torch.arange(view.num_slots, device=state.ema.device).expand_as(view.attendable)
                decisions.append(KeepDecision(indices=indices))
        else:
            valid = stacked([view.attendable for view in views])
            token_index = stacked([view.arrival for view in views])
            features = token_features(state, token_index, self.stats, self.config)
            member = self._member
            if member is None:
                member = torch.zeros(self._batch_size, dtype=torch.int64)
            elif member.shape != (self._batch_size,):
                raise ValueError(f"set_members gave {member.shape[0]} rows, the view has {self._batch_size}")
            scores = bam_scores(features, self.params, member.repeat(len(views)), self.config, valid)
            if self.keep_bias:
                scores = scores + self.keep_bias
            lengths = [view.prompt_length for view in views]
            protected = protected_slots(
                token_index, valid, None if lengths[0] is None else torch.cat(lengths),
                self.config.protect_sink, self.config.protect_prompt_tail,
            )
            decisions = [
                select_tokens(scores[r, :, pad:], view.attendable, self.config.threshold,
                              None if protected is None else protected[r, :, pad:], self.config.cache_cap)
                for view, r, pad in zip(views, rows, pads)
            ]
        for view, layer_state, decision in zip(views, own, decisions):
            self._states[view.layer] = layer_state.gather(decision.indices, EMA_STATE_DTYPE, self._tail_dtype)
        return decisions

    def _checked_attention(self, view: LayerView) -> torch.Tensor:
        """``view.attention()`` after checking the view against ``begin`` ((B, H, n_new, N))."""
        if not 0 <= view.layer < len(self._states):
            raise ValueError(f"layer {view.layer} is outside the {len(self._states)} layers given to begin()")
        batch, heads, slots = view.batch_size, view.num_heads, view.num_slots
        if batch != self._batch_size:
            raise ValueError(f"view has {batch} batch rows, begin() was given {self._batch_size}")
        attention = view.attention()
        if tuple(attention.shape) != (batch, heads, view.n_new, slots):
            raise ValueError(
                f"attention must be (B, H, n_new, N) = {(batch, heads, view.n_new, slots)}, "
                f"got {tuple(attention.shape)}"
            )
        return attention


def _left_pad(tensor: torch.Tensor, pad: int) -> torch.Tensor:
    """``tensor`` (B, H, N, ...) with ``pad`` zero (False) slots before its first slot along dim 2."""
    if pad == 0:
        return tensor
    return torch.cat([tensor.new_zeros(*tensor.shape[:2], pad, *tensor.shape[3:]), tensor], dim=2)

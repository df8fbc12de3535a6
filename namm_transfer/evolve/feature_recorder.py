"""A keep-everything policy that records, at every NAMM step, the raw per-token state the NAMM's features come from.

It runs a :class:`~namm_transfer.namm.policy.NammPolicy` in statistics mode (which keeps every slot and feeds the
spectrogram EMA to a :class:`~namm_transfer.namm.features.StatsAccumulator`, namm-spec §5.6) and, after each step,
stores the layer's EMA and arrival indices. Once the statistics are frozen, :func:`recorded_features` turns a
record into exactly the features the NAMM would score at that step with no eviction so far (the EMA is the policy's
carried state, rounded to its storage dtype, :data:`~namm_transfer.namm.policy.EMA_STATE_DTYPE`). One forward pass
thus gives both the normalisation statistics and the warm start's inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from namm_transfer.namm.config import NammConfig
from namm_transfer.namm.features import NormalisationStats, SpectralState, StatsAccumulator, token_features
from namm_transfer.namm.interface import KeepDecision, LayerView
from namm_transfer.namm.policy import NammPolicy


@dataclass
class StepRecord:
    """The state of one layer after one step of one sequence (batch row 0).

    Attributes:
        layer: layer index.
        tokens_seen: t, the token count at which the step ended (slots hold tokens 0 .. t-1).
        ema: (H, N) x S fp32 spectrogram EMA of every slot, unnormalised.
        arrival: (H, N) int64 arrival indices.
        attendable: (H, N) bool.
    """

    layer: int
    tokens_seen: int
    ema: torch.Tensor
    arrival: torch.Tensor
    attendable: torch.Tensor


class FeatureRecorder:
    """:class:`~namm_transfer.namm.interface.EvictionPolicy` that keeps everything and records every step.

    Args:
        config: the NAMM's feature settings (period, STFT, numerics).
    """

    name = "feature_recorder"

    def __init__(self, config: NammConfig) -> None:
        self.accumulator = StatsAccumulator(config.spectrogram_bins)
        self._policy = NammPolicy(config, accumulator=self.accumulator)
        self.requirements = self._policy.requirements
        self.records: list[StepRecord] = []

    def begin(self, batch_size: int, num_layers: int) -> None:
        if batch_size != 1:
            raise ValueError(f"FeatureRecorder records one sequence at a time, got {batch_size} rows")
        self._policy.begin(batch_size, num_layers)

    def step(self, view: LayerView) -> KeepDecision:
        decision = self._policy.step(view)
        state = self._policy.layer_state(view.layer)
        self.records.append(StepRecord(
            layer=view.layer, tokens_seen=int(view.arrival[0].max()) + 1, ema=state.ema[0].float(),
            arrival=view.arrival[0].long(), attendable=view.attendable[0].clone(),
        ))
        return decision


def recorded_features(record: StepRecord, stats: NormalisationStats, config: NammConfig) -> torch.Tensor:
    """(H, N, D) the NAMM's token features of ``record`` (namm-spec §2.6) under frozen ``stats``."""
    state = SpectralState(ema=record.ema[None], tail=record.ema.new_zeros(1, *record.ema.shape[:2], 0))
    return token_features(state, record.arrival[None], stats, config)[0]

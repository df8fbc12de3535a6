"""NAMM token features: attention spectrogram, per-token EMA state, recency embedding, normalisation.

Implements namm-spec.md §2 (Cetin et al., "An Evolved Universal Transformer Memory", ICLR 2025, §3.1):
for every cached token j of a (layer, KV head), the attention the ``n_new`` recent queries paid to it is a
time series; its STFT magnitude spectrogram is reduced over time by a per-token EMA carried across NAMM
steps, z-normalised with frozen global statistics and joined with a sinusoidal embedding of the token's age.

Shapes: B = batch rows, H = KV heads, Q = n_new recent queries, N = cached slots (old slots first, then the
n_new new ones), S = n_fft // 2 + 1 spectrogram bins (17), T = n_fft - hop tail samples (16),
F = n_new // hop frames (32 for n_new 512).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from namm_transfer.namm.config import NammConfig


def spectrogram(series: torch.Tensor, config: NammConfig) -> torch.Tensor:
    """STFT magnitudes of attention time series (namm-spec §2.2).

    Periodic Hann window of length n_fft, hop ``config.hop``, no centring or padding, one-sided,
    unnormalised, magnitudes; computed in fp32. Frame f covers samples ``[f*hop, f*hop + n_fft)``.

    Args:
        series: (..., L) samples, L >= n_fft and (L - n_fft) a multiple of hop.

    Returns:
        (..., F, S) fp32 magnitudes with F = (L - n_fft) // hop + 1 and S = n_fft // 2 + 1.
    """
    length = series.shape[-1]
    if length < config.n_fft or (length - config.n_fft) % config.hop:
        raise ValueError(
            f"series length {length} must be n_fft ({config.n_fft}) plus a multiple of hop ({config.hop})"
        )
    window = torch.hann_window(config.n_fft, periodic=True, dtype=torch.float32, device=series.device)
    frames = series.float().unfold(-1, config.n_fft, config.hop) * window
    return torch.fft.rfft(frames, dim=-1).abs()


def ema_frame_weights(num_frames: int, config: NammConfig) -> torch.Tensor:
    """Per-frame EMA weights ``(1 - gamma^hop) * gamma^(hop * (F-1-f))`` (namm-spec §2.3), (F,) float64.

    These are the weights of a per-token EMA with coefficient gamma sampled every ``hop`` tokens; they are
    not renormalised (they sum to 1 - gamma^(hop*F)).
    """
    gamma_hop = config.ema_coeff**config.hop
    powers = torch.arange(num_frames - 1, -1, -1, dtype=torch.float64)
    return (1.0 - gamma_hop) * gamma_hop**powers


@dataclass
class SpectralState:
    """Per-token state a NAMM carries across steps for one layer (namm-spec §2.1, §2.3, pitfall 6).

    Attributes:
        ema: (B, H, N, S) EMA of the spectrogram frames, E_j (fp32 when computed, possibly narrower when carried).
        tail: (B, H, N, T) attention of the last T = n_fft - hop samples of each token's series; it is
            prepended to the token's series at the next step.
    """

    ema: torch.Tensor
    tail: torch.Tensor

    def gather(self, indices: torch.Tensor, ema_dtype: torch.dtype, tail_dtype: torch.dtype) -> "SpectralState":
        """Keep the slots ``indices`` ((B, H, K) int64, ascending) of every (row, head), stored in the given dtypes
        (the state a NAMM carries between steps; :func:`spectral_ema_step` reads it in fp32)."""
        return SpectralState(
            ema=self.ema.gather(2, indices.unsqueeze(-1).expand(-1, -1, -1, self.ema.shape[-1])).to(ema_dtype),
            tail=self.tail.gather(2, indices.unsqueeze(-1).expand(-1, -1, -1, self.tail.shape[-1])).to(tail_dtype),
        )

    @property
    def nbytes(self) -> int:
        """Exact bytes held by the two tensors."""
        return sum(t.numel() * t.element_size() for t in (self.ema, self.tail))


def spectral_ema_step(
    attention: torch.Tensor, previous: SpectralState | None, config: NammConfig
) -> SpectralState:
    """One NAMM step of the spectrogram EMA for every cached token (namm-spec §2.1-§2.3).

    Old slots (the first N - n_new) get their previous tail prepended and
    ``E <- gamma^n_new * E_prev + sum_f wt_f X_f``. New slots get a zero tail, no prior state and the causal
    frame mask ``f >= floor(t / hop)`` (t = index among the new slots). With ``previous`` None (first step
    of a sequence) every old slot has zero tail and zero state.

    Args:
        attention: (B, H, Q, N) attention of the Q = n_new recent queries (GQA-averaged); any float dtype,
            processed in fp32. n_new must be a multiple of hop.
        previous: state of the N - n_new old slots, ((B, H, N - n_new, S), (B, H, N - n_new, T)), or None.

    Returns:
        The state of all N slots after this step.
    """
    if attention.dim() != 4:
        raise ValueError(f"attention must be (B, H, n_new, N), got shape {tuple(attention.shape)}")
    batch, heads, n_new, slots = attention.shape
    if n_new < 1 or n_new % config.hop:
        raise ValueError(f"n_new ({n_new}) must be a positive multiple of hop ({config.hop})")
    if n_new > slots:
        raise ValueError(f"n_new ({n_new}) exceeds the number of cached slots ({slots})")
    n_old = slots - n_new
    tail_len = config.n_fft - config.hop
    bins = config.spectrogram_bins
    attention = attention.float()
    if previous is None:
        previous = SpectralState(
            ema=attention.new_zeros(batch, heads, n_old, bins),
            tail=attention.new_zeros(batch, heads, n_old, tail_len),
        )
    expected = (batch, heads, n_old)
    if tuple(previous.ema.shape) != expected + (bins,) or tuple(previous.tail.shape) != expected + (tail_len,):
        raise ValueError(
            f"previous state shapes {tuple(previous.ema.shape)}, {tuple(previous.tail.shape)} do not match "
            f"the {n_old} old slots of attention {tuple(attention.shape)}"
        )
    tail = torch.cat([previous.tail.float(), attention.new_zeros(batch, heads, n_new, tail_len)], dim=2)
    series = torch.cat([tail, attention.transpose(-1, -2)], dim=-1)  # (B, H, N, T + n_new)
    frames = spectrogram(series, config)  # (B, H, N, F, S)

    num_frames = n_new // config.hop
    weights = ema_frame_weights(num_frames, config).to(torch.float32)
    first_frame = torch.cat(
        [torch.zeros(n_old, dtype=torch.long), torch.arange(n_new) // config.hop]
    )  # new token t only sees frames f >= floor(t / hop)
    slot_weights = weights * (torch.arange(num_frames) >= first_frame.unsqueeze(1))  # (N, F)
    ema = (slot_weights.to(attention.device).unsqueeze(1) @ frames).squeeze(-2)  # (N,1,F) @ (B,H,N,F,S)
    decay = torch.tensor(config.ema_coeff**n_new, dtype=torch.float32, device=attention.device)
    ema[:, :, :n_old] += decay * previous.ema.float()
    return SpectralState(ema=ema, tail=series[..., -tail_len:].contiguous())


def recency_frequencies(config: NammConfig) -> torch.Tensor:
    """Frequencies ``f_i = recency_max_freq^(-i / (recency_dim / 2))`` (namm-spec §2.5), float64.

    For the defaults: [1, 0.066874, 0.0044721, 0.00029907].
    """
    half = config.recency_dim // 2
    return config.recency_max_freq ** (-torch.arange(half, dtype=torch.float64) / half)


def recency_embedding(recency: torch.Tensor, config: NammConfig) -> torch.Tensor:
    """Sinusoidal age embedding ``[sin(r f_0..), cos(r f_0..)]`` (namm-spec §2.5), sines first.

    Equal to the official lookup table of ``max_recency + 1`` rows, computed directly (in float64, then
    rounded to fp32).

    Args:
        recency: (...) int64 ages r = p_newest - p, 0 <= r <= config.max_recency.

    Returns:
        (..., recency_dim) fp32.
    """
    if recency.numel():
        low, high = (int(v) for v in torch.aminmax(recency))
        if low < 0 or high > config.max_recency:
            raise ValueError(
                f"recency must lie in [0, max_recency={config.max_recency}], got values in [{low}, {high}]"
            )
    angles = recency.to(torch.float64).unsqueeze(-1) * recency_frequencies(config).to(recency.device)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).float()


@dataclass(frozen=True)
class NormalisationStats:
    """Frozen global statistics of the spectrogram EMA features (namm-spec §2.4, pitfall 7).

    Attributes:
        mean: (S,) fp32 mu.
        var: (S,) fp32 population variance sigma^2 (>= 0).
    """

    mean: torch.Tensor
    var: torch.Tensor

    def __post_init__(self) -> None:
        if self.mean.dim() != 1 or self.mean.shape != self.var.shape:
            raise ValueError(
                f"mean and var must be matching 1-D tensors, got {tuple(self.mean.shape)} and "
                f"{tuple(self.var.shape)}"
            )
        if not (torch.isfinite(self.mean).all() and torch.isfinite(self.var).all()):
            raise ValueError("normalisation statistics must be finite")
        if (self.var < 0).any():
            raise ValueError("normalisation variance must be >= 0")

    def normalise(self, ema: torch.Tensor) -> torch.Tensor:
        """``(E - mu) / max(sqrt(var), 1e-7)`` over the last dim: (..., S) -> (..., S) fp32."""
        mean = self.mean.to(device=ema.device, dtype=torch.float32)
        std = self.var.to(device=ema.device, dtype=torch.float32).sqrt().clamp_min(1e-7)
        return (ema.float() - mean) / std


class StatsAccumulator:
    """Masked running mean and population variance, merged with Chan's parallel formula (namm-spec §2.4).

    Used with zero NAMM parameters (no eviction) to estimate :class:`NormalisationStats` at generation 0
    (§5.6). Accumulates in float64. ``to_tensor`` / ``from_tensor`` / ``merge`` let several processes
    gather their accumulators (e.g. ``all_gather`` of ``to_tensor()``) and merge them.
    """

    def __init__(self, num_features: int) -> None:
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        self.count = torch.zeros((), dtype=torch.float64)
        self.mean = torch.zeros(num_features, dtype=torch.float64)
        self.m2 = torch.zeros(num_features, dtype=torch.float64)

    @property
    def num_features(self) -> int:
        return self.mean.shape[0]

    def _merge(self, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Chan et al.'s merge of a (count, mean, M2) batch into this accumulator; no host sync."""
        total = self.count + count
        delta = mean - self.mean
        share = count / total.clamp_min(1.0)
        self.mean = self.mean + delta * share
        self.m2 = self.m2 + m2 + delta.square() * self.count * share
        self.count = total

    def update(self, values: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add the rows of ``values`` (..., num_features) where ``mask`` (...) bool is True (all if None)."""
        if values.shape[-1] != self.num_features:
            raise ValueError(f"values must end in {self.num_features} features, got {tuple(values.shape)}")
        if mask is not None and mask.shape != values.shape[:-1]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match values {tuple(values.shape)}")
        self._to(values.device)
        rows = values.reshape(-1, self.num_features).to(torch.float64)
        weight = (
            torch.ones(rows.shape[0], dtype=torch.float64, device=rows.device)
            if mask is None
            else mask.reshape(-1).to(torch.float64)
        )
        count = weight.sum()
        mean = (rows * weight[:, None]).sum(0) / count.clamp_min(1.0)
        m2 = ((rows - mean).square() * weight[:, None]).sum(0)
        self._merge(count, mean, m2)

    def merge(self, other: "StatsAccumulator") -> None:
        """Fold ``other`` into this accumulator (in place)."""
        if other.num_features != self.num_features:
            raise ValueError(f"cannot merge {other.num_features} features into {self.num_features}")
        self._merge(*(t.to(self.mean.device) for t in (other.count, other.mean, other.m2)))

    def to_tensor(self) -> torch.Tensor:
        """(1 + 2 * num_features,) float64: [count, mean..., M2...]."""
        return torch.cat([self.count.reshape(1), self.mean, self.m2])

    @classmethod
    def from_tensor(cls, packed: torch.Tensor) -> "StatsAccumulator":
        """Inverse of :meth:`to_tensor`; a (R, 1 + 2 * num_features) stack is merged row by row."""
        rows = packed.reshape(-1, packed.shape[-1]).to(torch.float64)
        if rows.shape[-1] < 3 or rows.shape[-1] % 2 == 0:
            raise ValueError(f"packed statistics must have 1 + 2 * num_features entries, got {rows.shape[-1]}")
        result = cls((rows.shape[-1] - 1) // 2)
        result._to(rows.device)
        for row in rows:
            result._merge(row[0], row[1 : 1 + result.num_features], row[1 + result.num_features :])
        return result

    def freeze(self) -> NormalisationStats:
        """Population statistics (M2 / count) as fp32 :class:`NormalisationStats`."""
        if float(self.count) <= 0:
            raise ValueError("cannot freeze normalisation statistics: no values were accumulated")
        return NormalisationStats(mean=self.mean.float().cpu(), var=(self.m2 / self.count).float().cpu())

    def _to(self, device: torch.device) -> None:
        self.count, self.mean, self.m2 = (t.to(device) for t in (self.count, self.mean, self.m2))


def token_features(
    state: SpectralState, positions: torch.Tensor, stats: NormalisationStats, config: NammConfig
) -> torch.Tensor:
    """The BAM input ``x_j = [rho(r_j) || normalise(E_j)]`` (namm-spec §2.6).

    Args:
        state: spectral state of the N slots ((B, H, N, S) EMA used).
        positions: (B, H, N) int64 absolute positions, ascending along N; the last slot is the newest
            token (recency 0).

    Ages beyond ``config.max_recency`` (protected sink tokens reach them in long sequences) are clamped to it, the
    last row of the official embedding table (namm-spec.md pitfall 11).

    Returns:
        (B, H, N, recency_dim + S) fp32 (25 by default).
    """
    if positions.shape != state.ema.shape[:-1]:
        raise ValueError(f"positions {tuple(positions.shape)} do not match the state {tuple(state.ema.shape)}")
    recency = (positions[..., -1:] - positions).long().clamp(max=config.max_recency)
    return torch.cat([recency_embedding(recency, config), stats.normalise(state.ema)], dim=-1)

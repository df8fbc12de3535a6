"""Every setting of a NAMM in one validated dataclass (namm-spec.md §2-§4, §8).

Defaults are the final BAM configuration of the paper (Cetin et al., "An Evolved Universal Transformer
Memory", ICLR 2025): STFT n_fft 32 / hop 16, EMA 0.99, 8-dim recency embedding, one-head BAM of width 32,
keep iff score >= 0, newest token always kept, no cap.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from namm_transfer.namm.interface import NUMERICS


@dataclass(frozen=True)
class NammConfig:
    """Feature, scorer and selection settings of a NAMM.

    Attributes:
        n_fft: STFT window length (namm-spec §2.2). Spectrogram bins = n_fft // 2 + 1 (17).
        hop: STFT hop; the number of new queries per step must be a multiple of it.
        ema_coeff: per-token EMA coefficient gamma (§2.3).
        recency_dim: size of the sinusoidal recency embedding (§2.5); even.
        recency_max_freq: base of the recency frequencies f_i = base^(-i / (recency_dim/2)).
        max_recency: largest recency (age in tokens) the embedding table accepts (§2.5, pitfall 11).
        hidden_dim: width of the single BAM attention head (§3.1).
        threshold: keep a token iff its score >= threshold (§4).
        protect_sink: the first ``protect_sink`` tokens of a sequence are always kept (StreamingLLM sinks;
            0 in the paper).
        protect_prompt_tail: the last ``protect_prompt_tail`` prompt tokens are always kept (0 in the
            paper; useful for chat templates on small models, field-notes §7).
        cache_cap: if set, at most this many tokens per layer survive a step: the top ``cache_cap`` by
            score are taken first and then thresholded (§4).
        attention_dtype: numerics of the attention the features read, one of
            :data:`~namm_transfer.namm.interface.NUMERICS`: "official" (bf16 logits, probabilities and GQA mean in
            bf16: the official eager half_attn attention), "bfloat16" (fp32 logits, probabilities and GQA mean in
            bf16) or "float32".
        update_every: the NAMM period n_up in tokens (§1.3): the policy runs when the absolute token count
            reaches a multiple of it and sees that many new queries. A multiple of ``hop``. The runtime takes
            it from the weights it loads, so a NAMM always runs at the period it was evolved with.
    """

    n_fft: int = 32
    hop: int = 16
    ema_coeff: float = 0.99
    recency_dim: int = 8
    recency_max_freq: float = 50000.0
    max_recency: int = 32768
    hidden_dim: int = 32
    threshold: float = 0.0
    protect_sink: int = 0
    protect_prompt_tail: int = 0
    cache_cap: int | None = None
    attention_dtype: str = "bfloat16"
    update_every: int = 512

    def __post_init__(self) -> None:
        problems = []
        if self.n_fft < 2 or self.n_fft % 2:
            problems.append(f"n_fft must be an even integer >= 2, got {self.n_fft}")
        if not 0 < self.hop <= self.n_fft:
            problems.append(f"hop must be in (0, n_fft], got {self.hop}")
        if not 0.0 < self.ema_coeff < 1.0:
            problems.append(f"ema_coeff must be in (0, 1), got {self.ema_coeff}")
        if self.recency_dim < 2 or self.recency_dim % 2:
            problems.append(f"recency_dim must be an even integer >= 2, got {self.recency_dim}")
        if self.recency_max_freq <= 1.0:
            problems.append(f"recency_max_freq must be > 1, got {self.recency_max_freq}")
        if self.max_recency < 1:
            problems.append(f"max_recency must be >= 1, got {self.max_recency}")
        if self.hidden_dim < 1:
            problems.append(f"hidden_dim must be >= 1, got {self.hidden_dim}")
        if self.protect_sink < 0 or self.protect_prompt_tail < 0:
            problems.append("protect_sink and protect_prompt_tail must be >= 0")
        if self.cache_cap is not None and self.cache_cap < 1:
            problems.append(f"cache_cap must be None or >= 1, got {self.cache_cap}")
        if self.attention_dtype not in NUMERICS:
            problems.append(f"attention_dtype must be one of {', '.join(NUMERICS)}, got {self.attention_dtype!r}")
        if self.update_every < self.hop or self.update_every % self.hop:
            problems.append(f"update_every must be a positive multiple of hop={self.hop}, got {self.update_every}")
        if problems:
            raise ValueError("invalid NammConfig: " + "; ".join(problems))

    @property
    def spectrogram_bins(self) -> int:
        """Number of one-sided STFT bins: n_fft // 2 + 1 (17 by default)."""
        return self.n_fft // 2 + 1

    @property
    def feature_dim(self) -> int:
        """Per-token feature size: recency embedding then normalised spectrogram (25 by default)."""
        return self.recency_dim + self.spectrogram_bins

    @property
    def num_params(self) -> int:
        """Length of the flat BAM parameter vector (namm-spec §3.2): 4172 by default."""
        d, h = self.feature_dim, self.hidden_dim
        return d * 3 * h + 3 * h + h * 2 * d + 2 * d + d + 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "NammConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown NammConfig fields: {', '.join(unknown)}")
        return cls(**data)

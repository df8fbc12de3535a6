"""Sampling intervals for reported means: a percentile bootstrap over items (episodes, prompts, questions).

A paired comparison of two methods on the same items is the bootstrap of their per-item differences.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def bootstrap_mean_interval(
    values: Sequence[float] | np.ndarray, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampling items with replacement).

    Returns (low, high); a single value gives (value, value)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("bootstrap needs a non-empty 1-D sample")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def mean_interval(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> dict:
    """``{"mean", "ci95"}`` of ``values`` (a non-empty 1-D sample): its mean and percentile bootstrap interval."""
    values = np.asarray(values, dtype=np.float64)
    interval = bootstrap_mean_interval(values, confidence)
    return {"mean": float(values.mean()), "ci95": list(interval)}


def paired_difference(a: Mapping[str, float], b: Mapping[str, float]) -> dict | None:
    """Mean of ``a[i] - b[i]`` over the items both hold (keys: item ids), with its bootstrap 95% interval.

    Returns ``{"items", "mean", "ci95"}``, or None when they share no item."""
    shared = [key for key in a if key in b]
    if not shared:
        return None
    difference = np.array([a[key] for key in shared], dtype=np.float64) - np.array([b[key] for key in shared])
    return {"items": len(shared), **mean_interval(difference)}

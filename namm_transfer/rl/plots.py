"""Plots of the RL transfer: score against KV memory per condition, cache size over an episode, and what the
NAMM keeps (share of return / state / action tokens by age).

Figures use :class:`matplotlib.figure.Figure` with the Agg canvas (no pyplot, no global backend).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from namm_transfer.adapters.decision_transformer import TOKEN_TYPES
from namm_transfer.evals.report import save_figure
from namm_transfer.rl.rollout import AGE_BUCKET


def plot_score_vs_memory(metrics: Mapping[str, Mapping], path: Path, title: str) -> Path:
    """D4RL score (mean with its 95% interval) against the mean memory held (K/V plus the method's own bytes),
    one labelled point per condition."""
    figure = Figure(figsize=(6.5, 4.5))
    axes = figure.add_subplot()
    for label, m in metrics.items():
        x = m["total_bytes_mean"] / 2**20
        low, high = m["d4rl_score_ci95"]
        axes.errorbar(x, m["d4rl_score"], yerr=[[m["d4rl_score"] - low], [high - m["d4rl_score"]]], fmt="o",
                      capsize=3)
        axes.annotate(label, (x, m["d4rl_score"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axes.set_xscale("symlog", linthresh=0.01)
    axes.set_xlabel("mean memory held per episode (MiB: keys + values + policy state, all layers)")
    axes.set_ylabel("D4RL-normalised score (95% CI)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    return save_figure(figure, path)


def plot_cache_curves(curves: Mapping[str, Sequence[Sequence[float]]], path: Path, title: str) -> Path:
    """Visible tokens per layer against timestep (every 10th), mean over the episodes still running."""
    figure = Figure(figsize=(6.5, 4.5))
    axes = figure.add_subplot()
    for label, per_episode in curves.items():
        longest = max((len(c) for c in per_episode), default=0)
        if not longest:
            continue
        sums, counts = np.zeros(longest), np.zeros(longest)
        for curve in per_episode:
            sums[: len(curve)] += curve
            counts[: len(curve)] += 1
        axes.plot(np.arange(longest) * 10, sums / counts, label=label)
    axes.set_xlabel("timestep")
    axes.set_ylabel("visible KV tokens per layer")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    return save_figure(figure, path)


def kept_share_by_age(records: Sequence[Mapping], heads_x_layers: int) -> dict[str, np.ndarray]:
    """Per token type, the share of the tokens of each age bucket (:data:`AGE_BUCKET` timesteps) still visible at
    the episodes' ends: kept slots summed over episodes / tokens of that type and age that existed (one per
    timestep, layer and KV head; the last timestep's action was never fed)."""
    shares = {}
    for name in TOKEN_TYPES:
        buckets = max(len(r["kept_by_type_age"][name]) for r in records)
        kept, existed = np.zeros(buckets), np.zeros(buckets)
        for r in records:
            counts = r["kept_by_type_age"][name]
            kept[: len(counts)] += counts
            ages = np.arange(r["length"]) if name != "action" else np.arange(1, r["length"])
            existed += np.bincount(ages // AGE_BUCKET, minlength=buckets)[:buckets] * heads_x_layers
        shares[name] = np.divide(kept, existed, out=np.full(buckets, np.nan), where=existed > 0)
    return shares


def plot_kept_by_age(shares: Mapping[str, np.ndarray], path: Path, title: str) -> Path:
    """Share of return / state / action tokens kept against their age at the episode's end."""
    figure = Figure(figsize=(6.5, 4.5))
    axes = figure.add_subplot()
    for name, values in shares.items():
        axes.plot(np.arange(len(values)) * AGE_BUCKET, values, marker="o", markersize=3, label=name)
    axes.set_xlabel(f"token age at episode end (timesteps, buckets of {AGE_BUCKET})")
    axes.set_ylabel("share of tokens kept")
    axes.set_ylim(0, 1.05)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    return save_figure(figure, path)

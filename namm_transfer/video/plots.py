"""Plots of the video evaluation: the per-frame retention heat map (for each method, the share of each position along
the video (frames binned, columns) that each language-model layer (rows) still holds at the end of answering), and
accuracy against the memory each method held (K/V plus the method's own bytes).

Uses :class:`matplotlib.figure.Figure` with the Agg canvas directly (no pyplot, no global backend), as
:mod:`namm_transfer.evals.report` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from namm_transfer.evals.report import save_figure


def plot_frame_retention(maps: Mapping[str, np.ndarray], path: str | Path, title: str | None = None) -> Path:
    """One heat map per method: ``maps[method]`` is (layers, bins) with values in [0, 1] (NaN for no data).
    Saved as a PNG at ``path``; returns the path."""
    if not maps:
        raise ValueError("plot_frame_retention needs at least one method")
    columns = min(3, len(maps))
    rows = -(-len(maps) // columns)
    figure = Figure(figsize=(4.2 * columns, 3.4 * rows), constrained_layout=True)
    image = None
    for index, (method, heat) in enumerate(maps.items()):
        heat = np.asarray(heat, dtype=float)
        if heat.ndim != 2:
            raise ValueError(f"heat map of {method!r} must be (layers, bins), got shape {heat.shape}")
        axes = figure.add_subplot(rows, columns, index + 1)
        image = axes.imshow(heat, aspect="auto", origin="lower", vmin=0.0, vmax=1.0, cmap="viridis",
                            interpolation="nearest")
        axes.set_title(method, fontsize=9)
        axes.set_xlabel("position in the video (frame bins, early to late)", fontsize=8)
        axes.set_ylabel("layer", fontsize=8)
    figure.colorbar(image, ax=figure.axes, shrink=0.8, label="share of the frames' KV kept")
    if title:
        figure.suptitle(title, fontsize=10)
    return save_figure(figure, path, dpi=110, tight=False)


def plot_accuracy_vs_memory(rows: Sequence[Mapping], path: str | Path, title: str | None = None) -> Path:
    """Accuracy (with its 95% interval) against the mean peak memory held, one labelled point per method: filled at
    the total (``total_mb_peak``: K/V + the policy's bytes, at the same moment), hollow at the K/V alone
    (``kv_mb_peak``), joined by a line, so the policy's share is visible. ``rows`` are the program's summary rows
    (``method``, ``accuracy``, ``acc_low``, ``acc_high``, ``kv_mb_peak``, ``total_mb_peak``)."""
    if not rows:
        raise ValueError("plot_accuracy_vs_memory needs at least one row")
    figure = Figure(figsize=(6.5, 4.5))
    axes = figure.add_subplot()
    for row in rows:
        accuracy = row["accuracy"]
        error = [[accuracy - row["acc_low"]], [row["acc_high"] - accuracy]]
        axes.plot([row["kv_mb_peak"], row["total_mb_peak"]], [accuracy, accuracy], color="0.6", linewidth=1)
        axes.plot(row["kv_mb_peak"], accuracy, marker="o", markerfacecolor="none", color="C0")
        axes.errorbar(row["total_mb_peak"], accuracy, yerr=error, fmt="o", color="C0", capsize=3)
        axes.annotate(row["method"], (row["total_mb_peak"], accuracy), textcoords="offset points", xytext=(4, 4),
                      fontsize=7)
    axes.set_xlabel("mean peak memory per question (MiB, all layers): filled K/V + policy bytes, hollow K/V only")
    axes.set_ylabel("accuracy (%, 95% interval)")
    axes.grid(alpha=0.3)
    if title:
        axes.set_title(title)
    return save_figure(figure, path, dpi=110, tight=False)


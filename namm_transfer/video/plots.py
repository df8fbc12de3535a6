"""The per-frame retention heat map of the video evaluation: for each method, the share of each position along the
video (frames binned, columns) that each language-model layer (rows) still holds at the end of answering.

Uses :class:`matplotlib.figure.Figure` with the Agg canvas directly (no pyplot, no global backend), as
:mod:`namm_transfer.evals.report` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=110)
    return path

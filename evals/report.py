"""One folder per evaluation run, text tables and plots.

A run folder ``<root>/<name>`` holds (the layout of kvpress's evaluation):

* ``config.json``: the run's identity, fixed by :meth:`RunFolder.start` and written with the first finished
  item; a rerun must pass the same config (the refusal names every difference).
* ``predictions.jsonl``: one JSON object per finished item (with an ``item_id``), appended and flushed
  line by line (:class:`~namm_transfer.jsonl.JsonlFile`), so a rerun skips :meth:`RunFolder.done_ids`. A last
  line cut off by a killed process is ignored with a warning naming the file and removed before the next append.
* ``metrics.json``: written (replaced atomically) by :meth:`RunFolder.write_metrics`, updatable.

Plots use :class:`matplotlib.figure.Figure` with the Agg canvas directly: no pyplot, no global backend.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from namm_transfer.atomic import atomic_write
from namm_transfer.jsonl import JsonlFile

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h")


def _sanitise(part: str) -> str:
    cleaned = _UNSAFE.sub("-", part).strip("-.")
    if not cleaned:
        raise ValueError(f"run name part {part!r} has no usable characters")
    return cleaned


def run_name(dataset: str, model: str, policy: str, budget: float | str | None = None) -> str:
    """``<dataset>__<model>__<policy>__<budget>``, each part reduced to ``[A-Za-z0-9._-]``.

    ``budget`` None gives "full" (no budget), a float in (0, 1] a retained fraction ("b0.25"), a string is
    used as given ("matched").
    """
    if budget is None:
        budget_part = "full"
    elif isinstance(budget, str):
        budget_part = budget
    elif 0.0 < budget <= 1.0:
        budget_part = f"b{budget:.2f}"
    else:
        raise ValueError(f"budget must be None, a string or a fraction in (0, 1], got {budget}")
    model_part = model.rstrip("/").split("/")[-1]  # a hub id or a path: its last part
    return "__".join(_sanitise(p) for p in (dataset, model_part, policy, budget_part))


class RunIdentityError(ValueError):
    """A run folder was started with other settings than the ones now asked for."""


def identity_difference(old: Mapping, new: Mapping) -> list[str]:
    """Human-readable differences between two run identities, one entry per differing key (sorted)."""
    changes = []
    for key in sorted(set(old) | set(new)):
        if key not in new:
            changes.append(f"{key} (was {_short(old[key])}, now absent)")
        elif key not in old:
            changes.append(f"{key} (was absent, now {_short(new[key])})")
        elif old[key] != new[key]:
            changes.append(f"{key} (was {_short(old[key])}, now {_short(new[key])})")
    return changes


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


class RunFolder:
    """The files of one run, resumable item by item.

    The run's identity (its config) is fixed by the first finished item: :meth:`start` checks it against an
    existing ``config.json`` without writing anything, and the first :meth:`append_prediction` writes it. So a
    command that fails before its first item leaves nothing behind, and its corrected rerun is not refused.

    Args:
        root: folder holding all runs (created on the first write).
        name: the run's folder name, e.g. from :func:`run_name`; must be a plain name, not a path.
    """

    def __init__(self, root: str | Path, name: str) -> None:
        if not name or name != _UNSAFE.sub("-", name) or name in (".", ".."):
            raise ValueError(f"run folder name {name!r} must be non-empty and use only [A-Za-z0-9._-]")
        self.path = Path(root) / name
        self.config_path = self.path / "config.json"
        self.predictions_path = self.path / "predictions.jsonl"
        self.metrics_path = self.path / "metrics.json"
        self._predictions = JsonlFile(self.predictions_path, key="item_id")
        self._config: dict | None = None

    def start(self, config: Mapping) -> None:
        """Fix this run's identity to ``config`` (JSON-compatible). An existing ``config.json`` must hold the
        same, else RunIdentityError names every difference. Writes nothing (see the class docstring)."""
        normalised = json.loads(json.dumps(config, sort_keys=True, default=str))
        if self.config_path.exists():
            try:
                old = json.loads(self.config_path.read_text(encoding="utf-8"))
            except ValueError as error:
                raise RunIdentityError(f"{self.config_path}: not a JSON config ({' '.join(str(error).split())})") from None
            changes = identity_difference(old, normalised)
            if changes:
                raise RunIdentityError(
                    f"{self.path} was started with other settings: {'; '.join(changes)}; use another output folder"
                )
        self._config = normalised

    def config(self) -> dict:
        """The run's identity as written in ``config.json``."""
        return json.loads(self.config_path.read_text(encoding="utf-8"))

    def predictions(self) -> list[dict]:
        """Every finished record, in the order written (a cut last line is ignored with a warning)."""
        return self._predictions.records()

    def done_ids(self) -> set[str]:
        """``item_id`` of every finished record."""
        return {str(r["item_id"]) for r in self.predictions()}

    def repair(self) -> None:
        """Remove a cut last line of ``predictions.jsonl`` (with a warning naming the file); call it while
        holding the output folder's lock."""
        self._predictions.repair()

    def append_prediction(self, record: Mapping) -> None:
        """Append one record (must hold ``item_id``) as one JSON line, flushed and fsynced. The first append
        writes ``config.json`` if it is not there yet, and removes a cut last line of the predictions."""
        if "item_id" not in record:
            raise ValueError("a prediction record needs an item_id")
        if self._config is not None and not self.config_path.exists():
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write(self.config_path, json.dumps(self._config, indent=2, sort_keys=True) + "\n")
        self._predictions.append(record)

    def write_metrics(self, metrics: Mapping, update: bool = False) -> dict:
        """Write ``metrics.json`` (merged into the existing one if ``update``) atomically; returns it."""
        merged = {**(self.metrics() if update else {}), **metrics}
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.metrics_path, json.dumps(merged, indent=2, sort_keys=True, default=str) + "\n")
        return merged

    def metrics(self) -> dict:
        """The content of ``metrics.json``, empty if not written yet."""
        if not self.metrics_path.exists():
            return {}
        return json.loads(self.metrics_path.read_text(encoding="utf-8"))


def _cell(value, float_digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{float_digits}f}"
    return str(value)


def with_interval(mean: float | None, interval: Sequence[float] | None, digits: int = 1) -> str | None:
    """``"45.8 [40.1, 51.2]"``, or None when there is no value."""
    if mean is None or interval is None:
        return None
    low, high = interval
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def format_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None, float_digits: int = 2) -> str:
    """A fixed-width text table: a header, a rule and one line per row; numbers right-aligned, text
    left-aligned, missing cells "-". ``columns`` defaults to the keys in first-seen order."""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    if not columns:
        raise ValueError("format_table needs at least one column")
    cells = [[_cell(row.get(c), float_digits) for c in columns] for row in rows]
    numeric = [all(isinstance(row.get(c), (int, float)) or row.get(c) is None for row in rows) for c in columns]
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]

    def fmt(values: Iterable[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([fmt(columns), "  ".join("-" * w for w in widths)] + [fmt(line) for line in cells])


def save_figure(figure: Figure, path: str | Path, dpi: int = 120, tight: bool = True) -> Path:
    """Write ``figure`` as a PNG at ``path`` (its folder created) through the Agg canvas; ``tight`` crops the
    margins (leave it off for a figure with its own ``constrained_layout``). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=dpi, bbox_inches="tight" if tight else None)
    return path


def plot_score_vs_memory(
    rows: Sequence[Mapping],
    path: str | Path,
    score_key: str = "score",
    memory_key: str = "kv_retained_pct",
    method_key: str = "method",
    title: str | None = None,
    label_key: str | None = None,
    memory_label: str = "mean retained KV cache (%)",
    interval_key: str | None = None,
    score_label: str | None = None,
) -> Path:
    """Score against memory as a PNG: one marker style per ``method_key`` value (a curve), its points joined in
    order of memory, each curve in the legend and each point labelled with its ``label_key`` (default
    ``method_key``). ``interval_key`` names a (low, high) score interval drawn as a vertical error bar; the axes
    are titled ``memory_label`` and ``score_label`` (default ``score_key``)."""
    if not rows:
        raise ValueError("plot_score_vs_memory needs at least one row")
    label_key = label_key or method_key
    by_method: dict[str, list[tuple[float, float, str, tuple[float, float] | None]]] = {}
    for row in rows:
        required = [score_key, memory_key, method_key, label_key] + ([interval_key] if interval_key else [])
        missing = [k for k in dict.fromkeys(required) if k not in row]
        if missing:
            raise ValueError(f"row {dict(row)} lacks {', '.join(missing)}")
        interval = tuple(map(float, row[interval_key])) if interval_key else None
        by_method.setdefault(str(row[method_key]), []).append(
            (float(row[memory_key]), float(row[score_key]), str(row[label_key]), interval))
    figure = Figure(figsize=(6, 4.5))
    axes = figure.add_subplot()
    for i, (method, points) in enumerate(by_method.items()):
        points.sort(key=lambda p: (p[0], p[1]))
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        line = axes.plot(xs, ys, marker=_MARKERS[i % len(_MARKERS)], linestyle="-", label=method)[0]
        for x, y, label, interval in points:
            if interval is not None:
                axes.errorbar(x, y, yerr=[[y - interval[0]], [interval[1] - y]], color=line.get_color(),
                              capsize=3, linewidth=0.8)
            axes.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axes.set_xlabel(memory_label)
    axes.set_ylabel(score_label or score_key)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    if title:
        axes.set_title(title)
    return save_figure(figure, path)


def plot_retention_per_layer(
    per_layer: Mapping[str, Sequence[float]], path: str | Path, title: str | None = None
) -> Path:
    """Retained KV (%) against layer index as a PNG, one line with markers per method."""
    if not per_layer or not all(len(v) for v in per_layer.values()):
        raise ValueError("plot_retention_per_layer needs at least one method with at least one layer")
    figure = Figure(figsize=(7, 4))
    axes = figure.add_subplot()
    for i, (method, values) in enumerate(per_layer.items()):
        axes.plot(range(len(values)), list(values), marker=_MARKERS[i % len(_MARKERS)], label=str(method))
    axes.set_xlabel("layer")
    axes.set_ylabel("retained KV cache (%)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    if title:
        axes.set_title(title)
    return save_figure(figure, path)

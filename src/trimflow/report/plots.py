"""Report figures, drawn on standalone matplotlib Figures (no pyplot global state)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from trimflow.report.pareto import Point, pareto_front, quality_metric, quality_points
from trimflow.utils.atomic import atomic_file

FRONTIER_LABEL = "Pareto frontier"
PNG_DPI = 120


# Axis label of each quality metric (plotted in %).
METRIC_AXIS = {"accuracy": "accuracy", "f1": "entity F1"}


def tradeoff_figure(metrics: Mapping[str, Any], cost_key: str, cost_label: str) -> Figure:
    """Quality (%) against `cost_key` per variant, with the Pareto frontier as a step line;
    variants without a `cost_key` value are left out."""
    points = quality_points(metrics, cost_key)
    metric = METRIC_AXIS[quality_metric(metrics)]
    front = pareto_front(points)
    dominated = [name for name in points if name not in front]
    fig = Figure(figsize=(8.4, 5.6), layout="constrained")
    ax = fig.add_subplot()
    ax.step(*_coordinates(points, front), where="post", color="C0", zorder=1, label=FRONTIER_LABEL)
    ax.scatter(*_coordinates(points, front), s=70, color="C0", zorder=3, label="on frontier")
    ax.scatter(*_coordinates(points, dominated), s=50, color="0.6", zorder=2, label="dominated")
    _label_points(ax, points)
    ax.set(
        xlabel=cost_label, ylabel=f"{metric} (%)", title=f"{metric.capitalize()} vs {cost_label}"
    )
    ax.margins(x=0.2, y=0.25)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig


def _coordinates(
    points: Mapping[str, Point], names: Sequence[str]
) -> tuple[list[float], list[float]]:
    """The x costs and y accuracies (in %) of `names`."""
    return [points[name][0] for name in names], [100 * points[name][1] for name in names]


def _label_points(ax: Axes, points: Mapping[str, Point]) -> None:
    """Name each point, on the side facing the middle of the x range so labels stay inside.

    Points taken in order of quality alternate between labels above and below, so variants
    with (nearly) equal quality do not print their names on top of each other.
    """
    costs = [cost for cost, _ in points.values()]
    middle = (min(costs) + max(costs)) / 2
    by_quality = sorted(points, key=lambda name: (points[name][1], points[name][0]))
    for rank, name in enumerate(by_quality):
        cost, quality = points[name]
        to_left = cost > middle
        above = rank % 2 == 0
        ax.annotate(
            name,
            (cost, 100 * quality),
            xytext=(-6 if to_left else 6, 4 if above else -4),
            textcoords="offset points",
            ha="right" if to_left else "left",
            va="bottom" if above else "top",
            fontsize=7.5,
        )


def confusion_figure(
    label_names: Sequence[str], matrix: Sequence[Sequence[int]], title: str
) -> Figure:
    """Heatmap of the confusion matrix normalised per true class, with raw counts written in."""
    counts = np.asarray(matrix, dtype=int)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    size = len(label_names)
    side = min(3 + 0.5 * size, 14)
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of true class", shrink=0.8)
    ax.set_xticks(range(size), label_names, rotation=45, ha="right")
    ax.set_yticks(range(size), label_names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fontsize = max(4.0, min(9.0, 100 / max(size, 1)))
    for (row, col), count in np.ndenumerate(counts):
        color = "white" if shares[row, col] > 0.5 else "black"
        ax.text(col, row, str(count), ha="center", va="center", fontsize=fontsize, color=color)
    return fig


def score_heatmap(
    rows: Sequence[str], columns: Sequence[str], scores: Sequence[Sequence[float]], title: str
) -> Figure:
    """Scores in [0, 1] (rows x columns, e.g. variants x entity types), values written in."""
    values = np.asarray(scores, dtype=float)
    fig = Figure(
        figsize=(min(3 + 0.8 * len(columns), 16), min(1.5 + 0.4 * len(rows), 12)),
        layout="constrained",
    )
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set(title=title)
    for (row, col), value in np.ndenumerate(values):
        color = "black" if value > 0.6 else "white"
        ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color)
    return fig


class CurvePanel(NamedTuple):
    """One training-curve panel: the history metrics it draws and how to scale them."""

    title: str
    ylabel: str
    metrics: tuple[str, ...]
    scale: float = 1.0


CURVE_PANELS = (
    CurvePanel("Loss", "loss", ("train/loss", "val/loss")),
    CurvePanel("Validation accuracy", "accuracy (%)", ("val/accuracy",), scale=100.0),
    CurvePanel("Validation entity F1", "entity F1 (%)", ("val/f1",), scale=100.0),
)


def _metric_series(history: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The `step`/`value` rows of one metric in a long-format history, sorted by step."""
    if history.empty:
        return history
    rows = history.loc[history["metric"] == metric, ["step", "value"]].dropna()
    return rows.sort_values("step")


def _has_data(panel: CurvePanel, histories: Mapping[str, pd.DataFrame]) -> bool:
    """Whether any history logged any of the panel's metrics."""
    return any(
        not _metric_series(history, metric).empty
        for history in histories.values()
        for metric in panel.metrics
    )


def _draw_panel(ax: Axes, panel: CurvePanel, histories: Mapping[str, pd.DataFrame]) -> None:
    """Plot the panel's metrics, a colour per history: solid for train, dashed for val."""
    for index, (name, history) in enumerate(histories.items()):
        for metric in panel.metrics:
            series = _metric_series(history, metric)
            if series.empty:
                continue
            is_validation = metric.startswith("val/")
            ax.plot(
                series["step"],
                panel.scale * series["value"],
                color=f"C{index}",
                linestyle="--" if is_validation else "-",
                marker="o" if is_validation else None,
                markersize=4,
                label=f"{name} {metric}",
            )
    ax.set(title=panel.title, xlabel="step", ylabel=panel.ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def training_curves_figure(histories: Mapping[str, pd.DataFrame]) -> Figure | None:
    """Loss and validation-metric panels over step, one colour per history; None if empty."""
    panels = [panel for panel in CURVE_PANELS if _has_data(panel, histories)]
    if not panels:
        return None
    fig = Figure(figsize=(5.2 * len(panels), 4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        _draw_panel(ax, panel, histories)
    return fig


def save_figure(fig: Figure, path: str | Path) -> None:
    """Write `fig` as a PNG atomically, then clear it to release its artists.

    The figures here are not registered with pyplot, so clearing is all closing takes.
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=PNG_DPI)
    with atomic_file(path, "wb") as handle:
        handle.write(buffer.getvalue())
    fig.clear()

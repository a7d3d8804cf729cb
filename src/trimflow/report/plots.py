"""Report figures, drawn on standalone matplotlib Figures (no pyplot global state)."""

from __future__ import annotations

import io
import re
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


def reliability_figure(panels: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]]) -> Figure:
    """Reliability diagrams, a panel each (title -> model -> evaluate's confidence bins): each
    model's accuracy against its mean confidence in every non-empty bin, and the diagonal a
    calibrated model follows."""
    fig = Figure(figsize=(5.2 * len(panels), 5), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, models) in zip(axes, panels.items(), strict=True):
        ax.plot([0, 100], [0, 100], color="0.6", linestyle="--", label="calibrated")
        for index, (name, bins) in enumerate(models.items()):
            filled = [b for b in bins if b["count"]]
            ax.plot(
                [100 * b["confidence"] for b in filled],
                [100 * b["accuracy"] for b in filled],
                color=f"C{index}",
                marker="o",
                label=name,
            )
        ax.set(
            title=title,
            xlabel="confidence (%)",
            ylabel="accuracy (%)",
            xlim=(0, 100),
            ylim=(0, 100),
        )
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    return fig


PERTURBATION_MARKERS = "oDs^vP*X"


def robustness_figure(
    accuracies: Mapping[str, Mapping[str, float]], score: str = "accuracy"
) -> Figure:
    """A dot plot of a `score` (%: accuracy, NER's entity F1): a row per variant (variant ->
    condition -> score), a marker per condition (clean text and each perturbation), joined by
    the row's range."""
    names = list(accuracies)
    conditions = list(dict.fromkeys(c for values in accuracies.values() for c in values))
    fig = Figure(figsize=(8.4, 1.5 + 0.4 * len(names)), layout="constrained")
    ax = fig.add_subplot()
    rows = range(len(names))
    spans = [[100 * value for value in accuracies[name].values()] for name in names]
    ax.hlines(rows, [min(s) for s in spans], [max(s) for s in spans], color="0.8", zorder=1)
    for index, condition in enumerate(conditions):
        ax.scatter(
            [100 * accuracies[name][condition] for name in names],
            rows,
            color=f"C{index}",
            marker=PERTURBATION_MARKERS[index % len(PERTURBATION_MARKERS)],
            zorder=2,
            label=condition,
        )
    ax.set_yticks(rows, names)
    ax.invert_yaxis()
    ax.set(xlabel=f"{score} (%)", title=f"{score.capitalize()} on clean and perturbed test texts")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def _slice_order(column: str, values: Sequence[str]) -> list[str]:
    """Slice values in reading order: length buckets ("<64", "64-127", ">=256") by their lower
    bound, others as given."""
    if column != "length":
        return list(values)
    return sorted(values, key=lambda v: (not v.startswith("<"), int(re.search(r"\d+", v)[0])))


def slice_figure(reports: Mapping[str, Mapping[str, Any]], columns: Sequence[str]) -> Figure | None:
    """Per slicing in `columns` that the reports have (a panel each), every slice's score (%)
    as a bar per model (model -> evaluate's slice report), the slice's size in its label; None
    when the reports have none of `columns`."""
    first = next(iter(reports.values()))
    metric = first["metric"]
    shown = [column for column in columns if column in first["slicings"]]
    if not shown:
        return None
    most = max(len(first["slicings"][column]["slices"]) for column in shown)
    fig = Figure(figsize=(5.2 * len(shown), 1.5 + 0.3 * most * len(reports)), layout="constrained")
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    width = 0.8 / len(reports)
    for ax, column in zip(axes, shown, strict=True):
        sizes = first["slicings"][column]["slices"]
        values = _slice_order(column, list(sizes))
        positions = np.arange(len(values))
        for index, (name, report) in enumerate(reports.items()):
            slices = report["slicings"][column]["slices"]
            ax.barh(
                positions + index * width,
                [100 * slices[value][metric] for value in values],
                height=width,
                color=f"C{index}",
                label=name,
            )
        labels = [f"{value} (n={sizes[value]['count']})" for value in values]
        ax.set_yticks(positions + width * (len(reports) - 1) / 2, labels)
        ax.invert_yaxis()
        ax.set(title=f"{metric} per {column}", xlabel=f"{metric} (%)", xlim=(0, 100))
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
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

"""Pareto frontier of quality (accuracy, entity F1) against a cost such as latency or size."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Point = tuple[float, float]


def quality_metric(metrics: Mapping[str, Any]) -> str:
    """The metric variants are ranked on: `metrics["metric"]`, accuracy when absent."""
    return metrics.get("metric", "accuracy")


def quality_points(metrics: Mapping[str, Any], cost_key: str) -> dict[str, Point]:
    """Map each variant in `metrics` to its `(cost, quality)` point; variants whose cost is
    None (e.g. no training figures) have none."""
    metric = quality_metric(metrics)
    return {
        name: (values[cost_key], values[metric])
        for name, values in metrics["variants"].items()
        if values[cost_key] is not None
    }


def _dominates(a: Point, b: Point) -> bool:
    """Whether `a` costs no more and scores no less than `b`, and differs from it."""
    return a[0] <= b[0] and a[1] >= b[1] and a != b


def pareto_front(points: Mapping[str, Point]) -> list[str]:
    """Names of the non-dominated `(cost, score)` points, sorted by cost.

    Lower cost and higher score are better. Identical points do not dominate each
    other, so ties on both axes all stay on the front, in their input order.
    """
    front = [
        name
        for name, point in points.items()
        if not any(_dominates(other, point) for other in points.values())
    ]
    return sorted(front, key=lambda name: points[name][0])

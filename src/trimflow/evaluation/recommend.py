"""Choose for the user: the fastest variant whose quality stays within a drop budget."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def drop_points(
    variant: Mapping[str, Any], baseline: Mapping[str, Any], metric: str = "accuracy"
) -> float:
    """How many points of `metric` `variant` loses against `baseline` (negative: it gains)."""
    return 100 * (baseline[metric] - variant[metric])


def recommend(
    variants: Mapping[str, Mapping[str, Any]],
    baseline: str,
    max_drop_pts: float,
    metric: str = "accuracy",
) -> dict[str, Any]:
    """The lowest batch-1 p50 latency among variants losing at most `max_drop_pts` points of
    `metric` (accuracy; entity F1 for NER).

    Ties on latency go to the smaller file. The baseline itself always qualifies, so there is
    always a recommendation. Returns its name, the drop and ratios against the baseline.
    """
    if baseline not in variants:
        raise KeyError(f"baseline variant '{baseline}' was not evaluated ({', '.join(variants)})")
    base = variants[baseline]
    eligible = [
        name
        for name, values in variants.items()
        if drop_points(values, base, metric) <= max_drop_pts + 1e-9
    ]
    best = min(eligible, key=lambda n: (variants[n]["latency_ms_p50"], variants[n]["size_mb"]))
    chosen = variants[best]
    return {
        "variant": best,
        "baseline": baseline,
        "metric": metric,
        "max_drop_pts": max_drop_pts,
        "drop_pts": round(drop_points(chosen, base, metric), 4),
        "speedup": base["latency_ms_p50"] / chosen["latency_ms_p50"],
        "size_ratio": base["size_mb"] / chosen["size_mb"],
    }

"""Choose for the user: the fastest variant whose accuracy stays within a drop budget."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def accuracy_drop_points(variant: Mapping[str, Any], baseline: Mapping[str, Any]) -> float:
    """How many accuracy points `variant` loses against `baseline` (negative: it gains)."""
    return 100 * (baseline["accuracy"] - variant["accuracy"])


def recommend(
    variants: Mapping[str, Mapping[str, Any]], baseline: str, max_accuracy_drop: float
) -> dict[str, Any]:
    """The lowest batch-1 p50 latency among variants losing at most `max_accuracy_drop` points.

    Ties on latency go to the smaller file. The baseline itself always qualifies, so there is
    always a recommendation. Returns its name, accuracy drop and ratios against the baseline.
    """
    if baseline not in variants:
        raise KeyError(f"baseline variant '{baseline}' was not evaluated ({', '.join(variants)})")
    base = variants[baseline]
    eligible = [
        name
        for name, values in variants.items()
        if accuracy_drop_points(values, base) <= max_accuracy_drop + 1e-9
    ]
    best = min(eligible, key=lambda n: (variants[n]["latency_ms_p50"], variants[n]["size_mb"]))
    chosen = variants[best]
    return {
        "variant": best,
        "baseline": baseline,
        "max_accuracy_drop": max_accuracy_drop,
        "accuracy_drop_pts": round(accuracy_drop_points(chosen, base), 4),
        "speedup": base["latency_ms_p50"] / chosen["latency_ms_p50"],
        "size_ratio": base["size_mb"] / chosen["size_mb"],
    }

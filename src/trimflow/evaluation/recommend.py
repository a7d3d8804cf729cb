"""Choose for the user: the fastest variant whose quality stays within a drop budget."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# Rounding slack when comparing a drop with the budget.
TOLERANCE_PTS = 1e-9


def drop_points(
    variant: Mapping[str, Any], baseline: Mapping[str, Any], metric: str = "accuracy"
) -> float:
    """How many points of `metric` `variant` loses against `baseline` (negative: it gains)."""
    return 100 * (baseline[metric] - variant[metric])


def guard_failures(
    variant: Mapping[str, Any],
    baseline: Mapping[str, Any],
    guards: Sequence[str],
    max_drop_pts: float,
) -> dict[str, float]:
    """Each guarded metric on which `variant` loses more than `max_drop_pts` points -> its drop."""
    drops = {metric: drop_points(variant, baseline, metric) for metric in guards}
    return {
        metric: round(drop, 4)
        for metric, drop in drops.items()
        if drop > max_drop_pts + TOLERANCE_PTS
    }


def recommend(
    variants: Mapping[str, Mapping[str, Any]],
    baseline: str,
    max_drop_pts: float,
    guards: Sequence[str],
) -> dict[str, Any]:
    """The lowest batch-1 p50 latency among variants losing at most `max_drop_pts` points of
    every metric in `guards` (e.g. accuracy and macro-F1).

    Ties on latency go to the smaller file. The baseline itself always qualifies, so there is
    always a recommendation. Returns its name, its drop on each guard, its ratios against the
    baseline, and `excluded`: every other variant that fails a guard -> {metric: drop}.
    """
    if baseline not in variants:
        raise KeyError(f"baseline variant '{baseline}' was not evaluated ({', '.join(variants)})")
    base = variants[baseline]
    excluded = {
        name: failures
        for name, values in variants.items()
        if (failures := guard_failures(values, base, guards, max_drop_pts))
    }
    eligible = [name for name in variants if name not in excluded]
    best = min(eligible, key=lambda n: (variants[n]["latency_ms_p50"], variants[n]["size_mb"]))
    chosen = variants[best]
    return {
        "variant": best,
        "baseline": baseline,
        "max_drop_pts": max_drop_pts,
        "guards": list(guards),
        "drop_pts": {metric: round(drop_points(chosen, base, metric), 4) for metric in guards},
        "speedup": base["latency_ms_p50"] / chosen["latency_ms_p50"],
        "size_ratio": base["size_mb"] / chosen["size_mb"],
        "excluded": excluded,
    }


def headline(recommendation: Mapping[str, Any]) -> str:
    """One line for people: the recommended variant, its ratios and what its quality costs."""
    costs = ", ".join(
        f"{metric} {-points:+.2f} pts" for metric, points in recommendation["drop_pts"].items()
    )
    return (
        f"recommended {recommendation['variant']}: {recommendation['speedup']:.2f}x faster at"
        f" batch 1 and {recommendation['size_ratio']:.2f}x smaller than"
        f" {recommendation['baseline']} ({costs})"
    )

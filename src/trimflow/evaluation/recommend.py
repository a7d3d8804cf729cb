"""Choose for the user: the variant best on an objective (by default the fastest) whose quality
stays within a drop budget."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# Rounding slack when comparing a drop with the budget.
TOLERANCE_PTS = 1e-9
# report.objective -> the metrics.json field the recommendation minimises; ties go to the lower
# batch-1 p50 latency, then to the smaller file.
OBJECTIVE_FIELDS = {
    "latency": "latency_ms_p50",
    "train_time": "train_s",
    "train_memory": "peak_train_mem_mb",
}
LATENCY = "latency"


# Guardable figures where lower is better (calibration error, flips, sensitivity, slice gap).
LOWER_IS_BETTER = ("ece", "brier", "flip_rate", "invariance_failure_", "slice_gap")


def lower_is_better(metric: str) -> bool:
    """Whether a smaller `metric` is the better one (ECE, Brier score, flip rate, ...)."""
    return metric.startswith(LOWER_IS_BETTER)


def drop_points(
    variant: Mapping[str, Any], baseline: Mapping[str, Any], metric: str = "accuracy"
) -> float:
    """How many points of `metric` `variant` loses against `baseline` (negative: it gains); for
    a metric where lower is better, how many points it rises."""
    drop = 100 * (baseline[metric] - variant[metric])
    return -drop if lower_is_better(metric) else drop


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
    objective: str = LATENCY,
) -> dict[str, Any]:
    """The variant lowest on `objective`'s field (`OBJECTIVE_FIELDS`: batch-1 p50 latency by
    default) among variants losing at most `max_drop_pts` points of every metric in `guards`
    (e.g. accuracy and macro-F1) and having that field (training figures may be None).

    Ties go to the lower latency, then to the smaller file. The baseline itself always passes
    the guards, so with the latency objective there is always a recommendation; a training
    objective that no passing variant has figures for raises ValueError. Returns its name, the
    objective, its drop on each guard, its ratios against the baseline, and `excluded`: every
    other variant that fails a guard -> {metric: drop}.
    """
    if baseline not in variants:
        raise KeyError(f"baseline variant '{baseline}' was not evaluated ({', '.join(variants)})")
    base = variants[baseline]
    excluded = {
        name: failures
        for name, values in variants.items()
        if (failures := guard_failures(values, base, guards, max_drop_pts))
    }
    ranked_on = list(dict.fromkeys([OBJECTIVE_FIELDS[objective], "latency_ms_p50", "size_mb"]))
    eligible = [
        name
        for name, values in variants.items()
        if name not in excluded and values.get(ranked_on[0]) is not None
    ]
    if not eligible:
        raise ValueError(
            f"report.objective={objective}: no variant within the quality budget has"
            f" {ranked_on[0]} (it comes from the training.json of a trained variant)"
        )
    best = min(eligible, key=lambda name: [variants[name][key] for key in ranked_on])
    chosen = variants[best]
    return {
        "variant": best,
        "objective": objective,
        "baseline": baseline,
        "max_drop_pts": max_drop_pts,
        "guards": list(guards),
        "drop_pts": {metric: round(drop_points(chosen, base, metric), 4) for metric in guards},
        "speedup": base["latency_ms_p50"] / chosen["latency_ms_p50"],
        "size_ratio": base["size_mb"] / chosen["size_mb"],
        "excluded": excluded,
    }


def headline(recommendation: Mapping[str, Any]) -> str:
    """One line for people: the recommended variant (and the objective it was chosen on, when
    not latency), its ratios and what its quality costs."""
    costs = ", ".join(
        f"{metric} {-points:+.2f} pts" for metric, points in recommendation["drop_pts"].items()
    )
    objective = recommendation["objective"]
    chosen_on = "" if objective == LATENCY else f" (objective {objective})"
    return (
        f"recommended {recommendation['variant']}{chosen_on}:"
        f" {recommendation['speedup']:.2f}x faster at"
        f" batch 1 and {recommendation['size_ratio']:.2f}x smaller than"
        f" {recommendation['baseline']} ({costs})"
    )

"""`trimflow compare`'s comparison: runs reduced to plain data, their differing params, chosen
metrics and ratios to a baseline. No MLflow here: compare_query selects the runs, compare_render
shows and writes the result."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from trimflow.evaluation.recommend import LOWER_IS_BETTER
from trimflow.tracking.runs import BENCH_PREFIX, MODEL_PREFIX, TEST_PREFIX, TRAINING_PREFIX

# Metrics where smaller is better: their ratio is baseline/run (a speedup), others run/baseline.
SMALLER_IS_BETTER = (
    f"{BENCH_PREFIX}latency",
    f"{MODEL_PREFIX}size",
    f"{TRAINING_PREFIX}seconds",
    f"{TRAINING_PREFIX}peak_mem_mb",
    f"{TRAINING_PREFIX}adapter_mb",
    *(f"{TEST_PREFIX}{name}" for name in LOWER_IS_BETTER),
    f"{TEST_PREFIX}nll",
)
METRIC_ORDER = (TEST_PREFIX, BENCH_PREFIX, MODEL_PREFIX, TRAINING_PREFIX)


class CompareError(Exception):
    """A run, metric, experiment or store asked for does not exist or cannot be reached."""


@dataclass(frozen=True)
class ComparedRun:
    """One MLflow run reduced to what the comparison shows."""

    label: str
    run_id: str
    name: str
    start_time: str
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    variant: str | None = None


@dataclass(frozen=True)
class Selection:
    """The runs to compare, what they are, and the baseline to use when none is asked for."""

    description: str
    runs: list[ComparedRun]
    default_baseline: str | None = None


@dataclass(frozen=True)
class Comparison:
    """Plain data: differing params and metrics per run label, ratios per non-baseline run."""

    description: str
    runs: list[ComparedRun]
    baseline: str
    params: dict[str, dict[str, str | None]]
    metrics: dict[str, dict[str, float | None]]
    ratios: dict[str, dict[str, float | None]]

    @property
    def others(self) -> list[str]:
        """Labels of the runs compared against the baseline."""
        return [run.label for run in self.runs if run.label != self.baseline]

    def to_dict(self) -> dict[str, Any]:
        """The JSON payload of compare.json."""
        return {
            "description": self.description,
            "baseline": self.baseline,
            "runs": [
                {
                    "label": run.label,
                    "run_id": run.run_id,
                    "name": run.name,
                    "start_time": run.start_time,
                    "variant": run.variant,
                }
                for run in self.runs
            ],
            "params": self.params,
            "metrics": self.metrics,
            "ratios": {
                metric: {"direction": ratio_direction(metric), "values": values}
                for metric, values in self.ratios.items()
            },
        }


def metric_list(text: str) -> list[str]:
    """'a, b,' -> ['a', 'b'] (the --metrics option)."""
    return [name.strip() for name in text.split(",") if name.strip()]


def build_comparison(
    selection: Selection, baseline: str | None = None, metrics: list[str] | None = None
) -> Comparison:
    """Differing params, the chosen metrics and the ratios against the baseline run."""
    runs = selection.runs
    base = pick_baseline(runs, baseline or selection.default_baseline)
    chosen = choose_metrics(runs, metrics)
    values = {name: {run.label: _finite(run.metrics.get(name)) for run in runs} for name in chosen}
    others = [run.label for run in runs if run.label != base.label]
    ratios = {
        name: {label: ratio(name, row[base.label], row[label]) for label in others}
        for name, row in values.items()
    }
    return Comparison(
        selection.description, runs, base.label, differing_params(runs), values, ratios
    )


def pick_baseline(runs: list[ComparedRun], wanted: str | None) -> ComparedRun:
    """The run whose label, name, id or variant is `wanted`; the first run when None."""
    if wanted is None:
        return runs[0]
    for run in runs:
        if wanted in (run.label, run.name, run.run_id, run.variant):
            return run
    labels = ", ".join(run.label for run in runs)
    raise CompareError(f"baseline '{wanted}' is none of the compared runs: {labels}")


def choose_metrics(runs: list[ComparedRun], wanted: list[str] | None) -> list[str]:
    """`wanted` (all must exist), else every metric of the runs, task metrics first."""
    available = sorted({name for run in runs for name in run.metrics}, key=_metric_rank)
    if not wanted:
        return available
    unknown = [name for name in wanted if name not in available]
    if unknown:
        raise CompareError(
            f"unknown metric(s) {', '.join(unknown)}; the runs have: {', '.join(available)}"
        )
    return list(dict.fromkeys(wanted))


def _metric_rank(name: str) -> tuple[int, str]:
    """Sort key: test/, bench/, model/, training/, then the rest, alphabetically within each."""
    rank = next((i for i, prefix in enumerate(METRIC_ORDER) if name.startswith(prefix)), None)
    return (len(METRIC_ORDER) if rank is None else rank, name)


def differing_params(runs: list[ComparedRun]) -> dict[str, dict[str, str | None]]:
    """{param: {label: value}} for the params whose value (or presence) differs across runs."""
    names = sorted({name for run in runs for name in run.params})
    table = {name: {run.label: run.params.get(name) for run in runs} for name in names}
    return {name: row for name, row in table.items() if len(set(row.values())) > 1}


def smaller_is_better(metric: str) -> bool:
    """Latency, size, training-cost and error metrics (ECE, NLL, flips, ...), also as
    `<variant>/bench/latency...` in sweeps."""
    return any(metric.startswith(p) or f"/{p}" in metric for p in SMALLER_IS_BETTER)


def ratio_direction(metric: str) -> str:
    """'baseline/run' for the `smaller_is_better` metrics, 'run/baseline' for the others."""
    return "baseline/run" if smaller_is_better(metric) else "run/baseline"


def ratio(metric: str, baseline: float | None, value: float | None) -> float | None:
    """The ratio of `value` to `baseline` in the metric's direction; None when undefined."""
    if baseline is None or value is None:
        return None
    numerator, denominator = (baseline, value) if smaller_is_better(metric) else (value, baseline)
    return None if denominator == 0 else numerator / denominator


def _finite(value: float | None) -> float | None:
    """`value`, or None when missing or not finite (keeps the JSON strict)."""
    return value if value is not None and math.isfinite(value) else None

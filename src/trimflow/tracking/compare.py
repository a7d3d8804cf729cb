"""`trimflow compare`: MLflow runs side by side: differing params, metrics, baseline ratios."""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from trimflow.config.schema import TrackingConfig
from trimflow.tracking.runs import (
    PARENT_TAG,
    PIPELINE,
    SQLITE_PREFIX,
    STAGE_TAG,
    SWEEP,
    VARIANT_TAG,
    tracking_uri,
)
from trimflow.utils.atomic import atomic_file, write_json

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "trimflow"
DEFAULT_VARIANT_BASELINE = "finetuned"
# Metrics where smaller is better: their ratio is baseline/run (a speedup), others run/baseline.
SMALLER_IS_BETTER = ("bench/latency", "model/size")
METRIC_ORDER = ("test/", "bench/", "model/")
RUN_ID = re.compile(r"[0-9a-f]{32}")
RATIO_NOTE = (
    "(×): ratio to the baseline, baseline/run for bench/latency* and model/size* "
    "(>1: faster or smaller), run/baseline for the other metrics (>1: higher)"
)


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


def resolve_uri(uri: str | None) -> str:
    """`uri` if given, else `MLFLOW_TRACKING_URI`, else the project's sqlite store."""
    if uri:
        return uri
    return tracking_uri(TrackingConfig(enabled=True, uri=DEFAULT_URI, experiment=""))


def open_store(uri: str) -> Any:
    """An MlflowClient on `uri`, checked to answer (a sqlite file must already exist)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if uri.startswith(SQLITE_PREFIX) and not Path(uri[len(SQLITE_PREFIX) :]).is_file():
        raise CompareError(f"no MLflow store at {uri[len(SQLITE_PREFIX) :]} (tracking URI {uri})")
    client = MlflowClient(uri)
    try:
        client.search_experiments(max_results=1)
    except (MlflowException, OSError) as err:
        raise CompareError(f"tracking URI {uri} is unreachable: {err}") from err
    return client


def find_experiment(client: Any, name: str) -> str:
    """The id of experiment `name`, which must hold at least one run."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise CompareError(f"no MLflow experiment '{name}' in {client.tracking_uri}")
    if not client.search_runs([experiment.experiment_id], max_results=1):
        raise CompareError(f"MLflow experiment '{name}' in {client.tracking_uri} has no runs")
    return experiment.experiment_id


def select_runs(
    client: Any,
    experiment: str,
    refs: list[str],
    latest_pipeline: bool = False,
    sweep: bool = False,
) -> Selection:
    """The runs named by `refs`, the points of the latest sweep (`sweep`), or by default
    (`latest_pipeline`) the variants of the latest pipeline run."""
    if sum((bool(refs), latest_pipeline, sweep)) > 1:
        raise CompareError("give run ids/names, --latest-pipeline or --sweep, not several")
    experiment_id = find_experiment(client, experiment)
    if refs:
        return select_by_reference(client, experiment_id, experiment, refs)
    if sweep:
        return select_latest_sweep(client, experiment_id, experiment)
    return select_latest_variants(client, experiment_id, experiment)


def select_by_reference(
    client: Any, experiment_id: str, experiment: str, refs: list[str]
) -> Selection:
    """The runs with these ids or (unique) run names, in the order given."""
    found = {
        run.info.run_id: run
        for run in (_find_run(client, experiment_id, experiment, ref) for ref in refs)
    }
    return Selection(f"runs {', '.join(refs)}", _compared(list(found.values())))


def _find_run(client: Any, experiment_id: str, experiment: str, ref: str) -> Any:
    """The run whose id is `ref`, else the one run of `experiment` named `ref`."""
    from mlflow.exceptions import MlflowException

    if RUN_ID.fullmatch(ref):
        try:
            return client.get_run(ref)
        except MlflowException:
            pass
    matches = client.search_runs([experiment_id], f"attributes.run_name = {_quoted(ref)}")
    if not matches:
        raise CompareError(f"no run with id or name '{ref}' in MLflow experiment '{experiment}'")
    if len(matches) > 1:
        listed = "; ".join(
            f"{run.info.run_id} (started {_started(run)}, parent "
            f"{run.data.tags.get(PARENT_TAG, 'none')})"
            for run in matches
        )
        raise CompareError(
            f"run name '{ref}' matches {len(matches)} runs in experiment '{experiment}', "
            f"pass one of their ids: {listed}"
        )
    return matches[0]


def select_latest_variants(client: Any, experiment_id: str, experiment: str) -> Selection:
    """The `variant:*` runs of the most recent pipeline run that has any."""
    pipelines = client.search_runs(
        [experiment_id],
        f"tags.`{STAGE_TAG}` = '{PIPELINE}'",
        order_by=["attributes.start_time DESC"],
    )
    if not pipelines:
        raise CompareError(
            f"no pipeline run (tag {STAGE_TAG}={PIPELINE}) in MLflow experiment '{experiment}'"
        )
    for pipeline in pipelines:
        variants = _variant_runs(client, experiment_id, pipeline.info.run_id)
        if variants:
            description = (
                f"variants of pipeline run '{pipeline.info.run_name}' "
                f"({pipeline.info.run_id}, started {_started(pipeline)})"
            )
            names = [run.data.tags[VARIANT_TAG] for run in variants]
            default = DEFAULT_VARIANT_BASELINE if DEFAULT_VARIANT_BASELINE in names else None
            return Selection(description, _compared(variants), default)
    raise CompareError(f"no pipeline run in MLflow experiment '{experiment}' has variant:* runs")


def select_latest_sweep(client: Any, experiment_id: str, experiment: str) -> Selection:
    """The pipeline runs of the most recent sweep, each with its variants' metrics as
    `<variant>/<metric>`."""
    sweeps = client.search_runs(
        [experiment_id],
        f"tags.`{STAGE_TAG}` = '{SWEEP}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not sweeps:
        raise CompareError(
            f"no sweep run (tag {STAGE_TAG}={SWEEP}) in MLflow experiment '{experiment}'"
        )
    sweep = sweeps[0]
    points = _children(client, experiment_id, sweep.info.run_id)
    points = [run for run in points if run.data.tags.get(STAGE_TAG) == PIPELINE]
    if not points:
        raise CompareError(f"sweep run '{sweep.info.run_name}' has no pipeline runs")
    description = (
        f"pipeline runs of sweep '{sweep.info.run_name}' "
        f"({sweep.info.run_id}, started {_started(sweep)})"
    )
    variant_metrics = [
        _prefixed_variant_metrics(client, experiment_id, point.info.run_id) for point in points
    ]
    return Selection(description, _compared(points, variant_metrics))


def _children(client: Any, experiment_id: str, parent_id: str) -> list[Any]:
    """The child runs of `parent_id`, oldest first."""
    return list(
        client.search_runs(
            [experiment_id],
            f"tags.`{PARENT_TAG}` = '{parent_id}'",
            order_by=["attributes.start_time ASC"],
        )
    )


def _variant_runs(client: Any, experiment_id: str, parent_id: str) -> list[Any]:
    """The `variant:*` children of a pipeline run, oldest first."""
    return [
        run for run in _children(client, experiment_id, parent_id) if VARIANT_TAG in run.data.tags
    ]


def _prefixed_variant_metrics(client: Any, experiment_id: str, parent_id: str) -> dict:
    """{'<variant>/<metric>': value} over the variant runs of a pipeline run."""
    return {
        f"{run.data.tags[VARIANT_TAG]}/{key}": value
        for run in _variant_runs(client, experiment_id, parent_id)
        for key, value in run.data.metrics.items()
    }


def _compared(runs: list[Any], extra_metrics: list[dict] | None = None) -> list[ComparedRun]:
    """MLflow runs as ComparedRun, labelled by variant or run name (plus a short id where
    labels repeat)."""
    names = [
        run.data.tags.get(VARIANT_TAG) or run.info.run_name or run.info.run_id[:8] for run in runs
    ]
    extras = extra_metrics or [{} for _ in runs]
    return [
        ComparedRun(
            label=name if names.count(name) == 1 else f"{name} ({run.info.run_id[:8]})",
            run_id=run.info.run_id,
            name=run.info.run_name or "",
            start_time=_started(run),
            params=dict(run.data.params),
            metrics={**run.data.metrics, **extra},
            variant=run.data.tags.get(VARIANT_TAG),
        )
        for run, name, extra in zip(runs, names, extras, strict=True)
    ]


def _quoted(value: str) -> str:
    """A string literal for an MLflow filter."""
    return f'"{value}"' if "'" in value else f"'{value}'"


def _started(run: Any) -> str:
    """The run's start time, ISO 8601 in UTC."""
    return datetime.fromtimestamp(run.info.start_time / 1000, UTC).isoformat(timespec="seconds")


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
    """Sort key: test/, bench/, model/, then the rest, alphabetically within each."""
    rank = next((i for i, prefix in enumerate(METRIC_ORDER) if name.startswith(prefix)), None)
    return (len(METRIC_ORDER) if rank is None else rank, name)


def differing_params(runs: list[ComparedRun]) -> dict[str, dict[str, str | None]]:
    """{param: {label: value}} for the params whose value (or presence) differs across runs."""
    names = sorted({name for run in runs for name in run.params})
    table = {name: {run.label: run.params.get(name) for run in runs} for name in names}
    return {name: row for name, row in table.items() if len(set(row.values())) > 1}


def smaller_is_better(metric: str) -> bool:
    """Latency and size metrics, also as `<variant>/bench/latency...` in sweeps."""
    return any(metric.startswith(p) or f"/{p}" in metric for p in SMALLER_IS_BETTER)


def ratio_direction(metric: str) -> str:
    """'baseline/run' for latency and size metrics, 'run/baseline' for the others."""
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


def params_table(comparison: Comparison) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the differing-params table."""
    labels = [run.label for run in comparison.runs]
    rows = [[name, *(row[label] for label in labels)] for name, row in comparison.params.items()]
    return ["param", *labels], rows


def metrics_table(comparison: Comparison) -> tuple[list[str], list[list[Any]]]:
    """The metrics table in raw numbers (the CSV): values per run, then ratios per other run."""
    labels = [run.label for run in comparison.runs]
    others = comparison.others
    header = ["metric", *labels, "ratio direction", *(f"{label} ratio" for label in others)]
    rows = [
        [
            name,
            *(values[label] for label in labels),
            ratio_direction(name),
            *(comparison.ratios[name][label] for label in others),
        ]
        for name, values in comparison.metrics.items()
    ]
    return header, rows


def metrics_display(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    """The metrics table for reading: each value followed by its ratio to the baseline."""
    labels = [run.label for run in comparison.runs]
    header = [
        "metric",
        "ratio (×)",
        *(f"{label} (baseline)" if label == comparison.baseline else label for label in labels),
    ]
    rows = [
        [
            name,
            ratio_direction(name),
            *(_with_ratio(values[label], comparison.ratios[name].get(label)) for label in labels),
        ]
        for name, values in comparison.metrics.items()
    ]
    return header, rows


def format_value(value: Any) -> str:
    """A cell for reading: '—' when missing, grouped integers, 4 decimals below 100."""
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if float(value).is_integer():
        return f"{value:,.0f}"
    return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.4f}"


def _with_ratio(value: float | None, to_baseline: float | None) -> str:
    """'0.3750 (0.75×)', or the value alone for the baseline or an undefined ratio."""
    text = format_value(value)
    return text if to_baseline is None else f"{text} ({to_baseline:.2f}×)"


def render_csv(comparison: Comparison) -> str:
    """The metrics table as CSV, raw numbers, empty cells for missing values."""
    header, rows = metrics_table(comparison)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(["" if cell is None else cell for cell in row] for row in rows)
    return buffer.getvalue()


def render_markdown(comparison: Comparison) -> str:
    """Both tables as markdown, with what was compared and the baseline."""
    header, rows = params_table(comparison)
    params = (
        _markdown_table(header, [[format_value(cell) for cell in row] for row in rows])
        if rows
        else "All params are equal."
    )
    lines = [
        "# Run comparison",
        "",
        f"{comparison.description}. Baseline: `{comparison.baseline}`.",
        "",
        "## Params that differ",
        "",
        params,
        "",
        "## Metrics",
        "",
        f"{RATIO_NOTE}.",
        "",
        _markdown_table(*metrics_display(comparison)),
    ]
    return "\n".join(lines) + "\n"


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table, '|' in cells escaped."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join(
        "| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines
    )


def rich_report(comparison: Comparison) -> list[Any]:
    """What was compared, then both tables as rich Tables (the ratio direction as caption)."""
    from rich.table import Table
    from rich.text import Text

    header, rows = params_table(comparison)
    params = Table(title="Params that differ", caption=None if rows else "all params are equal")
    for name in header:
        params.add_column(name, overflow="fold")
    for row in rows:
        params.add_row(*(format_value(cell) for cell in row))

    header, rows = metrics_display(comparison)
    metrics = Table(title="Metrics", caption=RATIO_NOTE)
    metrics.add_column(header[0], no_wrap=True)
    metrics.add_column(header[1], no_wrap=True)
    for name in header[2:]:
        metrics.add_column(name, justify="right")
    for row in rows:
        metrics.add_row(*row)
    heading = f"{comparison.description}; baseline: {comparison.baseline}"
    return [Text(heading, style="bold"), params, metrics]


def write_outputs(comparison: Comparison, out_dir: str | Path) -> list[Path]:
    """compare.json, compare.csv and compare.md in `out_dir`, each written atomically."""
    out = Path(out_dir)
    write_json(out / "compare.json", comparison.to_dict())
    for name, text in (
        ("compare.csv", render_csv(comparison)),
        ("compare.md", render_markdown(comparison)),
    ):
        with atomic_file(out / name) as handle:
            handle.write(text)
    return [out / name for name in ("compare.json", "compare.csv", "compare.md")]


def compare(
    uri: str | None,
    experiment: str = DEFAULT_EXPERIMENT,
    refs: list[str] | None = None,
    latest_pipeline: bool = False,
    sweep: bool = False,
    baseline: str | None = None,
    metrics: list[str] | None = None,
) -> Comparison:
    """Select runs in the store at `uri` (see `select_runs`) and compare them."""
    client = open_store(resolve_uri(uri))
    selection = select_runs(client, experiment, refs or [], latest_pipeline, sweep)
    return build_comparison(selection, baseline, metrics)

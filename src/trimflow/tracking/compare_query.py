"""`trimflow compare`'s queries: the MLflow store, and the runs it compares (a Selection)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from trimflow.config.schema import FINETUNED, TrackingConfig
from trimflow.tracking.compare import (
    ComparedRun,
    CompareError,
    Comparison,
    Selection,
    build_comparison,
)
from trimflow.tracking.runs import (
    PARENT_TAG,
    PIPELINE,
    SQLITE_PREFIX,
    STAGE_TAG,
    SWEEP,
    VARIANT_TAG,
    tracking_uri,
)

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "trimflow"
RUN_ID = re.compile(r"[0-9a-f]{32}")


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
            default = FINETUNED if FINETUNED in names else None
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

"""MLflow runs: one parent per pipeline execution, a child per stage and per variant."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trimflow.config.schema import TrackingConfig, TrimflowConfig
from trimflow.layout import unit_name

PARENT_RUN_ENV = "TRIMFLOW_PARENT_RUN_ID"
SQLITE_PREFIX = "sqlite:///"
log = logging.getLogger(__name__)


# Read once: mlflow.set_tracking_uri() writes this variable itself, so a later read would
# return the previous Tracker's store instead of the user's choice.
USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def tracking_uri(cfg: TrackingConfig) -> str:
    """`MLFLOW_TRACKING_URI` as set by the user, else `tracking.uri` (sqlite by default)."""
    return USER_TRACKING_URI or cfg.uri


def artifact_root(uri: str) -> str | None:
    """`mlartifacts/` beside a sqlite store (MLflow would use ./mlruns of the cwd); else the
    server's default."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    return (Path(uri[len(SQLITE_PREFIX) :]).resolve().parent / "mlartifacts").as_uri()


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def git_tags() -> dict[str, str]:
    """The commit and dirty flag of the working tree (empty outside git)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        return {
            "git.commit": git("rev-parse", "HEAD"),
            "git.dirty": str(bool(git("status", "--porcelain", "--untracked-files=no"))),
        }
    except (subprocess.CalledProcessError, FileNotFoundError):
        return {}


# Tag of a variant stage run (prune@pruned): the variant it builds.
BUILDS_TAG = "trimflow.builds"


class Tracker:
    """Opens MLflow runs for a config; does nothing when `tracking.enabled` is false."""

    def __init__(self, cfg: TrimflowConfig) -> None:
        self.cfg = cfg
        self.enabled = cfg.tracking.enabled
        if self.enabled:
            import mlflow

            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
            uri = tracking_uri(cfg.tracking)
            mlflow.set_tracking_uri(uri)
            if mlflow.get_experiment_by_name(cfg.tracking.experiment) is None:
                mlflow.create_experiment(cfg.tracking.experiment, artifact_root(uri))
            mlflow.set_experiment(cfg.tracking.experiment)

    @property
    def uri(self) -> str:
        return tracking_uri(self.cfg.tracking)

    @contextlib.contextmanager
    def run(
        self,
        name: str,
        tags: dict[str, str],
        params: dict[str, Any] | None = None,
        parent_run_id: str | None = None,
    ) -> Iterator[Any]:
        """A run named `name` under the pipeline's parent run (env), with tags and params."""
        if not self.enabled:
            yield None
            return
        import mlflow

        parent = parent_run_id or os.environ.get(PARENT_RUN_ENV)
        all_tags = {**git_tags(), **tags}
        if os.environ.get("DVC_STAGE"):
            all_tags["dvc.stage"] = os.environ["DVC_STAGE"]
        with mlflow.start_run(
            run_name=name, parent_run_id=parent, nested=parent is not None, tags=all_tags
        ) as active:
            if params:
                mlflow.log_params(flatten(params))
            yield active

    @contextlib.contextmanager
    def stage_run(
        self, stage: str, dataset_digest: str | None = None, builds: str | None = None
    ) -> Iterator[Any]:
        """A child run for one stage (building variant `builds`), with the flattened config."""
        tags = {"trimflow.stage": stage}
        if dataset_digest:
            tags["dataset.digest"] = dataset_digest
        if builds:
            tags[BUILDS_TAG] = builds
        config = self.cfg.model_dump(mode="json")
        with self.run(unit_name(stage, builds), tags, config) as active:
            if active is not None:
                import mlflow

                mlflow.log_dict(config, "config.yaml")
            yield active

    @contextlib.contextmanager
    def pipeline_run(self, name: str, parent_run_id: str | None = None) -> Iterator[Any]:
        """The run of one pipeline execution; its id is exported so stages nest under it."""
        with self.run(
            name, {"trimflow.stage": "pipeline"}, self.cfg.model_dump(mode="json"), parent_run_id
        ) as active:
            previous = os.environ.get(PARENT_RUN_ENV)
            if active is not None:
                os.environ[PARENT_RUN_ENV] = active.info.run_id
            try:
                yield active
            finally:
                if previous is None:
                    os.environ.pop(PARENT_RUN_ENV, None)
                else:
                    os.environ[PARENT_RUN_ENV] = previous


def log_variant_run(
    tracker: Tracker, variant: str, metrics: dict[str, float], stage_run: Any, artifacts: list[str]
) -> None:
    """A run per evaluated variant, sibling of the stage runs, with shared metric names."""
    if stage_run is None:
        return
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracker.uri)
    parent = os.environ.get(PARENT_RUN_ENV) or stage_run.info.run_id
    run = client.create_run(
        stage_run.info.experiment_id,
        run_name=f"variant:{variant}",
        tags={
            **stage_run.data.tags,
            "mlflow.parentRunId": parent,
            "trimflow.stage": "evaluate",
            "trimflow.variant": variant,
            "mlflow.runName": f"variant:{variant}",
        },
    )
    now = int(time.time() * 1000)
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()],
        params=[
            Param(key, str(value))
            for key, value in flatten(tracker.cfg.model_dump(mode="json")).items()
        ],
    )
    for path in artifacts:
        client.log_artifact(run.info.run_id, path)
    client.set_terminated(run.info.run_id)

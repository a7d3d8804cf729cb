"""MLflow runs: one parent per pipeline execution, a child per stage and per variant.

A run ends FINISHED, FAILED on an error, or KILLED when a signal stopped it. Runs left RUNNING
by a process that died (SIGKILL) are closed as KILLED by their pipeline run on its way out, or
by the next run of the same stage.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from trimflow.config.schema import TrackingConfig, TrimflowConfig
from trimflow.layout import unit_name
from trimflow.utils.atomic import read_json
from trimflow.utils.distributed import is_main_process
from trimflow.utils.interrupt import StageInterrupted

PARENT_RUN_ENV = "TRIMFLOW_PARENT_RUN_ID"
SQLITE_PREFIX = "sqlite:///"
log = logging.getLogger(__name__)

# The tracking vocabulary: every tag and metric name trimflow writes or searches for.
# Run tags. STAGE_TAG holds a stage name, or PIPELINE / SWEEP for the runs that group them.
STAGE_TAG = "trimflow.stage"
PIPELINE = "pipeline"
SWEEP = "sweep"
BUILDS_TAG = "trimflow.builds"  # a variant stage run (prune@pruned): the variant it builds
# A variant run of evaluate, or a registered model version: the variant it measures or holds.
VARIANT_TAG = "trimflow.variant"
DEVICE_TAG = "trimflow.device"  # where evaluate measured a variant: cpu or cuda
RUNTIME_TAG = "trimflow.runtime"  # what ran it: torch, onnxruntime or openvino
SWEEP_TAG = "trimflow.sweep"  # a sweep run: the sweep directory
RECOMMENDED_TAG = "trimflow.recommended"  # a pipeline run: the variant it recommends
OBJECTIVE_TAG = "trimflow.objective"  # a registered model version: its task metric
DATASET_DIGEST_TAG = "dataset.digest"
DVC_STAGE_TAG = "dvc.stage"
LOCK_HASH_TAG = "dvc.lock_hash"  # digest of the stage's dvc.lock entry
COMMIT_TAG = "git.commit"
DIRTY_TAG = "git.dirty"
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
# Metric names are `<prefix><name>`. evaluate's variant runs share TEST_, BENCH_, MODEL_ and
# TRAINING_PREFIX (quality on the test split, timings, footprint, cost to train) and its stage
# run logs the NER baselines as baseline/<baseline>/<metric>; prepare and tokenize log data/,
# prune prune/.
TEST_PREFIX = "test/"
BENCH_PREFIX = "bench/"
MODEL_PREFIX = "model/"
TRAINING_PREFIX = "training/"
BASELINE_PREFIX = "baseline/"
DATA_PREFIX = "data/"
PRUNE_PREFIX = "prune/"
# A pipeline run's metrics: the sweep objective, search/<objective>, and its summary,
# headline/speedup, headline/size_ratio, headline/<guard>.
SEARCH_PREFIX = "search/"
HEADLINE_PREFIX = "headline/"
# MLflow 3's experiment kind (the UI's kind selector writes this tag; "custom_model_development"
# is "Machine learning"). UIs that route on it open such an experiment on its runs table. The
# 3.17 UI routes on its own GenAI / Model training switch instead (remembered per browser;
# `?workflowType=machine_learning` in the URL selects it), which the link in
# docs/how-to/tracking.md sets.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"

# MLflow run statuses.
RUNNING, FINISHED, FAILED, KILLED = "RUNNING", "FINISHED", "FAILED", "KILLED"
INTERRUPTS = (StageInterrupted, KeyboardInterrupt)
# dvc's exit status when Ctrl-C stops it between stages.
DVC_INTERRUPTED = 252
MAX_RUN_NAME = 250  # characters MLflow's database stores


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


def changed_params(
    params: Mapping[str, Any], defaults: Mapping[str, Any], prefix: str = ""
) -> list[str]:
    """Hydra-style overrides turning `defaults` into `params`: `key=value`, `+key=value` for a
    key only in `params`, `~key` for a key only in `defaults`."""

    def text(value: Any) -> str:
        return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))

    changes = []
    for key in [*params, *(key for key in defaults if key not in params)]:
        name = f"{prefix}{key}"
        if key not in defaults:
            changes.append(f"+{name}={text(params[key])}")
        elif key not in params:
            changes.append(f"~{name}")
        elif isinstance(params[key], Mapping) and isinstance(defaults[key], Mapping):
            changes += changed_params(params[key], defaults[key], f"{name}.")
        elif params[key] != defaults[key]:
            changes.append(f"{name}={text(params[key])}")
    return changes


def git_tags() -> dict[str, str]:
    """The commit and dirty flag of the working tree (empty outside git)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        return {
            COMMIT_TAG: git("rev-parse", "HEAD"),
            DIRTY_TAG: str(bool(git("status", "--porcelain", "--untracked-files=no"))),
        }
    except (subprocess.CalledProcessError, FileNotFoundError):
        return {}


def run_name(words: Sequence[str]) -> str:
    """The short commit (`-dirty` when the tree is modified) then `words` (overrides, changed
    params, dvc arguments; "defaults" when none): what tells pipeline runs apart. A long name
    loses its middle: the commit leads, and a sweep's own overrides come last."""
    parts = list(words) or ["defaults"]
    tags = git_tags()
    if tags:
        parts.insert(0, tags[COMMIT_TAG][:7] + ("-dirty" if tags[DIRTY_TAG] == "True" else ""))
    name = " ".join(parts)
    if len(name) <= MAX_RUN_NAME:
        return name
    head = (MAX_RUN_NAME - 1) // 2
    return f"{name[:head]}…{name[head + 1 - MAX_RUN_NAME :]}"


class CommandFailed(Exception):
    """A command run under a pipeline run exited with a non-zero status `code`."""

    def __init__(self, command: str, code: int) -> None:
        super().__init__(f"{command} exited with {code}")
        self.code = code

    @property
    def signalled(self) -> bool:
        """Whether a signal ended it: killed by it (negative code), 128 + n as a shell or a
        trimflow stage reports signal n, or dvc's status after Ctrl-C."""
        return self.code < 0 or 128 < self.code < 128 + signal.NSIG or self.code == DVC_INTERRUPTED

    @property
    def exit_code(self) -> int:
        """The status to exit with: the command's, 128 + n when signal n killed it."""
        return 128 - self.code if self.code < 0 else self.code


def end_status(error: BaseException | None) -> str:
    """The status a run ends with when its block exits with `error` (None: no error)."""
    if error is None:
        return FINISHED
    if isinstance(error, INTERRUPTS) or (isinstance(error, CommandFailed) and error.signalled):
        return KILLED
    return FAILED


def _is_running(client: Any, run_id: str) -> bool:
    """Whether run `run_id` exists and is RUNNING."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.status == RUNNING
    except MlflowException:
        return False


def _close_as_killed(client: Any, run: Any) -> None:
    """End `run`, left RUNNING by a process that died, as KILLED."""
    log.info("closing run %s (%s) left RUNNING", run.info.run_id, run.info.run_name)
    client.set_terminated(run.info.run_id, KILLED)


class TrackingError(Exception):
    """The tracking server refused or could not be reached; the message says what to do."""


def explain_refusal(uri: str, error: Exception) -> TrackingError | None:
    """A TrackingError naming the server and its answer, for a refused or failed request."""
    code = re.search(r"error code (\d{3})", str(error))
    if code and code.group(1) == "401":
        return TrackingError(
            f"MLflow server {uri} answered 401 Unauthorized: set MLFLOW_TRACKING_USERNAME and"
            " MLFLOW_TRACKING_PASSWORD to an account of its basic-auth app"
        )
    if code and code.group(1) == "403":
        return TrackingError(
            f"MLflow server {uri} answered 403 Forbidden: the account in"
            " MLFLOW_TRACKING_USERNAME lacks permission on this experiment (ask its admin)"
        )
    return None


class Tracker:
    """Opens MLflow runs for a config; does nothing when `tracking.enabled` is false, or in
    the processes of rank > 0 of data-parallel training (rank 0 logs for all)."""

    def __init__(self, cfg: TrimflowConfig) -> None:
        self.cfg = cfg
        self.enabled = cfg.tracking.enabled and is_main_process()
        self.experiment_id: str | None = None
        if self.enabled:
            import mlflow

            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
            uri = tracking_uri(cfg.tracking)
            mlflow.set_tracking_uri(uri)
            name = cfg.tracking.experiment
            try:
                experiment = mlflow.get_experiment_by_name(name)
            except mlflow.exceptions.MlflowException as err:
                refusal = explain_refusal(uri, err)
                if refusal is None:
                    raise
                raise refusal from err
            if experiment is None:
                try:
                    self.experiment_id = mlflow.create_experiment(
                        name, artifact_root(uri), {EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}
                    )
                except mlflow.exceptions.MlflowException as err:
                    if err.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                    experiment = mlflow.get_experiment_by_name(name)  # a concurrent client's
            if experiment is not None:
                self.experiment_id = experiment.experiment_id
                if EXPERIMENT_KIND_TAG not in experiment.tags:  # created before the tag
                    self.client().set_experiment_tag(
                        self.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND
                    )
            mlflow.set_experiment(experiment_id=self.experiment_id)

    @property
    def uri(self) -> str:
        """The tracking URI this tracker logs to."""
        return tracking_uri(self.cfg.tracking)

    def where_to_look(self) -> str:
        """How to see the runs: a tracking server's page of the experiment, or how to start a UI
        on a local store (`?workflowType=` picks the runs table, see EXPERIMENT_KIND_TAG)."""
        if self.uri.startswith(("http://", "https://")):
            page = f"#/experiments/{self.experiment_id}?workflowType=machine_learning"
            return f"{self.uri.rstrip('/')}/{page}"
        return f"`make ui` (or mlflow ui --backend-store-uri {self.uri})"

    def client(self) -> Any:
        """An MlflowClient of this tracker's store."""
        from mlflow import MlflowClient

        return MlflowClient(self.uri)

    @contextlib.contextmanager
    def run(
        self,
        name: str,
        tags: dict[str, str],
        params: dict[str, Any] | None = None,
        parent_run_id: str | None = None,
    ) -> Iterator[Any]:
        """A run named `name` under the pipeline's parent run (env), with tags and params; it
        ends with the `end_status` of the block."""
        if not self.enabled:
            yield None
            return
        import mlflow

        parent = parent_run_id or os.environ.get(PARENT_RUN_ENV)
        all_tags = {**git_tags(), **tags}
        if os.environ.get("DVC_STAGE"):
            all_tags[DVC_STAGE_TAG] = os.environ["DVC_STAGE"]
        active = mlflow.start_run(
            run_name=name, parent_run_id=parent, nested=parent is not None, tags=all_tags
        )
        status = FINISHED
        try:
            if params:
                mlflow.log_params(flatten(params))
            yield active
        except BaseException as error:
            status = end_status(error)
            raise
        finally:
            mlflow.end_run(status)

    @contextlib.contextmanager
    def stage_run(
        self, stage: str, dataset_digest: str | None = None, builds: str | None = None
    ) -> Iterator[Any]:
        """A child run for one stage (building variant `builds`), with the flattened config;
        earlier runs of the same stage and variant that a killed process left RUNNING are
        closed first."""
        tags = {STAGE_TAG: stage}
        if dataset_digest:
            tags[DATASET_DIGEST_TAG] = dataset_digest
        if builds:
            tags[BUILDS_TAG] = builds
        config = self.cfg.model_dump(mode="json")
        if self.enabled:
            self._close_stale_runs(stage, builds)
        with self.run(unit_name(stage, builds), tags, config) as active:
            self.log_dict(config, "config.yaml")
            yield active

    def _close_stale_runs(self, stage: str, builds: str | None) -> None:
        """Close as KILLED the RUNNING runs of `stage` (building `builds`) that are dead.

        Such a run is dead when its pipeline run has ended (the pipeline is over) or is the
        pipeline this run belongs to (a pipeline runs each stage once). A run under another
        RUNNING pipeline may be alive: parallel sweep points and other terminals share the
        store, so it is left alone, as is a run without a parent (no pipeline tells whether its
        process lives; a plain `dvc repro` opens none).
        """
        client = self.client()
        parent = os.environ.get(PARENT_RUN_ENV)
        builds_filter = f"= '{builds}'" if builds else "IS NULL"
        candidates = client.search_runs(
            [self.experiment_id],
            f"tags.`{STAGE_TAG}` = '{stage}' and tags.`{BUILDS_TAG}` {builds_filter} "
            f"and attributes.status = '{RUNNING}'",
        )
        for run in candidates:
            run_parent = run.data.tags.get(PARENT_TAG)
            if run_parent and (run_parent == parent or not _is_running(client, run_parent)):
                _close_as_killed(client, run)

    @contextlib.contextmanager
    def pipeline_run(self, name: str, parent_run_id: str | None = None) -> Iterator[Any]:
        """The run of one pipeline execution; its id is exported so stages nest under it. On
        its way out it closes as KILLED the child runs still RUNNING (their process died)."""
        with self.run(
            name, {STAGE_TAG: PIPELINE}, self.cfg.model_dump(mode="json"), parent_run_id
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
                if active is not None:
                    self._close_running_children(active.info.run_id)

    def _close_running_children(self, run_id: str) -> None:
        """Close as KILLED the children of run `run_id` still RUNNING."""
        client = self.client()
        for child in client.search_runs(
            [self.experiment_id],
            f"tags.`{PARENT_TAG}` = '{run_id}' and attributes.status = '{RUNNING}'",
        ):
            _close_as_killed(client, child)

    # What a run logs. These write into the active run (the innermost `run` block) and do
    # nothing when tracking is off, so a stage logs without asking whether it is tracked.

    def log_metrics(self, metrics: Mapping[str, float], prefix: str = "") -> None:
        """Log `metrics` on the active run, each name after `prefix` (one of the *_PREFIX)."""
        if not self.enabled:
            return
        import mlflow

        mlflow.log_metrics({f"{prefix}{name}": value for name, value in metrics.items()})

    def log_dict(self, payload: dict[str, Any], file_name: str) -> None:
        """Store `payload` as the active run's artifact `file_name` (JSON or YAML by suffix)."""
        if not self.enabled:
            return
        import mlflow

        mlflow.log_dict(payload, file_name)

    def log_artifacts(self, *paths: Path) -> None:
        """Copy files, and folders under their own name, into the active run's artifacts."""
        if not self.enabled:
            return
        import mlflow

        for path in paths:
            if path.is_dir():
                mlflow.log_artifacts(str(path), path.name)
            else:
                mlflow.log_artifact(str(path))

    def tag_dvc_stage_runs(self, tag: str, by_dvc_stage: Mapping[str, str]) -> None:
        """Tag each child run of the active run that ran DVC stage `s` with `by_dvc_stage[s]`."""
        if not self.enabled:
            return
        client = self.client()
        for child in client.search_runs(
            [self.experiment_id], f"tags.`{PARENT_TAG}` = '{_active_run_id()}'"
        ):
            stage = child.data.tags.get(DVC_STAGE_TAG)
            if stage in by_dvc_stage:
                client.set_tag(child.info.run_id, tag, by_dvc_stage[stage])

    def log_headline(self, metrics_file: Path) -> None:
        """Log a pipeline's recommendation (evaluate's `metrics_file`) on the active run: the
        variant as a tag; its speedup, size ratio and guarded quality as `headline/` metrics,
        so the runs table compares pipelines without expanding them."""
        if not self.enabled:
            return
        from mlflow.entities import Metric, RunTag

        summary = read_json(metrics_file)
        recommendation = summary["recommendation"]
        variant = recommendation["variant"]
        quality = summary["variants"][variant]
        values = {
            "speedup": recommendation["speedup"],
            "size_ratio": recommendation["size_ratio"],
            **{metric: quality[metric] for metric in recommendation["guards"]},
        }
        now = int(time.time() * 1000)
        self.client().log_batch(
            _active_run_id(),
            metrics=[
                Metric(f"{HEADLINE_PREFIX}{key}", float(value), now, 0)
                for key, value in values.items()
            ],
            tags=[RunTag(RECOMMENDED_TAG, variant)],
        )


def _active_run_id() -> str:
    """The id of the innermost run this process has open."""
    import mlflow

    return mlflow.active_run().info.run_id


def log_variant_run(
    tracker: Tracker,
    variant: str,
    metrics: dict[str, float | None],
    stage_run: Any,
    artifacts: list[str],
    device: str,
    runtime: str,
) -> None:
    """A run per evaluated variant, sibling of the stage runs, with shared metric names and
    the device and runtime it was measured on as tags; a None value (a figure the variant
    lacks) is not logged."""
    if stage_run is None:
        return
    from mlflow.entities import Metric, Param

    client = tracker.client()
    parent = os.environ.get(PARENT_RUN_ENV) or stage_run.info.run_id
    run = client.create_run(
        stage_run.info.experiment_id,
        run_name=f"variant:{variant}",
        tags={
            **stage_run.data.tags,
            PARENT_TAG: parent,
            STAGE_TAG: "evaluate",
            VARIANT_TAG: variant,
            DEVICE_TAG: device,
            RUNTIME_TAG: runtime,
            RUN_NAME_TAG: f"variant:{variant}",
        },
    )
    now = int(time.time() * 1000)
    try:
        client.log_batch(
            run.info.run_id,
            metrics=[
                Metric(key, float(value), now, 0)
                for key, value in metrics.items()
                if value is not None
            ],
            params=[
                Param(key, str(value))
                for key, value in flatten(tracker.cfg.model_dump(mode="json")).items()
            ],
        )
        for path in artifacts:
            client.log_artifact(run.info.run_id, path)
    except BaseException as error:
        client.set_terminated(run.info.run_id, end_status(error))
        raise
    client.set_terminated(run.info.run_id)

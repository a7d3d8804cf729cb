"""Whole-pipeline runs: in-process via Hydra (single or multirun), or `dvc repro` wrapped."""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
from omegaconf import DictConfig

from trimflow.config.loading import (
    HYDRA_VERSION_BASE,
    ConfigError,
    compose_config,
    conf_dir,
    load_params,
    validate,
)
from trimflow.config.schema import TrimflowConfig
from trimflow.evaluation.recommend import headline
from trimflow.layout import (
    HISTORY_FILE,
    Layout,
    dvc_layout,
    keyed_layout,
    stage_keys,
    stage_units,
    unit_name,
    unit_output,
)
from trimflow.stages import run_stage
from trimflow.tracking.runs import (
    INTERRUPTS,
    LOCK_HASH_TAG,
    SEARCH_PREFIX,
    STAGE_TAG,
    SWEEP,
    SWEEP_TAG,
    CommandFailed,
    Tracker,
    changed_params,
    run_name,
)
from trimflow.utils.atomic import read_json
from trimflow.utils.interrupt import naming_stage

log = logging.getLogger(__name__)
SWEEP_STORE = Path("outputs/store")
# In a sweep folder: the MLflow run id of the sweep's parent run.
SWEEP_PARENT_FILE = "mlflow_parent_run_id"
# Tries at making a new Optuna database schema that other workers are making at the same time.
SCHEMA_ATTEMPTS = 5


def run_pipeline(cfg: TrimflowConfig, layout: Layout, last_stage: str = "report") -> None:
    """Run the stage units in order up to `last_stage`, skipping those whose (config-keyed)
    output exists.

    Sweep points running at once (joblib, submitit, nodes sharing the store) may reach the same
    unit together: a file lock per unit and config digest in `layout.work` lets one of them run
    it while the others wait, then find its output.
    """
    from filelock import FileLock

    units = stage_units(cfg)
    keys = stage_keys(cfg)
    last = max(i for i, (stage, _) in enumerate(units) if stage == last_stage)
    locks = layout.work / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    for stage, variant in units[: last + 1]:
        name = unit_name(stage, variant)
        output = unit_output(layout, stage, variant)
        if output.exists():
            log.info("%s: up to date (%s)", name, output)
            continue
        with FileLock(locks / f"{name}-{keys[name]}.lock"):
            if output.exists():
                log.info("%s: up to date, built by another worker (%s)", name, output)
                continue
            log.info("%s: running", name)
            with naming_stage(name):
                run_stage(stage, cfg, layout, variant)


def best_validation_score(model_dir: Path, metric: str) -> float:
    """The best value of `metric` in a trained variant's history.csv."""
    history = pd.read_csv(model_dir / HISTORY_FILE)
    values = history.loc[history["metric"] == metric, "value"].dropna()
    if values.empty:
        raise ValueError(f"{model_dir / HISTORY_FILE}: no '{metric}' was logged")
    return float(values.max())


def search_objective(cfg: TrimflowConfig, layout: Layout) -> float:
    """The value a sweeper maximises for a finished run, per `cfg.search.objective`."""
    metric = cfg.task.metric
    if cfg.search.objective == "validation":
        return best_validation_score(layout.finetuned, f"val/{metric}")
    variants = read_json(layout.metrics_file)["variants"].values()
    fast_enough = [
        v[metric] for v in variants if v["latency_ms_p50"] <= cfg.search.latency_budget_ms
    ]
    return float(max(fast_enough, default=0.0))


def sweep_tracker(cfg: TrimflowConfig, sweep_dir: Path) -> Tracker:
    """A sweep point's Tracker, opened under a file lock in the sweep folder: the first client
    of a fresh database store (sqlite) creates and migrates its tables, which points starting
    at once would race on."""
    from filelock import FileLock

    sweep_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(sweep_dir / "tracking.lock"):
        return Tracker(cfg)


def sweep_parent_run(tracker: Tracker, sweep_dir: str) -> str | None:
    """The id of the sweep's parent run, created by whichever point of the sweep comes first.

    Points start concurrently (joblib, submitit, several nodes sharing the sweep folder): a file
    lock in the sweep folder makes find-or-create atomic, and the id is kept beside it. A
    sweep folder logged before the file existed is found by its tag.
    """
    if not tracker.enabled:
        return None
    import mlflow
    from filelock import FileLock

    folder = Path(sweep_dir)
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / SWEEP_PARENT_FILE
    with FileLock(folder / f"{SWEEP_PARENT_FILE}.lock"):
        if record.exists():
            return record.read_text().strip()
        found = mlflow.search_runs(
            filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_dir}'",
            output_format="list",
            max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
        else:
            with tracker.run(
                run_name([SWEEP, folder.name]), {SWEEP_TAG: sweep_dir, STAGE_TAG: SWEEP}
            ) as parent:
                run_id = parent.info.run_id
        record.write_text(run_id)
        return run_id


def optuna_storage(url: str | None) -> Any:
    """The Optuna storage of a search (`hydra.sweeper.storage.url`): in memory for None, else a
    database (PostgreSQL, sqlite) whose study several sweep workers share.

    optuna 2.10.1 (the newest hydra-optuna-sweeper accepts) stamps the schema version of a new
    database on a connection it never commits, which SQLAlchemy 2 rolls back: a plain URL fails
    in create_study (AssertionError). So the schema is made on an autocommit engine first; the
    trials then go through Optuna's usual transactional storage, which locks the study row to
    number them. Workers starting at once on an empty database collide while making the schema:
    whoever loses retries and finds it made.
    """
    if url is None:
        return None
    import sqlalchemy.exc
    from optuna.storages import RDBStorage, get_storage

    for attempt in range(SCHEMA_ATTEMPTS):
        try:
            RDBStorage(url, engine_kwargs={"isolation_level": "AUTOCOMMIT"}).engine.dispose()
            break
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == SCHEMA_ATTEMPTS - 1:
                raise
            time.sleep(1)
    return get_storage(url)


@hydra.main(config_path=str(conf_dir()), config_name="config", version_base=HYDRA_VERSION_BASE)
def hydra_entry(raw: DictConfig) -> float:
    """`trimflow pipeline [overrides] [-m]`: one point of a run or sweep, all stages in-process.

    Runs the stages up to `search.last_stage` and returns the objective of `search`
    (conf/search/default.yaml) that a sweeper maximises.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    cfg = validate(raw, source="composed config")
    if cfg.trainer.data_parallel():
        raise ConfigError(
            "trainer.devices/trainer.num_nodes: `trimflow pipeline` trains in its own process;"
            " data-parallel training runs as DVC stages (dvc repro, trimflow <stage>) or"
            " under torchrun/srun (see docs/how-to/distributed.md)"
        )
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sweep_dir = Path(hydra_cfg.sweep.dir).resolve()
        tracker = sweep_tracker(cfg, sweep_dir)
        sweep_parent = sweep_parent_run(tracker, str(sweep_dir))
    else:
        tracker, sweep_parent = Tracker(cfg), None
    layout = keyed_layout(cfg, SWEEP_STORE.resolve())
    name = run_name(hydra_cfg.overrides.task)
    with tracker.pipeline_run(name, parent_run_id=sweep_parent):
        run_pipeline(cfg, layout, cfg.search.last_stage)
        value = search_objective(cfg, layout)
        tracker.log_metrics({cfg.search.objective: value}, SEARCH_PREFIX)
        if layout.metrics_file.exists():  # keyed by config: this pipeline's
            tracker.log_headline(layout.metrics_file)
    if layout.report_file.exists():
        log_summary(layout, tracker)
    log.info("objective %s = %.4f", cfg.search.objective, value)
    return value


def dvc_repro(dvc_args: list[str]) -> int:
    """Run `dvc repro` under one MLflow parent run; returns dvc's exit status.

    With a default DVC remote configured, `--pull` is added: DVC first fetches what the remote
    has (outputs of unchanged stages, run-cache entries) and computes only the rest.
    The run is named by the commit, the dvc arguments and the params that differ from conf/.
    It ends FAILED when dvc fails, KILLED when a signal stopped dvc or this process. On success
    each stage run is tagged with its lock hash and, when evaluate is up to date, the run gets
    the headline of reports/metrics.json.
    """
    cfg = load_params()
    tracker = Tracker(cfg)
    remote = default_remote()
    if remote is not None and "--pull" not in dvc_args:
        log.info(
            "DVC remote '%s' (%s) is configured: pulling what it has before computing"
            " (dvc repro --pull)",
            *remote,
        )
        dvc_args = ["--pull", *dvc_args]
    words = [shlex.join(["dvc", "repro", *dvc_args])] if dvc_args else []
    words += changed_params(cfg.model_dump(mode="json"), compose_config().model_dump(mode="json"))
    try:
        with tracker.pipeline_run(run_name(words)):
            code = _call_forwarding_signals([sys.executable, "-m", "dvc", "repro", *dvc_args])
            if code != 0:
                raise CommandFailed("dvc repro", code)
            current = _evaluate_is_current()
            tracker.tag_dvc_stage_runs(LOCK_HASH_TAG, _lock_hashes())
            if current:
                tracker.log_headline(dvc_layout().metrics_file)
    except CommandFailed as failed:
        return failed.exit_code
    if current:
        log_summary(dvc_layout(), tracker)
    if remote is not None:
        log.info("share what was computed: dvc push --run-cache (to '%s')", remote[0])
    return 0


def default_remote() -> tuple[str, str] | None:
    """(name, url) of the DVC project's default remote; None without one (or outside a DVC
    project, where `dvc repro` itself reports the error)."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        repo = Repo()
    except NotDvcRepoError:
        return None
    with repo:
        name = repo.config["core"].get("remote")
        return (name, repo.config["remote"][name]["url"]) if name else None


def log_summary(layout: Layout, tracker: Tracker) -> None:
    """The closing lines of a pipeline run: what to use, where the report is, how to look."""
    log.info(headline(read_json(layout.metrics_file)["recommendation"]))
    log.info("report: %s", layout.report_file.resolve())
    if tracker.enabled:
        log.info("runs: %s", tracker.where_to_look())


def _call_forwarding_signals(command: list[str]) -> int:
    """Run `command` in its own process group and return its exit status.

    A signal that stops this process (Ctrl-C reaches only it) is passed on to the group as
    SIGINT, which dvc handles gracefully: it lets the running stage stop on it, then exits;
    then the interruption is raised here.
    """
    process = subprocess.Popen(command, process_group=0)
    try:
        return process.wait()
    except INTERRUPTS:
        os.killpg(process.pid, signal.SIGINT)
        process.wait()
        raise


def _evaluate_is_current() -> bool:
    """Whether evaluate and every stage upstream of it are up to date (`dvc status`), so
    reports/metrics.json describes this pipeline."""
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json", "--with-deps", "evaluate"],
        capture_output=True,
        text=True,
    )
    return status.returncode == 0 and json.loads(status.stdout or "null") == {}


def _lock_hashes() -> dict[str, str]:
    """The digest of each stage's dvc.lock entry (none without a dvc.lock)."""
    import yaml

    from trimflow.utils.hashing import digest_json

    lock_path = Path("dvc.lock")
    if not lock_path.exists():
        return {}
    stages = yaml.safe_load(lock_path.read_text()).get("stages", {})
    return {stage: digest_json(entry) for stage, entry in stages.items()}

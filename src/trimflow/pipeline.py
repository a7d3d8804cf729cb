"""Whole-pipeline runs: in-process via Hydra (single or multirun), or `dvc repro` wrapped."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import hydra
import pandas as pd
from omegaconf import DictConfig

from trimflow.config.loading import HYDRA_VERSION_BASE, conf_dir, load_params, validate
from trimflow.config.schema import TrimflowConfig
from trimflow.layout import (
    HISTORY_FILE,
    Layout,
    keyed_layout,
    stage_units,
    unit_name,
    unit_output,
)
from trimflow.stages import run_stage
from trimflow.tracking.runs import Tracker
from trimflow.utils.atomic import read_json

log = logging.getLogger(__name__)
SWEEP_STORE = Path("outputs/store")
SWEEP_TAG = "trimflow.sweep"


def run_pipeline(cfg: TrimflowConfig, layout: Layout, last_stage: str = "report") -> None:
    """Run the stage units in order up to `last_stage`, skipping those whose (config-keyed)
    output exists."""
    units = stage_units(cfg)
    last = max(i for i, (stage, _) in enumerate(units) if stage == last_stage)
    for stage, variant in units[: last + 1]:
        name = unit_name(stage, variant)
        if unit_output(layout, stage, variant).exists():
            log.info("%s: up to date (%s)", name, unit_output(layout, stage, variant))
            continue
        log.info("%s: running", name)
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


def _sweep_parent(tracker: Tracker, sweep_dir: str) -> str | None:
    """The id of the sweep's parent run, created by the first point of the sweep."""
    if not tracker.enabled:
        return None
    import mlflow

    found = mlflow.search_runs(
        filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_dir}'", output_format="list", max_results=1
    )
    if found:
        return found[0].info.run_id
    with tracker.run(
        f"sweep {Path(sweep_dir).name}", {SWEEP_TAG: sweep_dir, "trimflow.stage": "sweep"}
    ) as parent:
        return parent.info.run_id


@hydra.main(config_path=str(conf_dir()), config_name="config", version_base=HYDRA_VERSION_BASE)
def hydra_entry(raw: DictConfig) -> float:
    """`trimflow pipeline [overrides] [-m]`: one point of a run or sweep, all stages in-process.

    Runs the stages up to `search.last_stage` and returns the objective of `search`
    (conf/search/default.yaml) that a sweeper maximises.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    cfg = validate(raw, source="composed config")
    hydra_cfg = HydraConfig.get()
    tracker = Tracker(cfg)
    sweep_parent = None
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sweep_parent = _sweep_parent(tracker, str(Path(hydra_cfg.sweep.dir).resolve()))
    name = " ".join(hydra_cfg.overrides.task) or "default"
    layout = keyed_layout(cfg, SWEEP_STORE.resolve())
    with tracker.pipeline_run(name, parent_run_id=sweep_parent) as active:
        run_pipeline(cfg, layout, cfg.search.last_stage)
        value = search_objective(cfg, layout)
        if active is not None:
            from mlflow import MlflowClient

            MlflowClient(tracker.uri).log_metric(
                active.info.run_id, f"search/{cfg.search.objective}", value
            )
    log.info("objective %s = %.4f", cfg.search.objective, value)
    return value


def dvc_repro(dvc_args: list[str]) -> int:
    """Run `dvc repro` under one MLflow parent run, then tag each stage run with its lock hash."""
    cfg = load_params()
    tracker = Tracker(cfg)
    with tracker.pipeline_run("dvc repro") as active:
        code = subprocess.call([sys.executable, "-m", "dvc", "repro", *dvc_args])
        if active is not None and code == 0:
            _tag_lock_hashes(tracker, active.info.run_id)
    return code


def _tag_lock_hashes(tracker: Tracker, parent_run_id: str) -> None:
    """Tag every stage run of this execution with the digest of its dvc.lock entry."""
    import mlflow
    import yaml

    from trimflow.utils.hashing import digest_json

    lock_path = Path("dvc.lock")
    if not lock_path.exists():
        return
    stages = yaml.safe_load(lock_path.read_text()).get("stages", {})
    runs = mlflow.search_runs(
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", output_format="list"
    )
    client = mlflow.MlflowClient(tracker.uri)
    for run in runs:
        stage = run.data.tags.get("dvc.stage")
        if stage in stages:
            client.set_tag(run.info.run_id, "dvc.lock_hash", digest_json(stages[stage]))

"""Whole-pipeline runs: in-process via Hydra (single or multirun), or `dvc repro` wrapped."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from trimflow.config.loading import HYDRA_VERSION_BASE, conf_dir, load_params, validate
from trimflow.config.schema import TrimflowConfig
from trimflow.layout import Layout, keyed_layout, stage_units, unit_name, unit_output
from trimflow.stages import run_stage
from trimflow.tracking.runs import Tracker
from trimflow.utils.atomic import read_json

log = logging.getLogger(__name__)
SWEEP_STORE = Path("outputs/store")
SWEEP_TAG = "trimflow.sweep"


def run_pipeline(cfg: TrimflowConfig, layout: Layout) -> dict:
    """Run every stage unit in order, skipping those whose (config-keyed) output exists."""
    for stage, variant in stage_units(cfg):
        name = unit_name(stage, variant)
        if unit_output(layout, stage, variant).exists():
            log.info("%s: up to date (%s)", name, unit_output(layout, stage, variant))
            continue
        log.info("%s: running", name)
        run_stage(stage, cfg, layout, variant)
    return read_json(layout.metrics_file)


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

    Returns the fine-tuned variant's test score on the task metric (accuracy; entity F1 for
    NER), the objective a sweeper optimises.
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
    with tracker.pipeline_run(name, parent_run_id=sweep_parent):
        metrics = run_pipeline(cfg, keyed_layout(cfg, SWEEP_STORE.resolve()))
    return float(metrics["variants"]["finetuned"][cfg.task.metric])


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

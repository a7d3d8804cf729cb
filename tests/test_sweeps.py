"""Sweeps across workers: parallel Hydra launchers sharing the keyed store and one sweep
parent run."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import mlflow_runs, smoke_pipeline_command

from trimflow.tracking.runs import FINISHED

# 2 x 2 points differing only in fine-tuning settings: prepare and tokenize are shared.
FINETUNE_GRID = ("finetune.lr=1e-4,5e-4", "finetune.weight_decay=0.0,0.01")
LAUNCHERS = {
    "joblib": ("hydra/launcher=joblib", "hydra.launcher.n_jobs=2"),
    "submitit_local": ("hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20"),
}


def stage_runs(runs: list, stage: str) -> list:
    return [r for r in runs if r.data.tags.get("trimflow.stage") == stage]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_parallel_workers_run_shared_upstream_once(launcher, tmp_path, tiny_encoder_dir):
    db = tmp_path / "mlflow.db"
    command = smoke_pipeline_command(
        tiny_encoder_dir,
        *LAUNCHERS[launcher],
        *FINETUNE_GRID,
        "search.last_stage=finetune",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        multirun=True,
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    runs = mlflow_runs(f"sqlite:///{db}", "trimflow")
    # Every point reached prepare and tokenize at about the same time; one ran each.
    assert len(stage_runs(runs, "prepare")) == 1
    assert len(stage_runs(runs, "tokenize")) == 1
    assert len(stage_runs(runs, "finetune")) == 4
    (sweep,) = stage_runs(runs, "sweep")
    points = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweep.info.run_id]
    assert len(points) == 4
    assert {p.info.status for p in points} == {FINISHED}
    assert all("search/validation" in p.data.metrics for p in points)
    models = sorted((tmp_path / "outputs" / "store" / "models").iterdir())
    assert len(models) == 4

"""Sweeps across workers: parallel Hydra launchers sharing the keyed store and one sweep
parent run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import mlflow_runs, smoke_pipeline_command

from trimflow.tracking.runs import FINISHED
from trimflow.tracking.team import create_database

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


@pytest.mark.slow
def test_optuna_workers_share_one_study_on_postgresql(tmp_path, tiny_encoder_dir, postgres_server):
    """Two `trimflow pipeline hparams_search=finetune` processes, started at once, ask and tell
    trials of one study in PostgreSQL; their points log to one MLflow store there too."""
    import optuna
    import yaml
    from mlflow import MlflowClient

    storage = create_database(postgres_server, "optuna_shared")
    tracking = create_database(postgres_server, "mlflow_sweeps")
    MlflowClient(tracking).search_experiments()  # the team's store exists, migrated, beforehand
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking}
    logs = {n: (tmp_path / f"worker{n}.log").open("w") for n in (1, 2)}  # pipes would fill up
    workers = [
        subprocess.Popen(
            smoke_pipeline_command(
                tiny_encoder_dir,
                "hparams_search=finetune",
                f"hydra.sweeper.storage.url={storage}",
                "hydra.sweeper.study_name=shared",
                "hydra.sweeper.n_trials=2",
                f"hydra.sweeper.sampler.seed={worker}",  # each worker samples its own points
                f"hydra.sweep.dir={tmp_path / f'worker{worker}'}",
            ),
            cwd=tmp_path,
            env=env,
            stdout=logs[worker],
            stderr=subprocess.STDOUT,
        )
        for worker in (1, 2)
    ]
    try:
        for n, worker in enumerate(workers, 1):
            output = logs[n].name
            assert worker.wait(timeout=600) == 0, Path(output).read_text()[-3000:]
    finally:
        for worker in workers:
            if worker.poll() is None:  # after a failure: the other worker, by its PID
                worker.kill()
                worker.wait()
        for log in logs.values():
            log.close()

    study = optuna.load_study(study_name="shared", storage=storage)
    numbers = [trial.number for trial in study.trials]
    assert sorted(numbers) == [0, 1, 2, 3]
    assert {trial.state for trial in study.trials} == {optuna.trial.TrialState.COMPLETE}
    # Each trial told the objective its point logged (matched by the params its finetune stage
    # run logged), and the study's best is the best of those.
    runs = mlflow_runs(tracking, "trimflow")
    objective = {r.info.run_id: r.data.metrics.get("search/validation") for r in runs}
    names = sorted(study.trials[0].params)
    logged = {
        tuple(float(r.data.params[n]) for n in names): objective[r.data.tags["mlflow.parentRunId"]]
        for r in stage_runs(runs, "finetune")
    }
    told = {tuple(t.params[n] for n in names): t.value for t in study.trials}
    assert len(logged) == 4 and told == logged
    assert study.best_value == max(logged.values())
    reported = [
        yaml.safe_load((tmp_path / f"worker{w}" / "optimization_results.yaml").read_text())
        for w in (1, 2)
    ]
    assert max(r["best_value"] for r in reported) == study.best_value

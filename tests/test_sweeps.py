"""Sweeps across workers: parallel Hydra launchers sharing the keyed store and one sweep
parent run."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, mlflow_runs, smoke_pipeline_command

from trimflow.tracking.runs import FINISHED
from trimflow.tracking.team import create_database, free_port

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


SLURM_PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "sinfo")


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A one-node Slurm cluster on 127.0.0.1 (munged, slurmctld, slurmd run as root from a temp
    folder, stopped by PID); yields the environment that points Slurm's commands at it."""
    missing = [name for name in SLURM_PROGRAMS if shutil.which(name) is None]
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)}): make slurm (Debian)")
    if os.geteuid() != 0:
        pytest.skip("the test cluster's daemons run as root")
    root = tmp_path_factory.mktemp("slurm")
    key, socket_path = root / "munge.key", root / "munge.sock"
    subprocess.run(["mungekey", "--create", "--keyfile", key], check=True)
    host = socket.gethostname()
    conf = root / "slurm.conf"
    conf.write_text(
        SLURM_CONF.format(
            root=root,
            host=host,
            ctld_port=free_port(),
            slurmd_port=free_port(),
            cpus=os.cpu_count(),
        )
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = []
    try:
        for command in (
            ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={socket_path}"]
            + [f"--{name}-file={root / f'munged.{name}'}" for name in ("pid", "log", "seed")],
            ["slurmctld", "-D", "-i"],
            ["slurmd", "-D", "-N", host],
        ):
            log = (root / f"{command[0]}.out").open("w")
            daemons.append(
                subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
            )
            time.sleep(1)
        deadline = time.monotonic() + 60
        while "idle" not in sinfo_state(env):
            if time.monotonic() > deadline or any(d.poll() is not None for d in daemons):
                logs = "\n".join(p.read_text()[-800:] for p in sorted(root.glob("*.out")))
                pytest.skip(f"the one-node Slurm cluster did not come up:\n{logs}")
            time.sleep(1)
        yield env
    finally:
        for daemon in reversed(daemons):
            daemon.terminate()
            daemon.wait(timeout=60)


def sinfo_state(env: dict[str, str]) -> str:
    done = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
    return done.stdout


SLURM_CONF = """\
ClusterName=trimflow-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.sock
StateSaveLocation={root}
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.mark.slow
def test_sweep_template_runs_points_as_slurm_jobs(slurm_cluster, tmp_path, tiny_encoder_dir):
    """deploy/slurm/sweep.sbatch as a user submits it: the driver job submits one job per point
    (hydra/launcher=slurm); they share upstream work and one sweep parent run."""
    db = tmp_path / "mlflow.db"
    env = {
        **slurm_cluster,
        "MLFLOW_TRACKING_URI": f"sqlite:///{db}",
        "TRIMFLOW_VENV": str(Path(sys.executable).parent.parent),
    }
    sweep_dir = tmp_path / "multirun"
    overrides = smoke_pipeline_command(
        tiny_encoder_dir,
        "finetune.lr=1e-4,5e-4",
        "search.last_stage=finetune",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=1",
        f"hydra.sweep.dir={sweep_dir}",
    )[4:]  # what follows `python -m trimflow.cli pipeline`
    submitted = subprocess.run(
        ["sbatch", "--wait", ROOT / "deploy/slurm/sweep.sbatch", *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    (driver_log,) = tmp_path.glob("trimflow-sweep-*.out")
    assert submitted.returncode == 0, driver_log.read_text()[-3000:]

    # One Slurm job array, one task per point, each with its result written back.
    results = sorted(p.name for p in (sweep_dir / ".submitit").glob("*_*/*_result.pkl"))
    assert len(results) == 2, driver_log.read_text()[-3000:]
    runs = mlflow_runs(f"sqlite:///{db}", "trimflow")
    assert len(stage_runs(runs, "prepare")) == 1
    assert len(stage_runs(runs, "finetune")) == 2
    (sweep,) = stage_runs(runs, "sweep")
    points = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweep.info.run_id]
    assert len(points) == 2 and {p.info.status for p in points} == {FINISHED}

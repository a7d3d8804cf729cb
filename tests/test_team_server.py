"""A team MLflow server: PostgreSQL backend store, S3 artifacts proxied by the server, basic auth.

Every component is real and listens on 127.0.0.1: PostgreSQL (Debian's), moto's S3 server and
`mlflow server --app-name basic-auth`. Clients hold only MLflow credentials, no S3 ones.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import E2E_LEAN, E2E_SMOKE, smoke_pipeline_command

from trimflow.config.loading import compose_config
from trimflow.tracking.runs import SWEEP_TAG
from trimflow.tracking.team import create_database, free_port, start_mlflow, stop

pytestmark = pytest.mark.slow
BUCKET = "team-mlflow"
ADMIN = ("admin", "team-server-admin-pw")


@pytest.fixture(scope="module")
def team_server(tmp_path_factory, postgres_server, s3_server):
    """The URI of `mlflow server` on PostgreSQL + S3 behind MLflow's basic-auth app."""
    s3_endpoint, s3 = s3_server
    s3.create_bucket(Bucket=BUCKET)
    port = free_port()
    server = start_mlflow(
        tmp_path_factory.mktemp("team-server"),
        create_database(postgres_server, "mlflow_team"),
        f"s3://{BUCKET}/artifacts",
        s3_endpoint,
        port,
        ADMIN,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(server.pid)
        server.wait()


def client_env(with_credentials: bool = True) -> dict[str, str]:
    """A client's environment: MLflow credentials (or none), and no S3 credentials at all."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    env.pop("MLFLOW_TRACKING_URI", None)
    if with_credentials:
        env |= {"MLFLOW_TRACKING_USERNAME": ADMIN[0], "MLFLOW_TRACKING_PASSWORD": ADMIN[1]}
    return env


def run_pipeline(encoder_dir, uri: str, experiment: str, cwd: Path, *overrides: str, **popen):
    """A smoke `trimflow pipeline` logging to the team server (a started process)."""
    command = smoke_pipeline_command(
        encoder_dir,
        *E2E_LEAN,
        f"tracking.uri={uri}",
        f"tracking.experiment={experiment}",
        *overrides,
    )
    return subprocess.Popen(
        command,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def finished(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output
    return output


@pytest.fixture
def admin_client(team_server, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
    return MlflowClient(team_server)


@pytest.fixture(scope="module")
def logged(team_server, tiny_encoder_dir, tmp_path_factory):
    """One smoke pipeline logged through the server with credentials."""
    cwd = tmp_path_factory.mktemp("client")
    output = finished(run_pipeline(tiny_encoder_dir, team_server, "team", cwd, env=client_env()))
    return output, cwd


def test_pipeline_logs_runs_artifacts_and_registry_through_the_server(
    logged, admin_client, s3_server, team_server
):
    experiment = admin_client.get_experiment_by_name("team")
    runs = admin_client.search_runs([experiment.experiment_id], max_results=500)
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId")]
    assert children and all(run.info.status == "FINISHED" for run in children)
    # Artifacts went through the server's proxy into the bucket.
    _, s3 = s3_server
    keys = [item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert any(key.endswith("metrics.json") for key in keys)
    assert all(run.info.artifact_uri.startswith("mlflow-artifacts:") for run in runs)
    model = admin_client.get_registered_model("trimflow-classification")
    assert "champion" in model.aliases
    # The run's closing lines point at the experiment's page on the server.
    page = f"{team_server}/#/experiments/{experiment.experiment_id}?workflowType=machine_learning"
    assert f"runs: {page}" in logged[0]


def test_without_credentials_the_error_names_the_server_and_401(
    team_server, tiny_encoder_dir, tmp_path
):
    process = run_pipeline(
        tiny_encoder_dir, team_server, "team", tmp_path, env=client_env(with_credentials=False)
    )
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0
    assert f"MLflow server {team_server} answered 401 Unauthorized" in output
    assert "MLFLOW_TRACKING_USERNAME" in output


def test_compare_reads_from_the_server(logged, team_server, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trimflow.cli",
            "compare",
            "--latest-pipeline",
            "--experiment",
            "team",
            "--uri",
            team_server,
            "--out",
            str(tmp_path / "compare"),
        ],
        env=client_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    table = next((tmp_path / "compare").glob("*.md")).read_text()
    assert "finetuned" in table and "distilled_pruned_openvino_int8" in table


def test_two_concurrent_pipelines_lose_no_run_or_metric(
    team_server, tiny_encoder_dir, tmp_path, admin_client
):
    processes = [
        run_pipeline(
            tiny_encoder_dir,
            team_server,
            "team-concurrent",
            tmp_path,
            f"finetune.lr={lr}",
            env=client_env(),
        )
        for lr in ("1e-4", "3e-4")
    ]
    for process in processes:
        finished(process)
    experiment = admin_client.get_experiment_by_name("team-concurrent")
    runs = admin_client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert len(parents) == 2
    for parent in parents:
        children = [
            run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id
        ]
        variants = [run for run in children if "test/accuracy" in run.data.metrics]
        smoke_set = compose_config(list(E2E_SMOKE)).variant_kinds()
        assert len(variants) == len(smoke_set), [run.info.run_name for run in children]
        assert all(run.info.status == "FINISHED" for run in children)


SWEEP_POINT = """
import sys
from trimflow.config.loading import compose_config
from trimflow.pipeline import sweep_parent_run
from trimflow.tracking.runs import Tracker

uri, experiment, sweep_dir = sys.argv[1:]
cfg = compose_config([f"tracking.uri={uri}", f"tracking.experiment={experiment}"])
print(sweep_parent_run(Tracker(cfg), sweep_dir))
"""


def test_sweep_points_starting_at_once_share_one_parent_run(team_server, tmp_path, admin_client):
    sweep_dir = str(tmp_path / "multirun" / "sweep")
    points = [
        subprocess.Popen(
            [sys.executable, "-c", SWEEP_POINT, team_server, "team-sweep", sweep_dir],
            env=client_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    ids = []
    for point in points:
        output, errors = point.communicate(timeout=300)
        assert point.returncode == 0, errors
        ids.append(output.strip().splitlines()[-1])
    assert len(set(ids)) == 1
    experiment = admin_client.get_experiment_by_name("team-sweep")
    runs = admin_client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_dir}'"
    )
    assert [run.info.run_id for run in runs] == ids[:1]


def test_team_up_starts_the_stack_and_down_stops_it(tmp_path):
    """`trimflow team up` / `down` as a user runs them: real processes, stopped by PID."""
    folder, port = tmp_path / "team", free_port()
    cli = [sys.executable, "-m", "trimflow.cli", "team"]
    started = subprocess.run(
        [*cli, "up", "--dir", str(folder), "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert started.returncode == 0, started.stderr
    state = json.loads((folder / "team.json").read_text())
    try:
        settings = dict(
            line.removeprefix("export ").split("=", 1)
            for line in (folder / "client.env").read_text().splitlines()
        )
        assert settings["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{port}"
        assert (folder / "client.env").stat().st_mode & 0o077 == 0  # credentials: owner only
        search = (
            f"{settings['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search?max_results=1"
        )
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(search, timeout=10)
        request = urllib.request.Request(search)
        token = base64.b64encode(
            f"{settings['MLFLOW_TRACKING_USERNAME']}:{settings['MLFLOW_TRACKING_PASSWORD']}".encode()
        ).decode()
        request.add_header("Authorization", f"Basic {token}")
        assert urllib.request.urlopen(request, timeout=10).status == 200
    finally:
        stopped = subprocess.run(
            [*cli, "down", "--dir", str(folder)], capture_output=True, text=True, timeout=300
        )
    assert stopped.returncode == 0, stopped.stderr
    for part in ("postgres", "s3", "mlflow"):
        with pytest.raises(ProcessLookupError):
            os.kill(state[part]["pid"], 0)
    assert not (folder / "team.json").exists() and not (folder / "client.env").exists()

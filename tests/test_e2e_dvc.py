"""The smoke pipeline through real `dvc repro` in a temporary copy of the project."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import mlflow_runs

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["prepare", "tokenize", "finetune", "prune", "quantize", "evaluate", "report"]
pytestmark = pytest.mark.e2e


def project_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [name for name in listed if (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A git-initialised copy of the project with params.yaml composed for the smoke preset."""
    copy = tmp_path_factory.mktemp("project")
    for name in project_files():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, copy / name)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{copy / 'mlflow.db'}",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }

    def sh(*command: str) -> str:
        done = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    sh("git", "init", "-q")
    sh("trimflow", "params", "experiment=smoke")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "copy")
    first_run = sh("trimflow", "repro")
    return copy, sh, first_run


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def test_first_repro_runs_every_stage_and_writes_outputs(project):
    copy, _, output = project
    assert ran_stages(output) == STAGES
    metrics = json.loads((copy / "reports/metrics.json").read_text())
    assert set(metrics["variants"]) == {"finetuned", "pruned", "quantized", "pruned_quantized"}
    assert (copy / "reports/report.html").stat().st_size > 10_000
    lock = (copy / "dvc.lock").read_text()
    assert all(f"  {stage}:" in lock for stage in STAGES)
    assert not list(copy.glob("**/.*.tmp-*")), "temporary stage outputs were left behind"


def test_second_repro_runs_nothing(project):
    _, sh, _ = project
    output = sh("dvc", "repro")
    assert ran_stages(output) == []


def test_every_mlflow_run_of_the_repro_is_nested_and_tagged(project):
    copy, _, _ = project
    runs = mlflow_runs(f"sqlite:///{copy / 'mlflow.db'}", "trimflow")
    parents = [r for r in runs if r.data.tags.get("trimflow.stage") == "pipeline"]
    assert len(parents) == 1
    children = [r for r in runs if r is not parents[0]]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    stage_runs = [r for r in children if "trimflow.variant" not in r.data.tags]
    assert sorted(r.data.tags["dvc.stage"] for r in stage_runs) == sorted(STAGES)
    for run in children:
        assert run.data.tags["git.commit"] and run.data.tags["dataset.digest"]
        assert run.data.tags["dvc.lock_hash"] if run in stage_runs else run.data.metrics


def test_dvc_exp_run_with_prune_override_reruns_only_prune_onwards(project):
    copy, sh, _ = project
    output = sh("dvc", "exp", "run", "-S", "experiment=smoke", "-S", "prune.sparsity=0.3")
    assert ran_stages(output) == STAGES[3:]
    assert "sparsity: 0.3" in (copy / "params.yaml").read_text()

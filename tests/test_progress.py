"""Quiet output: plain progress lines where no bar can draw, and no third-party noise."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

import torch
import yaml
from helpers import build_tiny_bert, quiet_trainer
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from trimflow.layout import dvc_layout
from trimflow.models.module import ClassifierModule
from trimflow.models.progress import PlainProgress
from trimflow.stages import prepare, tokenize
from trimflow.utils import progress as progress_module
from trimflow.utils.progress import duration, progress

# What stages printed before trimflow.utils.quiet, verbatim.
NOISE = (
    "Failed to load",  # torchao's CUDA kernels
    "Detected no triton",  # torchao
    "is an Enum subclass",  # torch pytree, on torchao's import
    "`isinstance(treespec, LeafSpec)` is deprecated",  # Lightning's pytree helper
    "💡 Tip",  # Lightning's litlogger advert
    "litlogger",
    "GPU available",  # Lightning's rank-zero info lines
    "Seed set to",
    "`weights_only` was not set",
    "INFO: ",  # Lightning's own console handler: each of its lines came twice
    "Loading weights",  # transformers' bars
    "Writing model shards",
    "Saving the dataset",  # datasets' bar
    "it/s]",  # any tqdm bar
)


class Tick(Callback):
    """A clock for `PlainProgress` that advances one second per training batch."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.now += 1.0


def fit_with_progress(tiny_batches, every_n_seconds: float, caplog) -> list[str]:
    """The lines `PlainProgress` logs over 3 epochs of 2 batches (6 steps, 1 s each)."""
    batches = [{**batch, "labels": torch.tensor([0, 1, 2, 0])} for batch in tiny_batches]
    loader = DataLoader(batches, batch_size=None)
    clock = Tick()
    log = logging.getLogger("test.progress")
    plain = PlainProgress(log, "val/accuracy", every_n_seconds, clock)
    trainer = quiet_trainer(max_epochs=3, callbacks=[clock, plain])
    with caplog.at_level(logging.INFO, logger=log.name):
        trainer.fit(ClassifierModule(build_tiny_bert(), lr=1e-3), loader, loader)
    return [record.getMessage() for record in caplog.records if record.name == log.name]


def test_plain_progress_logs_step_epoch_loss_rate_and_time_left_at_its_interval(
    tiny_batches, caplog
):
    lines = fit_with_progress(tiny_batches, 2.0, caplog)
    assert lines[0] == "training 6 steps, max_epochs 3, on cpu (32-true)"
    steps = [line for line in lines if " loss " in line]
    assert len(steps) == 3, lines  # at steps 2, 4, 6: every 2 s of the fake clock
    for epoch, (line, left) in enumerate(zip(steps, ("4s", "2s", "0s"), strict=True), 1):
        pattern = rf"epoch {epoch}/3 step {2 * epoch}/6 loss \d+\.\d{{3}}, 1\.0 it/s, {left} left"
        assert re.fullmatch(pattern, line), line
    validations = [line for line in lines if "val/accuracy" in line]
    assert [line.rsplit(" ", 1)[0] for line in validations] == [
        f"epoch {epoch}/3 step {2 * epoch}/6 val/accuracy" for epoch in (1, 2, 3)
    ]
    assert lines[-1] == "trained to step 6/6 in 6s"


def test_plain_progress_waits_its_interval_between_step_lines(tiny_batches, caplog):
    lines = fit_with_progress(tiny_batches, 5.0, caplog)
    steps = [re.sub(r"loss [\d.]+", "loss L", line) for line in lines if " loss " in line]
    assert steps == ["epoch 3/3 step 5/6 loss L, 1.0 it/s, 1s left"]


def test_progress_off_a_terminal_logs_plain_lines_and_yields_every_item(monkeypatch, caplog):
    monkeypatch.setattr(progress_module, "on_terminal", lambda: False)
    log = logging.getLogger("test.progress")
    with caplog.at_level(logging.INFO, logger=log.name):
        assert list(progress(["a", "b", "c"], "score", log, unit="variant")) == ["a", "b", "c"]
    assert caplog.messages == ["score: 3 variants in 0s"]
    assert [duration(s) for s in (42, 130, 3900)] == ["42s", "2m10s", "1h05m"]


def test_finetune_into_a_file_shows_progress_lines_and_no_third_party_noise(tiny_config, tmp_path):
    # The bar is on in the config: plain lines come because the output is no terminal.
    cfg = tiny_config("trainer.enable_progress_bar=true")
    layout = dvc_layout(tmp_path)
    prepare.run(cfg, layout)
    tokenize.run(cfg, layout)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    log = tmp_path / "finetune.log"
    with open(log, "w") as output:
        subprocess.run(
            [sys.executable, "-m", "trimflow.cli", "finetune"],
            cwd=tmp_path,
            stdout=output,
            stderr=output,
            check=True,
        )
    text = log.read_text()
    assert [noise for noise in NOISE if noise in text] == [], text
    lines = [line.split(" ", 1)[1] for line in text.splitlines()]  # without the time
    assert lines[0].startswith("trimflow.models.training: training 7 steps, max_epochs 1, on cpu")
    for expected in (
        "trimflow.models.training: epoch 1/1 step 7/7 val/accuracy ",
        "trimflow.models.training: trained to step 7/7 in ",
        "trimflow.stages.finetune: finetuned 7 steps",
    ):
        assert sum(line.startswith(expected) for line in lines) == 1, text

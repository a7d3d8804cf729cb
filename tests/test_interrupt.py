"""SIGTERM/SIGINT: a stage exits 128 + signal, keeps nothing half-written, and resumes exactly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import E2E_LEAN, signal_once_training, smoke_pipeline_command
from safetensors.torch import load_file

from trimflow.config.loading import compose_config
from trimflow.layout import dvc_layout
from trimflow.models.distillation import DistillationClassifier
from trimflow.models.module import ClassifierModule
from trimflow.models.training import LAST_CHECKPOINT
from trimflow.stages import distill, finetune, prepare, prune, quantize, tokenize
from trimflow.utils.interrupt import StageInterrupted, signals_raise

HISTORY = "history.csv"
# Two epochs of 14 steps: a signal mid-epoch 2 tests the sampler's epoch and position.
TINY_TRAINING = ["finetune.max_epochs=2", "finetune.lr=5e-4", "finetune.batch_size=8"]


@pytest.fixture(scope="module")
def tiny_cfg(tiny_encoder_dir, tracking_db):
    return compose_config(
        [
            "experiment=smoke",
            f"model.name={tiny_encoder_dir}",
            f"tracking.uri={tracking_db}",
            "tracking.experiment=interrupt",
            "dataset.max_train_samples=120",
            "dataset.max_test_samples=40",
            *TINY_TRAINING,
        ]
    )


@pytest.fixture(scope="module")
def finetuned_root(tiny_cfg, tmp_path_factory):
    """A project root with prepared and tokenized data and an uninterrupted fine-tune."""
    root = tmp_path_factory.mktemp("finetuned")
    layout = dvc_layout(root)
    for stage in (prepare, tokenize, finetune):
        stage.run(tiny_cfg, layout)
    return root


def copy_project(source, target, *keep: str):
    """A layout at `target` holding the `keep` folders of the project at `source`."""
    for name in keep:
        shutil.copytree(source / name, target / name)
    return dvc_layout(target)


def signal_at_step(monkeypatch, module_class, step: int, signum: int) -> None:
    """Send `signum` to this process during the training step at global step `step`."""
    original = module_class.training_step

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == step:
            os.kill(os.getpid(), signum)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(module_class, "training_step", training_step)


def interrupt_and_resume(monkeypatch, run, root, module_class, step, signum):
    """Run a stage that a signal stops at `step`, check what it left in `root`, rerun it."""
    layout = dvc_layout(root)
    with monkeypatch.context() as patch:
        signal_at_step(patch, module_class, step, signum)
        with pytest.raises(StageInterrupted) as stopped:
            run()
    assert stopped.value.exit_code == 128 + signum
    assert f"at step {step + 1}" in str(stopped.value)
    (checkpoint,) = layout.work.glob(f"*/{LAST_CHECKPOINT}")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert saved["global_step"] == step + 1, "the checkpoint is the step the signal stopped"
    assert not list(root.glob("**/.*.tmp-*")), "a temporary output was left behind"
    run()
    assert not checkpoint.exists(), "the work dir is removed once the output is saved"


def same_training(left, right) -> bool:
    """Two trained model folders hold the same weights and the same loss and metric curves
    (the weights alone can be an early best checkpoint, from before an interruption)."""
    weights = [load_file(folder / "model.safetensors") for folder in (left, right)]
    same_weights = weights[0].keys() == weights[1].keys() and all(
        torch.equal(weights[0][key], weights[1][key]) for key in weights[0]
    )
    return same_weights and (left / HISTORY).read_text() == (right / HISTORY).read_text()


def test_signalled_finetune_resumes_at_its_step_to_the_same_training(
    tiny_cfg, finetuned_root, tmp_path, monkeypatch
):
    layout = copy_project(finetuned_root, tmp_path, "data")
    # Step 19 is in the second epoch (14 steps each): the sampler resumes mid-epoch 2.
    interrupt_and_resume(
        monkeypatch,
        lambda: finetune.run(tiny_cfg, layout),
        tmp_path,
        ClassifierModule,
        19,
        signal.SIGTERM,
    )
    summary = json.loads((layout.finetuned / "training.json").read_text())
    assert summary["resumed_from_step"] == 20
    assert summary["global_step"] == 28
    assert same_training(layout.finetuned, dvc_layout(finetuned_root).finetuned)


@pytest.mark.parametrize(
    ("stage", "variant", "module_class", "signum"),
    [
        (prune, "pruned", ClassifierModule, signal.SIGINT),
        (distill, "distilled", DistillationClassifier, signal.SIGTERM),
    ],
    ids=["prune-recovery", "distill"],
)
def test_signalled_variant_training_resumes_to_the_same_model(
    stage, variant, module_class, signum, tiny_cfg, finetuned_root, tmp_path, monkeypatch
):
    results = {}
    for name in ("uninterrupted", "interrupted"):
        root = tmp_path / name
        layout = copy_project(finetuned_root, root, "data", "models")

        def run(layout=layout):
            stage.run(tiny_cfg, layout, variant)

        if name == "interrupted":
            interrupt_and_resume(monkeypatch, run, root, module_class, 1, signum)
        else:
            run()
        results[name] = layout.model_dir(variant)
    summary = json.loads((results["interrupted"] / "training.json").read_text())
    assert summary["resumed_from_step"] == 2
    assert same_training(results["interrupted"], results["uninterrupted"])


def test_signal_outside_training_stops_the_stage_with_nothing_written(
    tiny_cfg, finetuned_root, tmp_path, monkeypatch
):
    layout = copy_project(finetuned_root, tmp_path, "data", "models")
    written = []
    dump = json.dump

    def dump_after_a_signal(*args, **kwargs):
        written.append(args[1])
        os.kill(os.getpid(), signal.SIGTERM)
        return dump(*args, **kwargs)

    # The first JSON file quantize writes into its (temporary) variant folder.
    monkeypatch.setattr(json, "dump", dump_after_a_signal)
    with signals_raise(), pytest.raises(StageInterrupted) as stopped:
        quantize.run(tiny_cfg, layout, "onnx_static_int8")
    assert written and stopped.value.exit_code == 143
    assert not layout.model_dir("onnx_static_int8").exists()
    assert not list(tmp_path.glob("**/.*.tmp-*")), "a temporary output was left behind"


@pytest.mark.slow
def test_sigterm_to_trimflow_finetune_exits_143_naming_the_stage_and_how_to_resume(
    tiny_cfg, finetuned_root, tmp_path
):
    layout = copy_project(finetuned_root, tmp_path, "data")
    params = tiny_cfg.model_dump(mode="json")
    params["finetune"].update(max_epochs=6, checkpoint_every_n_steps=5, early_stopping_patience=6)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    command = [sys.executable, "-m", "trimflow.cli", "finetune"]
    code, output = signal_once_training(command, tmp_path, layout.work, signal.SIGTERM)
    assert code == 143, output[-3000:]
    assert "finetune interrupted by SIGTERM at step" in output
    assert "Rerun `trimflow finetune`" in output
    assert not layout.finetuned.exists()
    (checkpoint,) = layout.work.glob(f"*/{LAST_CHECKPOINT}")
    stopped_at = torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"]

    subprocess.run(command, cwd=tmp_path, check=True, capture_output=True)
    summary = json.loads((layout.finetuned / "training.json").read_text())
    assert summary["resumed_from_step"] == stopped_at
    assert summary["global_step"] == 6 * 14


@pytest.mark.slow
def test_sigint_to_a_sweep_point_exits_130_and_keeps_no_model(tmp_path, tiny_encoder_dir):
    command = smoke_pipeline_command(
        tiny_encoder_dir,
        *E2E_LEAN,
        "finetune.max_epochs=50",
        "finetune.lr=1e-4,5e-4",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        multirun=True,
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    store = tmp_path / "outputs" / "store"
    code, output = signal_once_training(command, tmp_path, store / "work", signal.SIGINT, env)
    assert code == 130, output[-3000:]
    assert "finetune interrupted by SIGINT at step" in output
    assert "Rerun `trimflow pipeline -m experiment=smoke" in output
    assert not list((store / "models").glob("finetuned-*"))
    assert list((store / "work").glob(f"*/{LAST_CHECKPOINT}"))

"""Data-parallel training on CPU (gloo), as real processes: Lightning's launcher on one host,
torchrun across two hosts (network namespaces).

Two processes with batch 8 must train what one process trains with batch 16: the sampler
gives them halves of the same global batches and DDP averages their gradients. The encoder
has no dropout, so the runs differ only by floating-point summation order.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from helpers import mlflow_runs, signal_once_training
from safetensors.torch import load_file
from transformers import BertModel

from trimflow.config.loading import compose_config
from trimflow.layout import HISTORY_FILE, dvc_layout
from trimflow.stages import prepare, tokenize
from trimflow.tracking.runs import FINISHED, STAGE_TAG

pytestmark = pytest.mark.slow
ONE_PROCESS = ["finetune.batch_size=16"]
TWO_PROCESSES = [
    "finetune.batch_size=8",
    "trainer.strategy=ddp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
]
IDENTICAL = "2 processes ended training with identical weights"
# Weights of the 1- and 2-process runs: same up to float summation order.
WEIGHT_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def dropout_free_encoder(tmp_path_factory, packaged_tokenizer):
    """The tiny BERT encoder without dropout: training is then a function of the batches."""
    from helpers import build_tiny_bert

    config = build_tiny_bert().config
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    path = tmp_path_factory.mktemp("dropout-free-encoder")
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    packaged_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def settings(dropout_free_encoder, tmp_path_factory):
    """Config overrides shared by every run: 2 epochs of 14 global batches on the smoke data."""
    store = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    return [
        "experiment=smoke",
        f"model.name={dropout_free_encoder}",
        "dataset.max_train_samples=240",
        "dataset.max_test_samples=48",
        "finetune.max_epochs=2",
        "finetune.lr=3e-3",
        # Class weights make each process's loss a weighted mean of its own half.
        "finetune.class_balance=0",
        f"tracking.uri=sqlite:///{store}",
    ]


@pytest.fixture(scope="module")
def tokenized(settings, tmp_path_factory):
    """A project root with prepared and tokenized data."""
    root = tmp_path_factory.mktemp("tokenized")
    cfg = compose_config(settings)
    for stage in (prepare, tokenize):
        stage.run(cfg, dvc_layout(root))
    return root


def project(tokenized: Path, target: Path, settings: list[str], *overrides: str) -> Path:
    """`target` with the tokenized data and a params.yaml of `settings` + `overrides`, logging
    to its own MLflow experiment."""
    shutil.copytree(tokenized / "data", target / "data")
    params = compose_config([*settings, f"tracking.experiment={target.name}", *overrides])
    (target / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    return target


def trimflow(cwd: Path, *args: str, prefix: tuple[str, ...] = ()) -> str:
    """Run `trimflow <args>` in `cwd` (after `prefix`, a launcher); assert it succeeds."""
    log = cwd / "command.log"
    command = [*prefix, sys.executable, "-m", "trimflow.cli", *args]
    with open(log, "w") as output:
        code = subprocess.run(command, cwd=cwd, stdout=output, stderr=output, timeout=600)
    assert code.returncode == 0, f"{command} failed:\n{log.read_text()[-4000:]}"
    return log.read_text()


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def max_weight_difference(first: Path, second: Path) -> float:
    a, b = weights(first), weights(second)
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


def training_summary(model_dir: Path) -> dict:
    return json.loads((model_dir / "training.json").read_text())


def stage_runs(settings: list[str], root: Path, stage: str) -> list:
    uri = compose_config(settings).tracking.uri
    return [r for r in mlflow_runs(uri, root.name) if r.data.tags.get(STAGE_TAG) == stage]


@pytest.fixture(scope="module")
def one_process(tokenized, settings, tmp_path_factory):
    root = project(tokenized, tmp_path_factory.mktemp("one"), settings, *ONE_PROCESS)
    trimflow(root, "finetune")
    return root


@pytest.fixture(scope="module")
def two_processes(tokenized, settings, tmp_path_factory):
    root = project(tokenized, tmp_path_factory.mktemp("two"), settings, *TWO_PROCESSES)
    return root, trimflow(root, "finetune")


def test_two_processes_train_what_one_process_trains_with_the_global_batch(
    one_process, two_processes
):
    root, output = two_processes
    assert IDENTICAL in output
    one, two = dvc_layout(one_process).finetuned, dvc_layout(root).finetuned
    # The learning-rate schedule counts global steps: 14 per epoch in both runs.
    assert training_summary(two)["global_step"] == training_summary(one)["global_step"] == 28
    for summary in map(training_summary, (one, two)):  # every process's samples are counted
        assert summary["train_s"] * summary["train_samples_per_s"] == pytest.approx(2 * 216, 0.01)
        assert summary["peak_train_mem_mb"] > 0  # two processes: the larger peak
    assert training_summary(two)["trainable_params"] == training_summary(one)["trainable_params"]
    assert max_weight_difference(one, two) < WEIGHT_TOLERANCE
    # Validation metrics are reduced over both halves of the split, not one rank's half.
    history = [pd.read_csv(model / HISTORY_FILE) for model in (one, two)]
    validation = [h[h["metric"].str.startswith("val/")].reset_index(drop=True) for h in history]
    assert len(validation[1]) == len(validation[0]) == 2 * 3  # loss, accuracy, macro-F1 x 2
    assert (validation[1][["step", "metric"]] == validation[0][["step", "metric"]]).all().all()
    assert validation[1]["value"].to_numpy() == pytest.approx(validation[0]["value"], abs=1e-4)
    best = [training_summary(model)["best_score"] for model in (one, two)]
    assert abs(best[1] - best[0]) * 100 <= 0.3


def test_only_rank_zero_logs_one_run_and_one_history(two_processes, settings):
    root, _ = two_processes
    (run,) = stage_runs(settings, root, "finetune")
    assert run.info.status == FINISHED and "val/macro_f1" in run.data.metrics
    history = pd.read_csv(dvc_layout(root).finetuned / HISTORY_FILE)
    assert not history.duplicated(["step", "metric"]).any()


def test_pruning_recovery_and_distillation_train_on_two_processes(two_processes, settings):
    root, _ = two_processes
    layout = dvc_layout(root)
    for stage, variant in (("prune", "pruned"), ("distill", "distilled")):
        output = trimflow(root, stage, "--variant", variant)
        assert IDENTICAL in output, output[-3000:]
        assert training_summary(layout.model_dir(variant))["global_step"] > 0
        (run,) = stage_runs(settings, root, stage)
        assert run.info.status == FINISHED


def test_a_signal_to_rank_zero_stops_both_processes_and_the_rerun_resumes(
    tokenized, settings, two_processes, tmp_path
):
    root = project(
        tokenized, tmp_path, settings, *TWO_PROCESSES, "finetune.checkpoint_every_n_steps=5"
    )
    layout = dvc_layout(root)
    command = [sys.executable, "-m", "trimflow.cli", "finetune"]
    # Only the launched process (rank 0) is signalled; rank 1 stops on their joint decision.
    code, output = signal_once_training(command, root, layout.work, signal.SIGTERM)
    assert code == 143, output[-3000:]
    assert output.count("finetune interrupted by SIGTERM at step") == 1  # rank 0 says it
    assert not layout.finetuned.exists()
    (checkpoint,) = layout.work.glob("*/last.ckpt")
    stopped_at = torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"]

    assert IDENTICAL in trimflow(root, "finetune")
    assert training_summary(layout.finetuned)["resumed_from_step"] == stopped_at
    uninterrupted = dvc_layout(two_processes[0]).finetuned
    assert max_weight_difference(layout.finetuned, uninterrupted) == 0.0


NAMESPACES = ("trimflow-host0", "trimflow-host1")
ADDRESSES = ("10.77.0.1", "10.77.0.2")


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair: (namespace, interface, address) each."""
    if shutil.which("ip") is None:
        pytest.skip("two simulated hosts need iproute2's `ip`")
    links = [f"tfveth{i}" for i in range(2)]
    setup = [
        *[["ip", "netns", "add", name] for name in NAMESPACES],
        ["ip", "link", "add", links[0], "type", "veth", "peer", "name", links[1]],
    ]
    for namespace, link, address in zip(NAMESPACES, links, ADDRESSES, strict=True):
        setup += [
            ["ip", "link", "set", link, "netns", namespace],
            ["ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", link],
            ["ip", "-n", namespace, "link", "set", link, "up"],
            ["ip", "-n", namespace, "link", "set", "lo", "up"],
        ]
    try:
        for command in setup:
            made = subprocess.run(command, capture_output=True, text=True)
            if made.returncode != 0:
                pytest.skip(
                    f"cannot make network namespaces here ({' '.join(command)}:"
                    f" {made.stderr.strip()}); they need root and CAP_SYS_ADMIN"
                )
        yield list(zip(NAMESPACES, links, ADDRESSES, strict=True))
    finally:
        for name in NAMESPACES:  # deleting a namespace deletes its end of the veth pair
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_torchrun_across_two_hosts_trains_what_one_process_trains(
    tokenized, settings, one_process, two_hosts, tmp_path
):
    root = project(
        tokenized,
        tmp_path,
        settings,
        "finetune.batch_size=8",
        "trainer.strategy=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.num_nodes=2",
    )
    master = two_hosts[0][2]
    logs = [tmp_path / f"host{node}.log" for node in range(2)]
    with contextlib.ExitStack() as files:
        processes = []
        for node, (namespace, link, _) in enumerate(two_hosts):
            output = files.enter_context(open(logs[node], "w"))
            command = [
                *("ip", "netns", "exec", namespace, "env", f"GLOO_SOCKET_IFNAME={link}"),
                *(sys.executable, "-m", "torch.distributed.run", "--nnodes=2"),
                *("--nproc-per-node=1", f"--node-rank={node}"),
                *(f"--master-addr={master}", "--master-port=29533"),
                *("-m", "trimflow.cli", "finetune"),
            ]
            processes.append(subprocess.Popen(command, cwd=root, stdout=output, stderr=output))
        codes = [process.wait(timeout=600) for process in processes]
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    assert IDENTICAL in logs[0].read_text()
    assert max_weight_difference(dvc_layout(root).finetuned, dvc_layout(one_process).finetuned) < (
        WEIGHT_TOLERANCE
    )
    (run,) = stage_runs(settings, root, "finetune")
    assert run.info.status == FINISHED


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_ddp_trains_on_every_visible_gpu(tokenized, settings, tmp_path):
    """NCCL data parallelism over all the GPUs torch sees, in bf16-mixed."""
    gpus = torch.cuda.device_count()
    root = project(
        tokenized,
        tmp_path,
        settings,
        "finetune.batch_size=8",
        "trainer.strategy=ddp",
        "trainer.accelerator=gpu",
        f"trainer.devices={gpus}",
    )
    output = trimflow(root, "finetune")
    assert "bf16-mixed" in output
    summary = training_summary(root / "models" / "finetuned")
    assert summary["global_step"] > 0 and 0 < summary["train_mfu"] < 1

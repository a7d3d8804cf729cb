"""GPU readiness: the device config, training FLOPs and MFU, the precision chosen, gradient
accumulation and torch.compile on any machine; every variant on the GPU where there is one."""

from __future__ import annotations

import json

import lightning as L
import pandas as pd
import pytest
import torch
from helpers import build_tiny_bert, quiet_trainer
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertForTokenClassification

from trimflow.config.loading import ConfigError, compose_config
from trimflow.config.schema import TrainerConfig
from trimflow.evaluation.devices import cpu_reason, onnx_runs_on_cuda, variant_devices
from trimflow.evaluation.inputs import throughput_batch_size
from trimflow.models.flops import (
    gpu_peak_flops,
    measured_matmul_flops,
    non_embedding_counts,
    training_flops,
)
from trimflow.models.loading import load_base_classifier
from trimflow.models.module import ClassifierModule
from trimflow.models.training import TrainingPace, resolve_precision

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


# --- config ------------------------------------------------------------------------------------


@needs_no_cuda
def test_evaluate_device_cuda_without_a_gpu_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"evaluate\.device: .*no CUDA device"):
        compose_config(["evaluate.device=cuda"])


@needs_no_cuda
def test_auto_evaluates_every_variant_on_the_cpu_with_the_cpu_throughput_batch():
    cfg = compose_config(["evaluate.device=auto"])
    assert set(variant_devices(cfg).values()) == {"cpu"}
    assert throughput_batch_size(cfg.evaluate) == 32
    fixed = compose_config(["evaluate.throughput.batch_size=16"]).evaluate
    assert throughput_batch_size(fixed) == 16


def test_cpu_only_kernels_are_named_and_gpu_capable_variants_are_not():
    cfg = compose_config(["experiment=zoo"])
    kinds = cfg.variant_kinds()
    reasons = {name: cpu_reason(cfg, name, kind) for name, kind in kinds.items()}
    assert "CPU only" in reasons["quantized"] and "CPU only" in reasons["pruned_quantized"]
    assert reasons["finetuned"] is None and reasons["lora"] is None and reasons["bf16"] is None
    onnx_reason = reasons["onnx_int8"]
    assert (onnx_reason is None) == onnx_runs_on_cuda()


def test_precision_is_fp32_on_the_cpu_and_explicit_settings_win():
    cpu = TrainerConfig.model_validate(
        {
            "accelerator": "cpu",
            "devices": 1,
            "strategy": "auto",
            "num_nodes": 1,
            "num_workers": 0,
            "deterministic": True,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
        }
    )
    assert resolve_precision(cpu) == "32-true"
    assert resolve_precision(cpu.model_copy(update={"precision": "bf16-mixed"})) == "bf16-mixed"


def test_a_base_model_saved_in_bf16_trains_from_fp32_master_weights(tmp_path):
    """Hub checkpoints often hold bf16 weights: the base model still loads in fp32, and mixed
    precision stays the trainer's choice."""
    from transformers import BertModel

    BertModel(build_tiny_bert().config).to(torch.bfloat16).save_pretrained(tmp_path)
    model = load_base_classifier(str(tmp_path), ["a", "b"])
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}


# --- FLOPs and MFU -----------------------------------------------------------------------------


def test_non_embedding_weights_and_training_flops_equal_a_hand_count():
    model = build_tiny_bert()  # hidden 32, 2 layers, FFN 64, 3 labels
    d, ffn, layers, labels = 32, 64, 2, 3
    attention = 4 * (d * d + d) + 2 * d  # Q, K, V, output projection; LayerNorm
    feed_forward = (d * ffn + ffn) + (ffn * d + d) + 2 * d
    n = layers * (attention + feed_forward) + 2 * d + (d * d + d) + (d * labels + labels)
    assert non_embedding_counts(model) == (n, n)
    lengths = [5, 9]
    full = sum(6 * n * t + 12 * layers * d * t * t for t in lengths)
    assert training_flops(lengths, n, n, layers, d) == full
    # Frozen weights skip their weight gradients: 4 N instead of 6 N per token.
    assert training_flops(lengths, n, 0, layers, d) == full - 2 * n * sum(lengths)


@pytest.mark.parametrize("head", ["sequence", "token"])
@pytest.mark.parametrize("trained", ["all", "biases"])
def test_training_flops_agree_with_torch_flop_counter(head, trained):
    """The formula against torch's count of a real forward + backward: within 11% on a model
    this small (it counts biases and LayerNorm weights as matrix weights, and a sequence
    classifier's pooler for every token)."""
    model = build_tiny_bert()
    if head == "token":
        model = BertForTokenClassification(model.config)
    model.train()
    if trained == "biases":  # BitFit-like: gradients flow through every layer
        for name, parameter in model.named_parameters():
            parameter.requires_grad_("classifier" in name or name.endswith("bias"))
    lengths = [20, 31]
    with FlopCounterMode(display=False) as counter:
        for length in lengths:
            ids = torch.randint(1000, 2000, (1, length))
            model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.sum().backward()
    predicted = training_flops(lengths, *non_embedding_counts(model), 2, 32)
    assert predicted == pytest.approx(counter.get_total_flops(), rel=0.11)


def test_measuring_the_cpu_peak_leaves_the_global_rng_alone():
    """Dropout draws from the global RNG: measuring at train start must not move it."""
    state = torch.get_rng_state()
    assert measured_matmul_flops("cpu", torch.float32, size=64, repeats=2) > 0
    assert torch.equal(torch.get_rng_state(), state)


def test_gpu_peaks_match_the_most_specific_name():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert gpu_peak_flops("NVIDIA H100 PCIe") == pytest.approx(756e12)
    assert gpu_peak_flops("NVIDIA A10G") == pytest.approx(70e12)
    assert gpu_peak_flops("NVIDIA L4") == pytest.approx(121e12)
    assert gpu_peak_flops("Some Future GPU") is None


def test_training_pace_counts_real_tokens_flops_and_mfu(labelled_batches, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    model = build_tiny_bert()
    pace = TrainingPace()
    loader = torch.utils.data.DataLoader(labelled_batches, batch_size=None)
    logger = CSVLogger(tmp_path, name="run")
    trainer = quiet_trainer(max_epochs=2, callbacks=[pace], logger=logger)
    trainer.fit(ClassifierModule(model, lr=1e-3), loader)
    lengths = [int(n) for batch in labelled_batches for n in batch["attention_mask"].sum(-1)]
    assert pace.total_tokens == 2 * sum(lengths)
    n, trainable = non_embedding_counts(model)
    assert pace.total_flops == 2 * training_flops(lengths, n, trainable, 2, 32)
    assert pace.tokens_per_s == pytest.approx(pace.total_tokens / pace.seconds)
    assert pace.mfu == pytest.approx(pace.total_flops / pace.seconds / pace.peak_flops)
    assert 0 < pace.mfu < 1  # against the measured matmul rate of this CPU
    logged = pd.read_csv(next(tmp_path.rglob("metrics.csv")))
    assert logged["train/mfu"].notna().sum() == 2  # each epoch, to the logger only
    assert "train/mfu" not in trainer.callback_metrics  # not in history.csv's learning curves


# --- training settings -------------------------------------------------------------------------


def _without_dropout(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def _train(batches, accumulate: int, epochs: int = 3) -> tuple[dict, list[float]]:
    """Weights and per-micro-batch losses after training the tiny BERT on `batches`."""
    model = _without_dropout(build_tiny_bert())
    losses: list[float] = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    quiet_trainer(
        max_epochs=epochs,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=0.5,
        callbacks=[Losses()],
    ).fit(
        ClassifierModule(model, lr=1e-3, weight_decay=0.01, warmup_ratio=0.3),
        torch.utils.data.DataLoader(batches, batch_size=None),
    )
    return model.state_dict(), losses


def test_gradient_accumulation_keeps_the_meaning_of_the_effective_batch(labelled_batches):
    """One batch of 8 per step, or two of 4 accumulated: the same loss curve and weights
    (the scheduler counts optimizer steps, clipping sees the accumulated gradient)."""
    whole = [{key: torch.cat([b[key] for b in labelled_batches]) for key in labelled_batches[0]}]
    weights_whole, losses_whole = _train(whole, accumulate=1)
    weights_halves, losses_halves = _train(labelled_batches, accumulate=2)
    # A step's loss over 8 examples is the mean of its two halves' losses over 4, which
    # Lightning hands the callbacks already divided by the 2 accumulated batches.
    paired = [a + b for a, b in zip(losses_halves[::2], losses_halves[1::2], strict=True)]
    assert paired == pytest.approx(losses_whole, abs=1e-5)
    assert len(losses_whole) == 3
    for key, value in weights_whole.items():
        torch.testing.assert_close(weights_halves[key], value, atol=1e-5, rtol=1e-4)


@pytest.mark.slow  # the CPU inductor compiles for ~30 s of CPU time
def test_compiled_training_keeps_the_state_dict_keys_and_learns(labelled_batches):
    """`trainer.compile`: nn.Module.compile (CPU inductor here) trains in place, so checkpoints
    and the saved model keep their keys."""
    model = _without_dropout(build_tiny_bert())
    keys = list(model.state_dict())
    before = model.classifier.weight.detach().clone()
    model.compile()
    module = ClassifierModule(model, lr=1e-2)
    loader = torch.utils.data.DataLoader(labelled_batches, batch_size=None)
    quiet_trainer(max_epochs=2).fit(module, loader)
    assert list(model.state_dict()) == keys
    assert not torch.equal(model.classifier.weight, before)


# --- on a GPU ----------------------------------------------------------------------------------


@needs_cuda
def test_bf16_agrees_with_fp32_on_at_least_99_percent_of_predictions(tiny_batches):
    model = build_tiny_bert().cuda()
    half = build_tiny_bert().to("cuda", torch.bfloat16)
    from trimflow.evaluation.inference import predict_logits

    many = tiny_batches * 50
    fp32, bf16 = (predict_logits(m, many).argmax(-1) for m in (model, half))
    assert (fp32 == bf16).mean() >= 0.99


@needs_cuda
def test_every_variant_is_evaluated_on_the_gpu_but_cpu_only_ones(tmp_path, tiny_config):
    """The smoke pipeline on the GPU: every variant marked with the device it ran on, GPU
    memory measured for those on the GPU, bf16-mixed training with an MFU."""
    from trimflow.layout import dvc_layout
    from trimflow.pipeline import run_pipeline

    cfg = tiny_config("evaluate.device=cuda")
    layout = dvc_layout(tmp_path)
    run_pipeline(cfg, layout)
    metrics = json.loads(layout.metrics_file.read_text())
    devices = variant_devices(cfg)
    assert "cuda" in devices.values()
    for name, values in metrics["variants"].items():
        assert values["device"] == devices[name], name
        assert (values["peak_gpu_mem_mb"] is not None) == (devices[name] == "cuda"), name
    training = json.loads((layout.finetuned / "training.json").read_text())
    assert 0 < training["train_mfu"] < 1

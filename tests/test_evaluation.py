"""Metrics, prediction, benchmarking and footprint."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from trimflow.compress.quantize import quantize_dynamic_int8
from trimflow.evaluation.benchmark import (
    interleaved_timings,
    measure_latency,
    throughput_summary,
    timed_forwards,
    torch_threads,
)
from trimflow.evaluation.classification import classification_metrics
from trimflow.evaluation.cost import TRAINING_FIELDS, training_cost
from trimflow.evaluation.footprint import count_parameters, size_on_disk_mb
from trimflow.evaluation.inference import predict_logits
from trimflow.evaluation.machine import cpu_description
from trimflow.layout import ADAPTER_DIR, TRAINING_FILE

LABELS = ["alpha", "beta", "gamma"]


def single_examples(batches):
    """Every example of `batches` as its own batch of one."""
    return [
        {key: value[i : i + 1] for key, value in batch.items()}
        for batch in batches
        for i in range(len(batch["input_ids"]))
    ]


# --- classification metrics --------------------------------------------------------------------


def test_metrics_match_hand_computed_values():
    # gamma is never predicted; one alpha is predicted as beta, one gamma as alpha.
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 1, 0]

    metrics = classification_metrics(y_true, y_pred, LABELS)

    assert metrics["accuracy"] == pytest.approx(4 / 6)
    alpha, beta, gamma = (metrics["per_class"][name] for name in LABELS)
    assert alpha == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert beta == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert gamma == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0.0) / 3)
    assert metrics["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_metrics_include_labels_absent_from_both_sequences():
    metrics = classification_metrics([0, 1], [0, 1], LABELS)

    assert metrics["accuracy"] == 1.0
    assert metrics["per_class"]["gamma"]["support"] == 0
    assert metrics["macro_f1"] == pytest.approx(2 / 3)
    assert metrics["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]


def test_metrics_are_plain_json():
    metrics = classification_metrics(np.array([0, 2]), np.array([0, 1]), LABELS)
    assert json.loads(json.dumps(metrics)) == metrics
    assert type(metrics["confusion_matrix"][0][0]) is int
    assert type(metrics["per_class"]["alpha"]["support"]) is int


# --- prediction --------------------------------------------------------------------------------


def test_predict_logits_returns_float32_logits_in_order_and_ignores_labels(tiny_bert, tiny_batches):
    with_labels = [{**batch, "labels": torch.tensor([2, 2, 2, 2])} for batch in tiny_batches]
    with torch.no_grad():
        expected = torch.cat([tiny_bert(**batch).logits for batch in tiny_batches])

    logits = predict_logits(tiny_bert, with_labels)

    assert isinstance(logits, np.ndarray) and logits.dtype == np.float32
    assert logits.shape == (8, tiny_bert.config.num_labels)
    np.testing.assert_allclose(logits, expected.numpy(), rtol=1e-6)
    assert predict_logits(tiny_bert, []).shape[0] == 0


# --- benchmark ---------------------------------------------------------------------------------


def test_latency_is_positive_finite_and_restores_threads(tiny_bert, tiny_batches):
    before = torch.get_num_threads()
    result = measure_latency(tiny_bert, single_examples(tiny_batches), 2, 10, num_threads=1)

    assert set(result) == {"latency_ms_p50", "latency_ms_p95", "latency_ms_mean"}
    assert all(math.isfinite(value) and value > 0 for value in result.values())
    assert result["latency_ms_p50"] <= result["latency_ms_p95"]
    assert torch.get_num_threads() == before


def test_latency_rejects_batched_inputs(tiny_bert, tiny_batches):
    with pytest.raises(ValueError, match="exactly one example"):
        measure_latency(tiny_bert, tiny_batches, 0, 1, num_threads=1)


def test_throughput_is_positive_finite_and_restores_threads(tiny_bert, tiny_batches):
    before = torch.get_num_threads()
    result = throughput_summary(timed_forwards(tiny_bert, tiny_batches, 1, 3, num_threads=1))

    assert set(result) == {"throughput_sps"}
    assert math.isfinite(result["throughput_sps"]) and result["throughput_sps"] > 0
    assert torch.get_num_threads() == before


def test_thread_context_restores_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), torch_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError
    assert torch.get_num_threads() == before


class CallLog(nn.Module):
    """Records which model ran each forward, in order."""

    def __init__(self, name: str, calls: list[str]) -> None:
        super().__init__()
        self.name, self.calls = name, calls

    def forward(self, input_ids, **_):
        self.calls.append(self.name)
        return input_ids


def test_interleaved_timings_warm_up_once_then_alternate_models():
    calls: list[str] = []
    models = {name: CallLog(name, calls) for name in ("a", "b")}
    batches = [{"input_ids": torch.zeros(3, 4, dtype=torch.long)}]
    timings, peaks = interleaved_timings(
        models, batches, warmup=4, repeats=6, rounds=3, num_threads=1
    )
    assert peaks == {}  # GPU memory is measured on a GPU only
    # 2 timed forwards per round; 4 warm-up forwards in round 1, then 1 per round.
    assert {name: len(t) for name, t in timings.items()} == {"a": 6, "b": 6}
    assert all(size == 3 and seconds >= 0 for t in timings.values() for seconds, size in t)
    rounds = ["a"] * 6 + ["b"] * 6 + (["a"] * 3 + ["b"] * 3) * 2
    assert calls == rounds


def test_interleaved_timings_round_repeats_up_and_restart_the_batch_cycle_each_round():
    calls: list[str] = []
    models = {name: CallLog(name, calls) for name in ("a", "b")}
    batches = [{"input_ids": torch.zeros(size, 4, dtype=torch.long)} for size in (1, 2, 3)]
    timings, _ = interleaved_timings(models, batches, warmup=0, repeats=5, rounds=2, num_threads=1)
    # ceil(5 / 2) = 3 timed forwards per round and no warm-up at all.
    assert calls == (["a"] * 3 + ["b"] * 3) * 2
    assert {name: [size for _, size in t] for name, t in timings.items()} == {
        "a": [1, 2, 3, 1, 2, 3],
        "b": [1, 2, 3, 1, 2, 3],
    }


# --- footprint ---------------------------------------------------------------------------------


def test_size_on_disk_sums_files_recursively(tmp_path):
    (tmp_path / "nested").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 2**19)
    (tmp_path / "nested" / "b.bin").write_bytes(b"x" * 2**18)

    assert size_on_disk_mb(tmp_path) == 0.75
    assert size_on_disk_mb(tmp_path / "a.bin") == 0.5


def ones_with_known_zeros() -> nn.Module:
    """Two linears (23 parameters) filled with ones, 5 of them zeroed."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(1.0)
        model[0].weight[0] = 0.0  # 4 zeros
        model[1].bias[1] = 0.0  # 1 zero
    return model


def test_count_parameters_counts_known_zeros():
    assert count_parameters(ones_with_known_zeros()) == (23, 18)


def test_quantized_model_reports_the_same_counts_as_fp32():
    assert count_parameters(quantize_dynamic_int8(ones_with_known_zeros())) == (23, 18)


def test_quantized_bert_reports_the_same_total_as_fp32(tiny_bert):
    fp32_total, _ = count_parameters(tiny_bert)
    quantized_total, _ = count_parameters(quantize_dynamic_int8(tiny_bert))
    assert quantized_total == fp32_total


# --- cost to train ---------------------------------------------------------------------------


def test_training_cost_reads_training_json_and_sizes_the_adapter(tmp_path):
    adapted = tmp_path / "adapted"
    (adapted / ADAPTER_DIR).mkdir(parents=True)
    (adapted / ADAPTER_DIR / "adapter_model.safetensors").write_bytes(b"x" * 2**19)
    figures = {"train_s": 2.5, "train_samples_per_s": 40.0}
    pace = {"train_tokens_per_s": 3000.0, "train_mfu": 0.12}
    counts = {"trainable_params": 5, "total_params": 9, "peak_train_mem_mb": 512.3}
    (adapted / TRAINING_FILE).write_text(
        json.dumps({**figures, **pace, **counts, "global_step": 7})
    )
    assert training_cost(adapted) == {
        **figures,
        **pace,
        "trainable_params": 5,
        "train_total_params": 9,
        "peak_train_mem_mb": 512.3,
        "adapter_mb": 0.5,
    }
    older = tmp_path / "older"  # a training.json written before the counts were recorded
    older.mkdir()
    (older / TRAINING_FILE).write_text(json.dumps(figures))
    assert training_cost(older) == {
        **figures,
        **dict.fromkeys(["trainable_params", "train_total_params", "peak_train_mem_mb"]),
        **dict.fromkeys(["train_tokens_per_s", "train_mfu"]),
        "adapter_mb": None,
    }
    assert training_cost(tmp_path) == dict.fromkeys([*TRAINING_FIELDS, "adapter_mb"])  # untrained


# --- machine -----------------------------------------------------------------------------------


def test_cpu_description_names_model_and_speed_flags():
    cpuinfo = (
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\n"
        "flags\t\t: fpu sse avx2 avx512f avx512_vnni\n\nprocessor\t: 1\n"
        "model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n"
    )
    assert cpu_description(cpuinfo) == {
        "cpu_model": "Intel(R) Xeon(R) Processor",
        "cpu_flags": ["avx2", "avx512f", "avx512_vnni"],
    }
    assert cpu_description("flags : sse avx2\n")["cpu_flags"] == ["avx2"]

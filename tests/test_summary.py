"""metrics.json's payload from hand-made measurements (no model)."""

from __future__ import annotations

import json

import pytest

from trimflow.evaluation.cost import training_cost
from trimflow.evaluation.summary import MEASURE_NAMES, Measurements, mlflow_names, summarise

CLASSIFICATION_NAMES = mlflow_names(("accuracy", "macro_f1"))
NER_NAMES = mlflow_names(("f1", "precision", "recall", "macro_f1", "token_accuracy"))


def _detail(accuracy: float, latency: float, size: float, train_s: float | None = None) -> dict:
    """One variant's details as evaluate measures them, with the fields metrics.json drops."""
    trained = train_s is not None
    return {
        "accuracy": accuracy,
        "macro_f1": accuracy - 0.1,
        "per_class": {"alpha": {"f1": accuracy}},
        "predictions": [0, 1, 1],
        "size_mb": size,
        "params": 1000,
        "nonzero_params": 900,
        "source": "finetuned",
        "agreement": 1.0,
        "latency_ms_p50": latency,
        "latency_ms_p95": 2 * latency,
        "latency_ms_mean": 1.5 * latency,
        "throughput_sps": 1000 / latency,
        "trainable_params": 1000 if trained else None,
        "train_total_params": 1000 if trained else None,
        "train_s": train_s,
        "train_samples_per_s": 500 / train_s if trained else None,
        "peak_train_mem_mb": 4 * train_s if trained else None,
        "train_tokens_per_s": 9000 / train_s if trained else None,
        "train_mfu": 0.25 if trained else None,
        "adapter_mb": None,
        "device": "cpu",
        "runtime": "torch",
        "peak_gpu_mem_mb": None,
        "merge_max_abs_diff": None,
        "merge_agreement": None,
    }


def _classification(**rule) -> dict:
    measured = Measurements(
        details={
            "finetuned": _detail(0.90, 20.0, 80.0, train_s=100.0),
            "quantized": _detail(0.895, 8.0, 20.0, train_s=100.0),  # 0.5 points lost: within
            "pruned": _detail(0.85, 5.0, 40.0, train_s=10.0),  # 5 points lost: excluded
        },
        baselines={},
        names=CLASSIFICATION_NAMES,
    )
    defaults = dict(
        baseline="finetuned",
        max_drop_pts=1.0,
        guards=["accuracy", "macro_f1"],
        objective="latency",
    )
    return summarise(measured, task="classification", metric="accuracy", **defaults | rule)


def test_mlflow_names_put_quality_first_then_the_measures():
    assert list(CLASSIFICATION_NAMES) == ["accuracy", "macro_f1", *MEASURE_NAMES]
    assert CLASSIFICATION_NAMES["accuracy"] == "test/accuracy"
    assert CLASSIFICATION_NAMES["agreement"] == "test/agreement_with_source"
    assert CLASSIFICATION_NAMES["peak_train_mem_mb"] == "training/peak_mem_mb"


def test_mlflow_names_cover_the_cost_to_train_evaluate_reads(tmp_path):
    assert set(training_cost(tmp_path)) <= set(MEASURE_NAMES)


def test_summary_keeps_the_named_fields_of_every_variant_and_recommends():
    summary = _classification()

    assert list(summary) == ["task", "metric", "recommended", "recommendation", "variants"]
    assert (summary["task"], summary["metric"]) == ("classification", "accuracy")
    assert list(summary["variants"]) == ["finetuned", "quantized", "pruned"]
    for values in summary["variants"].values():
        assert list(values) == [*CLASSIFICATION_NAMES, "device", "runtime"]
    assert summary["variants"]["quantized"]["latency_ms_p50"] == 8.0
    assert summary["recommended"] == summary["recommendation"]["variant"] == "quantized"
    assert summary["recommendation"]["speedup"] == pytest.approx(20.0 / 8.0)
    assert summary["recommendation"]["excluded"] == {
        "pruned": {"accuracy": pytest.approx(5.0), "macro_f1": pytest.approx(5.0)}
    }
    assert json.loads(json.dumps(summary)) == summary


def test_summary_carries_the_training_cost_and_recommends_on_the_objective():
    summary = _classification(objective="train_time")

    costs = {
        name: {key: values[key] for key in ("trainable_params", "train_s", "adapter_mb")}
        for name, values in summary["variants"].items()
    }
    assert costs["pruned"] == {"trainable_params": 1000, "train_s": 10.0, "adapter_mb": None}
    assert summary["variants"]["quantized"]["peak_train_mem_mb"] == 400.0
    # pruned trains fastest but is excluded; finetuned and quantized tie, quantized is faster.
    assert summary["recommendation"]["objective"] == "train_time"
    assert summary["recommended"] == "quantized"


def test_summary_follows_the_drop_budget_and_guards():
    assert _classification(max_drop_pts=10.0)["recommended"] == "pruned"
    assert _classification(max_drop_pts=0.0)["recommended"] == "finetuned"
    assert _classification(baseline="quantized", max_drop_pts=0.0)["recommended"] == "quantized"
    with pytest.raises(KeyError, match="distilled"):
        _classification(baseline="distilled")


def test_ner_summary_adds_the_baselines_named_fields():
    entity_scores = {"f1": 0.5, "precision": 0.4, "recall": 0.6, "macro_f1": 0.3}
    detail = {**_detail(0.0, 10.0, 4.0), **entity_scores, "token_accuracy": 0.9, "per_type": {}}
    baseline = {**entity_scores, "token_accuracy": 0.8, "per_type": {}, "predictions": [["O"]]}
    measured = Measurements(
        details={"finetuned": detail},
        baselines={"majority_tag": baseline, "gazetteer": baseline},
        names=NER_NAMES,
    )

    summary = summarise(
        measured,
        task="ner",
        metric="f1",
        baseline="finetuned",
        max_drop_pts=1.0,
        guards=["f1"],
        objective="latency",
    )

    assert list(summary) == [
        "task",
        "metric",
        "recommended",
        "recommendation",
        "variants",
        "baselines",
    ]
    assert list(summary["variants"]["finetuned"]) == [*NER_NAMES, "device", "runtime"]
    assert summary["baselines"] == {
        name: {**entity_scores, "token_accuracy": 0.8} for name in ("majority_tag", "gazetteer")
    }

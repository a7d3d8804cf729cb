"""reports/metrics.json from evaluate's measurements: each variant's headline numbers, the
device and runtime it was measured on, the NER baselines' and the recommendation. Pure: no
model, file or tracking server."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from trimflow.evaluation.recommend import recommend
from trimflow.tracking.runs import BENCH_PREFIX, MODEL_PREFIX, TEST_PREFIX, TRAINING_PREFIX

# metrics.json field -> MLflow metric name (the same for every variant run); quality fields come
# first, `test/<field>`, from the task's scorer. The training fields (evaluation.cost) are None
# for a variant that was not trained (a quantized one carries its source's); no metric is
# logged for a None.
MEASURE_NAMES = {
    "latency_ms_p50": f"{BENCH_PREFIX}latency_ms_p50",
    "latency_ms_p95": f"{BENCH_PREFIX}latency_ms_p95",
    "throughput_sps": f"{BENCH_PREFIX}throughput_sps",
    "size_mb": f"{MODEL_PREFIX}size_mb",
    "params": f"{MODEL_PREFIX}params",
    "nonzero_params": f"{MODEL_PREFIX}nonzero_params",
    "agreement": f"{TEST_PREFIX}agreement_with_source",
    "trainable_params": f"{TRAINING_PREFIX}trainable_params",
    "train_total_params": f"{TRAINING_PREFIX}total_params",
    "train_s": f"{TRAINING_PREFIX}seconds",
    "train_samples_per_s": f"{TRAINING_PREFIX}samples_per_s",
    "peak_train_mem_mb": f"{TRAINING_PREFIX}peak_mem_mb",
    "adapter_mb": f"{TRAINING_PREFIX}adapter_mb",
    "train_tokens_per_s": f"{TRAINING_PREFIX}tokens_per_s",
    "train_mfu": f"{TRAINING_PREFIX}mfu",
    # Evaluated on a GPU: weights + the largest forward's activations (else None).
    "peak_gpu_mem_mb": f"{BENCH_PREFIX}peak_gpu_mem_mb",
    # Adapted variants with a merged model: merged against base model + adapter (else None).
    "merge_max_abs_diff": f"{TEST_PREFIX}merge_max_abs_diff",
    "merge_agreement": f"{TEST_PREFIX}merge_agreement",
}


def mlflow_names(quality_keys: Sequence[str], beyond: Sequence[str] = ()) -> dict[str, str]:
    """metrics.json field -> MLflow metric name for every per-variant number: the quality
    figures, the measures, and the `beyond`-accuracy figures (evaluation/beyond_accuracy.py)."""
    quality = {key: f"{TEST_PREFIX}{key}" for key in quality_keys}
    return quality | MEASURE_NAMES | {key: f"{TEST_PREFIX}{key}" for key in beyond}


@dataclass
class Measurements:
    """Everything evaluate measured: per-variant details, NER baselines, metric names."""

    # variant -> scores, predictions, timings, footprint, source, cost to train
    details: dict[str, dict]
    baselines: dict[str, dict]  # baseline tagger -> its scores; empty for classification
    names: dict[str, str]  # metrics.json field -> MLflow metric name


def summarise(
    measured: Measurements,
    *,
    task: str,
    metric: str,
    baseline: str,
    max_drop_pts: float,
    guards: Sequence[str],
    objective: str,
) -> dict[str, Any]:
    """The metrics.json payload: the `measured.names` fields of every variant and baseline,
    and the variant recommended on `objective` against `baseline` (see `recommend`)."""
    variants = {
        variant: {key: detail[key] for key in (*measured.names, "device", "runtime")}
        | ({"worst_slice": detail["worst_slice"]} if "worst_slice" in detail else {})
        for variant, detail in measured.details.items()
    }
    baselines = {
        name: {key: scores[key] for key in measured.names if key in scores}
        for name, scores in measured.baselines.items()
    }
    recommendation = recommend(variants, baseline, max_drop_pts, guards, objective)
    return {
        "task": task,
        "metric": metric,
        "recommended": recommendation["variant"],
        "recommendation": recommendation,
        "variants": variants,
        **({"baselines": baselines} if baselines else {}),
    }

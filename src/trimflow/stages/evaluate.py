"""evaluate: accuracy, latency, throughput and size of every variant on the same test inputs."""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from trimflow.compress.onnx import OnnxClassifier
from trimflow.compress.variants import load_variant
from trimflow.config.schema import FINETUNED, TrimflowConfig
from trimflow.data.datamodule import TokenizedDataModule
from trimflow.evaluation.benchmark import (
    interleaved_timings,
    latency_summary,
    throughput_summary,
)
from trimflow.evaluation.classification import classification_metrics
from trimflow.evaluation.footprint import count_parameters, size_on_disk_mb
from trimflow.evaluation.inference import predict
from trimflow.evaluation.recommend import recommend
from trimflow.layout import Layout
from trimflow.models.loading import WEIGHT_SUFFIXES, read_label_map
from trimflow.stages import inference_data
from trimflow.tracking.runs import Tracker, log_variant_run
from trimflow.utils.atomic import atomic_dir, write_json

log = logging.getLogger(__name__)
# reports/metrics.json field -> MLflow metric name (the same for every variant run).
MLFLOW_NAMES = {
    "accuracy": "test/accuracy",
    "macro_f1": "test/macro_f1",
    "latency_ms_p50": "bench/latency_ms_p50",
    "latency_ms_p95": "bench/latency_ms_p95",
    "throughput_sps": "bench/throughput_sps",
    "size_mb": "model/size_mb",
    "params": "model/params",
    "nonzero_params": "model/nonzero_params",
    "agreement": "test/agreement_with_source",
}


def variant_sources(cfg: TrimflowConfig) -> dict[str, str]:
    """Each variant -> the variant its predictions are compared with (agreement).

    A quantized variant is compared with the model it quantizes; every other variant with the
    fine-tuned model. Sources come first in this order, so they are scored first.
    """
    return {
        name: cfg.quantize.variants[name].source if kind == "quantize" else FINETUNED
        for name, kind in cfg.variant_kinds().items()
    }


def weights_size_mb(directory: Path) -> float:
    """Size of the weight files only (tokenizer and metadata are the same for every variant)."""
    return sum(
        size_on_disk_mb(path) for path in directory.iterdir() if path.name.endswith(WEIGHT_SUFFIXES)
    )


def environment() -> dict:
    """The machine and settings the numbers were measured on."""
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "quantized_engine": torch.backends.quantized.engine,
    }


@dataclass
class TestInputs:
    """Model inputs built once from the test split and shared by every variant."""

    truth: list[int]
    sorted_batches: list[dict[str, torch.Tensor]]  # length-sorted: little padding
    order: np.ndarray  # row index of each sorted example
    latency_inputs: list[dict[str, torch.Tensor]]  # batch 1
    throughput_batches: list[dict[str, torch.Tensor]]  # file order, mixed lengths


def build_test_inputs(data: TokenizedDataModule, cfg: TrimflowConfig) -> TestInputs:
    ev = cfg.evaluate
    test = data.splits["test"]
    lengths = np.array([len(ids) for ids in test["input_ids"]])
    order = np.argsort(lengths, kind="stable")

    def collate(rows) -> dict[str, torch.Tensor]:
        return data.collator([test[int(i)] for i in rows])

    def chunks(rows, size: int):
        return [rows[start : start + size] for start in range(0, len(rows), size)]

    throughput_rows = chunks(np.arange(len(test)), ev.throughput.batch_size)
    return TestInputs(
        truth=[int(label) for label in test["labels"]],
        sorted_batches=[collate(rows) for rows in chunks(order, ev.batch_size)],
        order=order,
        latency_inputs=[collate([i]) for i in range(min(ev.latency.samples, len(test)))],
        throughput_batches=[collate(rows) for rows in throughput_rows[: ev.throughput.repeats]],
    )


def parameter_counts(model) -> tuple[int, int]:
    """(total, non-zero) weights of a torch module or an ONNX Runtime graph."""
    if isinstance(model, OnnxClassifier):
        return model.parameter_counts()
    return count_parameters(model)


def score_variant(model, directory: Path, inputs: TestInputs, labels: list[str]) -> dict:
    """Accuracy, per-class scores, predictions, size and parameter counts of one variant."""
    predictions = np.empty(len(inputs.truth), dtype=np.int64)
    predictions[inputs.order] = predict(model, inputs.sorted_batches)
    scores = classification_metrics(inputs.truth, predictions.tolist(), labels)
    params, nonzero = parameter_counts(model)
    return {
        **scores,
        "label_names": labels,
        "predictions": predictions.tolist(),
        "size_mb": weights_size_mb(directory),
        "params": params,
        "nonzero_params": nonzero,
    }


def time_variants(models: dict, inputs: TestInputs, cfg: TrimflowConfig) -> dict[str, dict]:
    """Latency (batch 1) and throughput of every model, measured in interleaved rounds."""
    ev = cfg.evaluate
    latency = interleaved_timings(
        models,
        inputs.latency_inputs,
        ev.latency.warmup,
        ev.latency.repeats,
        ev.rounds,
        ev.num_threads,
    )
    throughput = interleaved_timings(
        models,
        inputs.throughput_batches,
        ev.throughput.warmup,
        ev.throughput.repeats,
        ev.rounds,
        ev.num_threads,
    )
    return {
        name: {**latency_summary(latency[name]), **throughput_summary(throughput[name])}
        for name in models
    }


def run(cfg: TrimflowConfig, layout: Layout) -> None:
    label_map = read_label_map(layout.finetuned)
    inputs = build_test_inputs(inference_data(layout, cfg.evaluate.batch_size), cfg)
    tracker = Tracker(cfg)
    with tracker.stage_run("evaluate", label_map["dataset_digest"]) as active:
        details = measure_variants(cfg, layout, inputs, label_map["labels"])
        with atomic_dir(layout.variant_details) as details_dir:
            write_outputs(cfg, layout, details, details_dir, tracker, active)


def measure_variants(
    cfg: TrimflowConfig, layout: Layout, inputs: TestInputs, labels: list[str]
) -> dict[str, dict]:
    """Score every variant (each loaded from disk), then time them all together."""
    models, details = {}, {}
    sources = variant_sources(cfg)
    for variant, source in tqdm(sources.items(), desc="score", unit="variant"):
        directory = layout.model_dir(variant)
        models[variant] = load_variant(directory, num_threads=cfg.evaluate.num_threads)
        details[variant] = score_variant(models[variant], directory, inputs, labels)
        details[variant]["source"] = source
        details[variant]["agreement"] = float(
            np.mean(
                np.array(details[variant]["predictions"])
                == np.array(details[source]["predictions"])
            )
        )
    log.info("timing %d variants in %d interleaved rounds", len(models), cfg.evaluate.rounds)
    for variant, timing in time_variants(models, inputs, cfg).items():
        details[variant].update(timing)
    return details


def write_outputs(
    cfg: TrimflowConfig,
    layout: Layout,
    details: dict[str, dict],
    details_dir: Path,
    tracker: Tracker,
    active,
) -> None:
    """metrics.json, a detail file per variant, environment.json and the variant runs."""
    results = {
        variant: {key: detail[key] for key in MLFLOW_NAMES} for variant, detail in details.items()
    }
    for variant, detail in details.items():
        detail_path = details_dir / f"{variant}.json"
        write_json(detail_path, {"variant": variant, **detail})
        log.info(
            "%s: accuracy %.4f, p50 %.1f ms, %.1f MB",
            variant,
            detail["accuracy"],
            detail["latency_ms_p50"],
            detail["size_mb"],
        )
        log_variant_run(
            tracker,
            variant,
            {MLFLOW_NAMES[k]: v for k, v in results[variant].items()},
            active,
            [str(detail_path)],
        )
    write_json(
        details_dir / "environment.json",
        {
            **environment(),
            "num_threads": cfg.evaluate.num_threads,
            "device": cfg.evaluate.device,
            "rounds": cfg.evaluate.rounds,
        },
    )
    recommendation = recommend(results, cfg.report.baseline, cfg.report.max_accuracy_drop)
    write_json(
        layout.metrics_file,
        {
            "recommended": recommendation["variant"],
            "recommendation": recommendation,
            "variants": results,
        },
    )
    if active is not None:
        import mlflow

        mlflow.log_artifact(str(layout.metrics_file))

"""evaluate: accuracy, latency, throughput and size of every variant on the same test inputs."""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path

import torch
from tqdm.auto import tqdm

from trimflow.compress.quantize import WEIGHT_SUFFIXES, load_variant
from trimflow.config.schema import TrimflowConfig
from trimflow.data.datamodule import TokenizedDataModule
from trimflow.evaluation.benchmark import measure_latency, measure_throughput
from trimflow.evaluation.classification import classification_metrics
from trimflow.evaluation.footprint import count_parameters, size_on_disk_mb
from trimflow.evaluation.inference import predict
from trimflow.layout import Layout
from trimflow.models.loading import read_label_map
from trimflow.stages.quantize import quantized_variant
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
}


def variant_dirs(cfg: TrimflowConfig, layout: Layout) -> dict[str, Path]:
    """Every variant the pipeline built, in report order."""
    dirs = {"finetuned": layout.finetuned, "pruned": layout.pruned}
    for source in cfg.quantize.sources:
        dirs[quantized_variant(source)] = layout.quantized / quantized_variant(source)
    return dirs


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


def evaluate_variant(
    model, data: TokenizedDataModule, cfg: TrimflowConfig, labels: list[str]
) -> tuple[dict, dict]:
    """(summary metrics, detail) of one loaded variant."""
    ev = cfg.evaluate
    test = data.splits["test"]
    predictions = predict(model, data.eval_loader("test", ev.batch_size))
    truth = [int(label) for label in test["labels"]]
    scores = classification_metrics(truth, predictions.tolist(), labels)
    single = [data.collator([test[i]]) for i in range(min(ev.latency.samples, len(test)))]
    batches = list(data.eval_loader("test", ev.throughput.batch_size))
    latency = measure_latency(model, single, ev.latency.warmup, ev.latency.repeats, ev.num_threads)
    throughput = measure_throughput(
        model,
        batches[: max(1, len(batches) - 1)],
        ev.throughput.warmup,
        ev.throughput.repeats,
        ev.num_threads,
    )
    params, nonzero = count_parameters(model)
    summary = {
        "accuracy": scores["accuracy"],
        "macro_f1": scores["macro_f1"],
        "latency_ms_p50": latency["latency_ms_p50"],
        "latency_ms_p95": latency["latency_ms_p95"],
        "throughput_sps": throughput["throughput_sps"],
        "params": params,
        "nonzero_params": nonzero,
    }
    detail = {**scores, "label_names": labels, **latency, "predictions": predictions.tolist()}
    return summary, detail


def run(cfg: TrimflowConfig, layout: Layout) -> None:
    if cfg.evaluate.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("evaluate.device=cuda but no CUDA device is available")
    label_map = read_label_map(layout.finetuned)
    data = TokenizedDataModule(
        layout.tokenized / "splits",
        layout.tokenized / "tokenizer",
        batch_size=cfg.evaluate.batch_size,
        eval_batch_size=cfg.evaluate.batch_size,
    )
    data.setup()
    tracker = Tracker(cfg)
    results: dict[str, dict] = {}
    with (
        tracker.stage_run("evaluate", label_map["dataset_digest"]) as active,
        atomic_dir(layout.variant_details) as details_dir,
    ):
        variants = variant_dirs(cfg, layout)
        for variant, directory in tqdm(variants.items(), desc="evaluate", unit="variant"):
            model = load_variant(directory)
            summary, detail = evaluate_variant(model, data, cfg, label_map["labels"])
            summary["size_mb"] = weights_size_mb(directory)
            results[variant] = summary
            detail_path = details_dir / f"{variant}.json"
            write_json(detail_path, {"variant": variant, **summary, **detail})
            log.info(
                "%s: accuracy %.4f, p50 %.1f ms, %.1f MB",
                variant,
                summary["accuracy"],
                summary["latency_ms_p50"],
                summary["size_mb"],
            )
            log_variant_run(
                tracker,
                variant,
                {MLFLOW_NAMES[k]: v for k, v in summary.items()},
                active,
                [str(detail_path)],
            )
        write_json(
            details_dir / "environment.json",
            {
                **environment(),
                "num_threads": cfg.evaluate.num_threads,
                "device": cfg.evaluate.device,
            },
        )
        write_json(layout.metrics_file, {"variants": results})
        if active is not None:
            import mlflow

            mlflow.log_artifact(str(layout.metrics_file))

"""evaluate: quality, latency, throughput and size of every variant on the same test inputs.

Quality is accuracy for classification, entity F1 (seqeval) for NER, where the majority-tag and
gazetteer baselines are scored in the same run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from trimflow.compress.onnx import OnnxClassifier
from trimflow.compress.variants import load_variant
from trimflow.config.schema import FINETUNED, TrimflowConfig
from trimflow.evaluation.baselines import baseline_scores
from trimflow.evaluation.benchmark import (
    environment,
    interleaved_timings,
    latency_summary,
    throughput_summary,
)
from trimflow.evaluation.footprint import count_parameters, size_on_disk_mb
from trimflow.evaluation.inputs import TestInputs, build_test_inputs, inference_data
from trimflow.evaluation.recommend import recommend
from trimflow.evaluation.scoring import EntityScorer, LabelScorer, agreement, make_scorer
from trimflow.layout import Layout, read_label_map
from trimflow.models.loading import WEIGHT_SUFFIXES
from trimflow.tracking.runs import Tracker, log_variant_run
from trimflow.utils.atomic import atomic_dir, write_json
from trimflow.utils.progress import progress

log = logging.getLogger(__name__)
# reports/metrics.json field -> MLflow metric name (the same for every variant run); quality
# fields come first, `test/<field>`, from the task's scorer.
MEASURE_NAMES = {
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


BASELINES_FILE = "baselines.json"


def mlflow_names(scorer: LabelScorer | EntityScorer) -> dict[str, str]:
    """metrics.json field -> MLflow metric name for every per-variant number."""
    return {key: f"test/{key}" for key in scorer.quality_keys} | MEASURE_NAMES


def parameter_counts(model) -> tuple[int, int]:
    """(total, non-zero) weights of a torch module or an ONNX Runtime graph."""
    if isinstance(model, OnnxClassifier):
        return model.parameter_counts()
    return count_parameters(model)


def score_baselines(cfg: TrimflowConfig, layout: Layout) -> dict[str, dict]:
    """NER only: majority-tag and gazetteer taggers learned from train, scored on test."""
    if cfg.task.type != "ner":
        return {}
    train, test = (pd.read_parquet(layout.prepared / f"{s}.parquet") for s in ("train", "test"))
    return baseline_scores(
        train["tokens"].map(list).tolist(),
        train["tags"].map(list).tolist(),
        test["tokens"].map(list).tolist(),
        test["tags"].map(list).tolist(),
        cfg.task.seqeval_mode,
    )


def score_variant(model, directory: Path, inputs: TestInputs, scorer) -> dict:
    """Quality scores, predictions, size and parameter counts of one variant."""
    params, nonzero = parameter_counts(model)
    return {
        **scorer.score(model, inputs.sorted_batches, inputs.order),
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
        desc="latency",
    )
    throughput = interleaved_timings(
        models,
        inputs.throughput_batches,
        ev.throughput.warmup,
        ev.throughput.repeats,
        ev.rounds,
        ev.num_threads,
        desc="throughput",
    )
    return {
        name: {**latency_summary(latency[name]), **throughput_summary(throughput[name])}
        for name in models
    }


def run(cfg: TrimflowConfig, layout: Layout) -> None:
    label_map = read_label_map(layout.finetuned)
    inputs = build_test_inputs(inference_data(layout, cfg.evaluate.batch_size), cfg)
    scorer = make_scorer(cfg, layout, label_map["labels"])
    tracker = Tracker(cfg)
    with tracker.stage_run("evaluate", label_map["dataset_digest"]) as active:
        details = measure_variants(cfg, layout, inputs, scorer)
        baselines = score_baselines(cfg, layout)
        with atomic_dir(layout.variant_details) as details_dir:
            write_outputs(
                cfg,
                layout,
                Measured(details, baselines, mlflow_names(scorer)),
                details_dir,
                tracker,
                active,
            )


@dataclass
class Measured:
    """Everything evaluate measured: per-variant details, NER baselines, metric names."""

    details: dict[str, dict]
    baselines: dict[str, dict]
    names: dict[str, str]  # metrics.json field -> MLflow metric name


def measure_variants(
    cfg: TrimflowConfig, layout: Layout, inputs: TestInputs, scorer
) -> dict[str, dict]:
    """Score every variant (each loaded from disk), then time them all together."""
    models, details = {}, {}
    sources = variant_sources(cfg)
    for variant, source in progress(sources.items(), "score", log, unit="variant"):
        directory = layout.model_dir(variant)
        models[variant] = load_variant(directory, num_threads=cfg.evaluate.num_threads)
        details[variant] = score_variant(models[variant], directory, inputs, scorer)
        details[variant]["source"] = source
        details[variant]["agreement"] = agreement(
            details[variant]["predictions"], details[source]["predictions"]
        )
    log.info("timing %d variants in %d interleaved rounds", len(models), cfg.evaluate.rounds)
    for variant, timing in time_variants(models, inputs, cfg).items():
        details[variant].update(timing)
    return details


def write_outputs(
    cfg: TrimflowConfig,
    layout: Layout,
    measured: Measured,
    details_dir: Path,
    tracker: Tracker,
    active,
) -> None:
    """metrics.json, a detail file per variant (and baselines), environment.json, MLflow runs."""
    metric = cfg.task.metric
    results = {
        variant: {key: detail[key] for key in measured.names}
        for variant, detail in measured.details.items()
    }
    for variant, detail in measured.details.items():
        detail_path = details_dir / f"{variant}.json"
        write_json(detail_path, {"variant": variant, **detail})
        log.info(
            "%s: %s %.4f, p50 %.1f ms, %.1f MB",
            variant,
            metric,
            detail[metric],
            detail["latency_ms_p50"],
            detail["size_mb"],
        )
        log_variant_run(
            tracker,
            variant,
            {measured.names[k]: v for k, v in results[variant].items()},
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
    baselines = {
        name: {key: scores[key] for key in measured.names if key in scores}
        for name, scores in measured.baselines.items()
    }
    if baselines:
        write_json(details_dir / BASELINES_FILE, measured.baselines)
        for name, scores in baselines.items():
            log.info("baseline %s: %s %.4f", name, metric, scores[metric])
    recommendation = recommend(
        results, cfg.report.baseline, cfg.report.max_drop_pts, cfg.guard_metrics()
    )
    write_json(
        layout.metrics_file,
        {
            "task": cfg.task.type,
            "metric": metric,
            "recommended": recommendation["variant"],
            "recommendation": recommendation,
            "variants": results,
            **({"baselines": baselines} if baselines else {}),
        },
    )
    if active is not None:
        import mlflow

        mlflow.log_metrics(
            {
                f"baseline/{name}/{key}": value
                for name, scores in baselines.items()
                for key, value in scores.items()
            }
        )
        mlflow.log_artifact(str(layout.metrics_file))

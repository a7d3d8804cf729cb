"""evaluate: quality, latency, throughput and size of every variant on the same test inputs,
and the cost to train it, on `evaluate.device` (variants whose kernels are CPU-only on the CPU,
marked so).

Quality is accuracy for classification, entity F1 (seqeval) for NER, where the majority-tag and
gazetteer baselines are scored in the same run. The recommended variant also answers every test
text as `trimflow serve` does: the reference profile `trimflow monitor` compares traffic with.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from trimflow.compress.variants import load_variant, variant_runtime
from trimflow.config.schema import FINETUNED, TrimflowConfig
from trimflow.evaluation.baselines import baseline_scores
from trimflow.evaluation.benchmark import (
    latency_and_throughput_timings,
    latency_summary,
    throughput_summary,
)
from trimflow.evaluation.beyond_accuracy import (
    BeyondInputs,
    against_baseline,
    attribution_figures,
    build_beyond_inputs,
    variant_figures,
)
from trimflow.evaluation.cost import training_cost
from trimflow.evaluation.devices import variant_devices
from trimflow.evaluation.footprint import count_parameters, size_on_disk_mb
from trimflow.evaluation.inference import input_device
from trimflow.evaluation.inputs import TestInputs, build_test_inputs, inference_data
from trimflow.evaluation.machine import environment
from trimflow.evaluation.merging import MERGE_FIELDS, merge_agreement
from trimflow.evaluation.scoring import EntityScorer, LabelScorer, agreement, make_scorer
from trimflow.evaluation.summary import Measurements, mlflow_names, summarise
from trimflow.layout import ADAPTATION_FILE, ADAPTER_DIR, Layout, read_label_map
from trimflow.models.loading import WEIGHT_SUFFIXES
from trimflow.monitoring.profile import reference_profile, split_texts
from trimflow.serving.pyfunc import VariantModel
from trimflow.tracking.runs import BASELINE_PREFIX, Tracker, log_variant_run
from trimflow.utils.atomic import atomic_dir, read_json, write_json
from trimflow.utils.device import resolve_device
from trimflow.utils.progress import progress

log = logging.getLogger(__name__)
BASELINES_FILE = "baselines.json"


def run(cfg: TrimflowConfig, layout: Layout) -> None:
    """Measure every variant, summarise the measurements, write them, log them.

    1. Build the test inputs and the task's scorer once, from data/tokenized.
    2. Measure: score each variant (loaded from disk) and its agreement with its source, read
       its cost to train, then time all of them in interleaved rounds; score the NER baselines.
    3. Summarise: metrics.json's payload, recommendation on `report.objective` included
       (evaluation/summary.py).
    4. Profile the recommended variant on the test split (monitoring/profile.py).
    5. Write a detail file per variant, baselines.json (NER), environment.json, metrics.json,
       reference_profile.json.
    6. Log a run per variant, the baselines, metrics.json and the profile to MLflow.
    """
    label_map = read_label_map(layout.finetuned)
    data = inference_data(layout, cfg.evaluate.batch_size)
    inputs = build_test_inputs(data, cfg)
    scorer = make_scorer(cfg, layout, label_map["labels"])
    beyond = build_beyond_inputs(cfg, layout, data, label_map["labels"], scorer)
    tracker = Tracker(cfg)
    with tracker.stage_run("evaluate", label_map["dataset_digest"]) as active:
        measured = Measurements(
            _measure_variants(cfg, layout, inputs, scorer, beyond),
            _score_baselines(cfg, layout),
            mlflow_names(scorer.quality_keys, cfg.beyond_metrics()),
        )
        summary = summarise(
            measured,
            task=cfg.task.type,
            metric=cfg.task.metric,
            baseline=cfg.report.baseline,
            max_drop_pts=cfg.report.max_drop_pts,
            guards=cfg.guard_metrics(),
            objective=cfg.report.objective,
        )
        _log_results(summary)
        profile = _reference_profile(cfg, layout, summary["recommended"])
        # The details folder is the stage's completion marker: it appears only once every file
        # is written and every run logged (the variant runs attach their files from inside it).
        with atomic_dir(layout.variant_details) as details_dir:
            detail_files = _write_details(cfg, measured, details_dir)
            write_json(layout.metrics_file, summary)
            write_json(layout.reference_profile, profile)
            _log(tracker, active, summary, measured.names, detail_files, layout)


def _variant_sources(cfg: TrimflowConfig) -> dict[str, str]:
    """Each variant -> the variant its predictions are compared with (agreement).

    A quantized variant is compared with the model it quantizes; every other variant with the
    fine-tuned model. Sources come first in this order, so they are scored first.
    """
    return {
        name: cfg.quantize.variants[name].source if kind == "quantize" else FINETUNED
        for name, kind in cfg.variant_kinds().items()
    }


def _measure_variants(
    cfg: TrimflowConfig,
    layout: Layout,
    inputs: TestInputs,
    scorer: LabelScorer | EntityScorer,
    beyond: BeyondInputs,
) -> dict[str, dict]:
    """Score every variant (each loaded from disk), measure what it changes besides accuracy
    and read its cost to train, then time them all together."""
    models, details = {}, {}
    devices = variant_devices(cfg)
    for variant, source in progress(_variant_sources(cfg).items(), "score", log, unit="variant"):
        directory = layout.model_dir(variant)
        models[variant] = load_variant(directory, cfg.evaluate.num_threads, devices[variant])
        details[variant] = _score_variant(models[variant], directory, inputs, scorer)
        details[variant].update(variant_figures(cfg, models[variant], details[variant], beyond))
        details[variant].update(
            training_cost(directory),
            source=source,
            device=devices[variant],
            runtime=variant_runtime(directory),
        )
        details[variant]["agreement"] = agreement(
            details[variant]["predictions"], details[source]["predictions"]
        )
        details[variant].update(
            _check_merge(models[variant], directory, inputs)
            if cfg.evaluate.merge_check
            else dict.fromkeys(MERGE_FIELDS)
        )
    _compare_with_baseline(cfg, layout, details, models, scorer, beyond)
    log.info("timing %d variants in %d interleaved rounds", len(models), cfg.evaluate.rounds)
    for variant, timing in _time_variants(models, inputs, cfg).items():
        details[variant].update(timing)
    return details


def _compare_with_baseline(
    cfg: TrimflowConfig,
    layout: Layout,
    details: dict[str, dict],
    models: dict,
    scorer: LabelScorer | EntityScorer,
    beyond: BeyondInputs,
) -> None:
    """Add each variant's loyalty to `report.baseline`, its flip set and (classification, when
    `evaluate.explanations.sample`) the agreement of its word attributions with the
    baseline's; drop the logits, which no file keeps."""
    baseline = cfg.report.baseline
    truth = scorer.gold if cfg.task.type == "ner" else scorer.truth
    for variant, figures in against_baseline(cfg, details, baseline, truth, beyond.texts).items():
        details[variant].update(figures)
    if beyond.explained:
        served = {
            name: VariantModel().load(
                layout.model_dir(name), max_length=cfg.evaluate.explanations.max_length, model=model
            )
            for name, model in models.items()
        }
        log.info(
            "explaining %d test texts (%d tokens each) with every variant",
            len(beyond.explained),
            cfg.evaluate.explanations.max_length,
        )
        top_k = cfg.evaluate.explanations.top_k
        for variant, figures in attribution_figures(
            served, baseline, beyond.explained, top_k
        ).items():
            details[variant].update(figures)
    for detail in details.values():
        detail.pop("logits", None)


def _check_merge(merged, directory: Path, inputs: TestInputs) -> dict[str, float | None]:
    """Compare a merged adapted variant with its base model + adapter on the test inputs
    (None for every other variant)."""
    adaptation = directory / ADAPTATION_FILE
    if not (adaptation.is_file() and read_json(adaptation)["merged"]):
        return dict.fromkeys(MERGE_FIELDS)
    from trimflow.models.adapters import load_unmerged  # peft takes ~2 s to import

    unmerged = load_unmerged(directory).to(input_device(merged))
    check = merge_agreement(merged, unmerged, inputs.sorted_batches)
    log.info(
        "%s: merged vs unmerged: max |logit diff| %.2e, agreement %.4f",
        directory.name,
        check["merge_max_abs_diff"],
        check["merge_agreement"],
    )
    return check


def _score_variant(
    model, directory: Path, inputs: TestInputs, scorer: LabelScorer | EntityScorer
) -> dict:
    """Quality scores, predictions, size and parameter counts of one variant."""
    params, nonzero = count_parameters(model)
    return {
        **scorer.score(model, inputs.sorted_batches, inputs.order),
        "size_mb": _weights_size_mb(directory),
        "params": params,
        "nonzero_params": nonzero,
    }


def _weights_size_mb(directory: Path) -> float:
    """Size of the weight files only (tokenizer and metadata are the same for every variant).

    A variant run unmerged (prefix tuning) needs its base model's weights and its adapter.
    """
    weights = [path for path in directory.iterdir() if path.name.endswith(WEIGHT_SUFFIXES)]
    if weights or not (directory / ADAPTATION_FILE).is_file():
        return sum(size_on_disk_mb(path) for path in weights)
    base_mb = read_json(directory / ADAPTATION_FILE)["base_weights_mb"]
    return base_mb + size_on_disk_mb(directory / ADAPTER_DIR)


def _time_variants(models: dict, inputs: TestInputs, cfg: TrimflowConfig) -> dict[str, dict]:
    """Latency (batch 1), throughput and, on a GPU, peak GPU memory of every model, measured
    in interleaved rounds."""
    ev = cfg.evaluate
    (latency, latency_peaks), (throughput, throughput_peaks) = latency_and_throughput_timings(
        models, inputs.latency_inputs, inputs.throughput_batches, ev, ev.rounds, ev.num_threads
    )
    return {
        name: {
            **latency_summary(latency[name]),
            **throughput_summary(throughput[name]),
            "peak_gpu_mem_mb": (
                max(latency_peaks[name], throughput_peaks[name]) if name in latency_peaks else None
            ),
        }
        for name in models
    }


def _score_baselines(cfg: TrimflowConfig, layout: Layout) -> dict[str, dict]:
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


def _reference_profile(cfg: TrimflowConfig, layout: Layout, variant: str) -> dict:
    """`variant`'s prediction-log records of the test texts, loaded and tokenized (at
    `model.max_length`) as `trimflow serve` serves it."""
    model = VariantModel().load(layout.model_dir(variant), max_length=cfg.model.max_length)
    texts = split_texts(layout.prepared, "test", cfg.task.type)
    log.info("reference profile: %s on %d test texts", variant, len(texts))
    return reference_profile(model, texts, variant, "test", cfg.evaluate.batch_size)


def _log_results(summary: dict[str, Any]) -> None:
    """One line per variant and per baseline: quality, batch-1 latency, size."""
    metric = summary["metric"]
    for variant, values in summary["variants"].items():
        log.info(
            "%s: %s %.4f, p50 %.1f ms, %.1f MB",
            variant,
            metric,
            values[metric],
            values["latency_ms_p50"],
            values["size_mb"],
        )
    for name, scores in summary.get("baselines", {}).items():
        log.info("baseline %s: %s %.4f", name, metric, scores[metric])


def _write_details(
    cfg: TrimflowConfig, measured: Measurements, details_dir: Path
) -> dict[str, Path]:
    """A detail file per variant (predictions included), baselines.json for NER and
    environment.json in `details_dir`; returns each variant's detail file."""
    detail_files = {}
    for variant, detail in measured.details.items():
        detail_files[variant] = details_dir / f"{variant}.json"
        write_json(detail_files[variant], {"variant": variant, **detail})
    if measured.baselines:
        write_json(details_dir / BASELINES_FILE, measured.baselines)
    write_json(
        details_dir / "environment.json",
        {
            **environment(),
            "num_threads": cfg.evaluate.num_threads,
            "device": resolve_device(cfg.evaluate.device),
            **({"gpu": torch.cuda.get_device_name()} if torch.cuda.is_available() else {}),
            "rounds": cfg.evaluate.rounds,
        },
    )
    return detail_files


def _log(
    tracker: Tracker,
    active,
    summary: dict[str, Any],
    names: dict[str, str],
    detail_files: dict[str, Path],
    layout: Layout,
) -> None:
    """A run per variant (its metrics.json numbers under MLflow names, its detail file), then
    the baselines' numbers, metrics.json and the reference profile on the stage run; nothing
    when tracking is off."""
    for variant, values in summary["variants"].items():
        log_variant_run(
            tracker,
            variant,
            {names[key]: value for key, value in values.items() if key in names},
            active,
            [str(detail_files[variant])],
            values["device"],
            values["runtime"],
        )
    tracker.log_metrics(
        {
            f"{name}/{key}": value
            for name, scores in summary.get("baselines", {}).items()
            for key, value in scores.items()
        },
        BASELINE_PREFIX,
    )
    tracker.log_artifacts(layout.metrics_file, layout.reference_profile)

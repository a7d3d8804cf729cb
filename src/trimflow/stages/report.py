"""report: reports/report.md, a self-contained report.html, and the plots behind them."""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from trimflow.config.schema import TrimflowConfig
from trimflow.layout import HISTORY_FILE, Layout, read_label_map
from trimflow.report.beyond import beyond_figures, beyond_keys, beyond_section, forgotten_section
from trimflow.report.pareto import quality_metric, quality_points
from trimflow.report.plots import (
    confusion_figure,
    save_figure,
    score_heatmap,
    tradeoff_figure,
    training_curves_figure,
)
from trimflow.report.render import render_html, render_markdown
from trimflow.report.tables import (
    METRIC_LABELS,
    Section,
    Table,
    baseline_table,
    cost_table,
    exclusion_lines,
    per_type_table,
    ran_on_gpu,
    recommendation_text,
    runtime_note,
    runtime_table,
    variant_columns,
    variant_rows,
)
from trimflow.tracking.runs import Tracker
from trimflow.utils.atomic import atomic_file, read_json

log = logging.getLogger(__name__)
TRADEOFF_CSV = "tradeoff.csv"


def run(cfg: TrimflowConfig, layout: Layout) -> None:
    """Read evaluate's metrics and details; draw the plots and write the trade-off CSV,
    report.md and report.html; log them and, per `tracking.register_model`, register the
    recommended variant."""
    metrics = read_json(layout.metrics_file)
    environment = read_json(layout.variant_details / "environment.json")
    details = _variant_details(cfg, layout)
    tables = _report_tables(cfg, metrics, details)
    runtimes = runtime_table(metrics, _model_forms(cfg))
    if runtimes.rows:
        tables.append(runtimes)
    summary = recommendation_text(metrics["recommendation"])
    excluded = exclusion_lines(metrics["recommendation"])
    notes = [
        runtime_note(metrics, runtimes),
        f"Measured on {environment['cpu_model']} ({environment['machine']}; "
        f"{', '.join(environment['cpu_flags']) or 'no AVX2'}), {environment['cpu_count']} CPUs, "
        f"{environment['num_threads']} torch threads, "
        f"device {environment['device']}, torch {environment['torch']}.",
        "Size counts the weight files only; the tokenizer is the same for every variant.",
        "Unstructured magnitude sparsity does not speed up dense kernels; its gain is size: "
        "sparse variants are stored as a bitmask plus non-zero values. Structured pruning "
        "(heads, FFN neurons), distillation and int8 give speed.",
        "Agreement is the share of test predictions (labels; for NER, word tags) equal to the "
        "source model's (the quantized model's input, or the fine-tuned model).",
        "bf16/fp16 variants target GPU inference; here they were timed on the CPU.",
        "Peak training memory is the training loop's peak: on CUDA the tensors allocated "
        "(max_memory_allocated), on the CPU the process's peak resident set (VmHWM, reset at "
        "the start of training; the lifetime peak where Linux's clear_refs cannot be written), "
        "so it includes the model, optimizer state and data loaded before the loop; the "
        "largest of the processes' in data-parallel training. A quantized variant carries its "
        "source's training figures.",
    ]
    label_map = read_label_map(layout.finetuned)
    tracker = Tracker(cfg)
    with tracker.stage_run("report", label_map["dataset_digest"]) as active:
        images = _draw_plots(cfg, layout, metrics, details)
        sections = _sections(cfg, layout, metrics, details)
        _write_tradeoff_csv(tables[0].rows, quality_metric(metrics), layout.plots / TRADEOFF_CSV)
        linked = [replace(s, images=_relative(s.images, layout)) for s in sections]
        markdown = render_markdown(
            cfg.report.title, summary, tables, _relative(images, layout), notes, excluded, linked
        )
        page = render_html(cfg.report.title, summary, tables, images, notes, excluded, sections)
        with atomic_file(layout.reports / "report.md") as handle:
            handle.write(markdown)
        with atomic_file(layout.report_file) as handle:
            handle.write(page)
        tracker.log_artifacts(layout.report_file, layout.reports / "report.md", layout.plots)
        if active is not None and cfg.tracking.register_model:
            from trimflow.serving.registry import publish_recommended

            publish_recommended(cfg, layout, metrics, active.info.run_id)
    log.info("wrote %s", layout.report_file)


def _trained_variants(cfg: TrimflowConfig) -> list[str]:
    """The variants a stage may have trained: every kind but quantize (which copies its
    source's training files)."""
    return [name for name, kind in cfg.variant_kinds().items() if kind != "quantize"]


def _model_forms(cfg: TrimflowConfig) -> dict[str, list[str]]:
    """Each trained variant -> itself and its quantized forms."""
    forms = {name: [name] for name in _trained_variants(cfg)}
    for name, spec in cfg.quantize.variants.items():
        forms[spec.source].append(name)
    return forms


def _histories(cfg: TrimflowConfig, layout: Layout) -> dict[str, pd.DataFrame]:
    """Training curves of every trained variant: fine-tune, pruning recoveries, students."""
    return {
        name: pd.read_csv(layout.model_dir(name) / HISTORY_FILE)
        for name in _trained_variants(cfg)
        if (layout.model_dir(name) / HISTORY_FILE).exists()
    }


def _relative(images: Mapping[str, Path], layout: Layout) -> dict[str, str]:
    """Each image's path relative to reports/, as report.md links it."""
    return {caption: str(path.relative_to(layout.reports)) for caption, path in images.items()}


def _write_tradeoff_csv(rows: list[dict], metric: str, path: Path) -> None:
    """The numbers behind the trade-off plots, for `dvc plots show`, and the beyond-accuracy
    figures evaluate wrote; `quality` is `metric`."""
    fields = ["variant", "quality", "latency_ms_p50", "size_mb", "throughput_sps"]
    fields += beyond_keys(rows)
    with atomic_file(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**row, "quality": row[metric]} for row in rows)


def _variant_details(cfg: TrimflowConfig, layout: Layout) -> dict[str, dict]:
    """evaluate's detail file of every declared variant."""
    return {
        name: read_json(layout.variant_details / f"{name}.json") for name in cfg.variant_kinds()
    }


def _draw_plots(
    cfg: TrimflowConfig, layout: Layout, metrics: dict, details: dict[str, dict]
) -> dict[str, Path]:
    """Save every figure under reports/plots/; returns caption -> PNG path."""
    plots = layout.plots
    plots.mkdir(parents=True, exist_ok=True)
    label = METRIC_LABELS[quality_metric(metrics)]
    label = label[0].upper() + label[1:]
    figures = {
        f"{label} vs latency (batch 1, p50)": (
            "quality_vs_latency.png",
            tradeoff_figure(metrics, "latency_ms_p50", "p50 latency at batch 1 (ms)"),
        ),
        f"{label} vs size on disk": (
            "quality_vs_size.png",
            tradeoff_figure(metrics, "size_mb", "weights on disk (MB)"),
        ),
    }
    if quality_points(metrics, "peak_train_mem_mb"):
        figures[f"{label} vs peak training memory"] = (
            "quality_vs_train_memory.png",
            tradeoff_figure(metrics, "peak_train_mem_mb", "peak training memory (MB)"),
        )
    if cfg.task.type == "ner":
        table = per_type_table(details)
        types = [column.header for column in table.columns[1:]]
        figures["Entity F1 per type and variant"] = (
            "per_type_f1.png",
            score_heatmap(
                list(details),
                types,
                [[row["per_type"].get(t, {}).get("f1", 0.0) for t in types] for row in table.rows],
                "entity F1 per type",
            ),
        )
    for variant in dict.fromkeys([cfg.report.baseline, metrics["recommended"]]):
        detail = details[variant]
        names = detail.get("label_names") or detail["confusion_labels"]
        kind = "Entity-type confusion" if cfg.task.type == "ner" else "Confusion matrix"
        figures[f"{kind}: {variant}"] = (
            f"confusion_{variant}.png",
            confusion_figure(names, detail["confusion_matrix"], variant),
        )
    curves = training_curves_figure(_histories(cfg, layout))
    if curves is not None:
        figures["Training curves"] = ("training_curves.png", curves)
    return _save_figures(figures, plots)


def _save_figures(figures: Mapping[str, tuple[str, Figure]], plots: Path) -> dict[str, Path]:
    """Save each figure (caption -> file name, figure) under `plots`; caption -> PNG path."""
    images = {}
    for caption, (name, figure) in figures.items():
        save_figure(figure, plots / name)
        images[caption] = plots / name
    return images


def _sections(
    cfg: TrimflowConfig, layout: Layout, metrics: dict, details: dict[str, dict]
) -> list[Section]:
    """The "Beyond accuracy" section with its figures, and what the recommended variant
    forgot, where evaluate wrote their figures."""
    baseline = cfg.report.baseline
    images = _save_figures(beyond_figures(metrics, details, baseline), layout.plots)
    beyond = beyond_section(metrics, baseline, images)
    forgotten = forgotten_section(metrics, details, baseline)
    return [section for section in (beyond, forgotten) if section is not None]


def _report_tables(cfg: TrimflowConfig, metrics: dict, details: dict[str, dict]) -> list[Table]:
    """The variant table, the cost to train the trained variants; for NER also per-type entity
    F1 and the baselines."""
    metric = quality_metric(metrics)
    rows = variant_rows(metrics, baseline=cfg.report.baseline)
    tables = [Table("", variant_columns(metric, ran_on_gpu(metrics)), rows)]
    costs = cost_table(metrics, _trained_variants(cfg))
    if costs.rows:
        tables.append(costs)
    if cfg.task.type == "ner":
        tables += [per_type_table(details), baseline_table(metrics, cfg.report.baseline)]
    return tables

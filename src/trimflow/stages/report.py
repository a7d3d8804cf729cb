"""report: reports/report.md, a self-contained report.html, and the plots behind them."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pandas as pd

from trimflow.config.schema import TrimflowConfig
from trimflow.layout import Layout
from trimflow.models.loading import read_label_map
from trimflow.report.plots import (
    confusion_figure,
    save_figure,
    tradeoff_figure,
    training_curves_figure,
)
from trimflow.report.render import render_html, render_markdown
from trimflow.report.tables import recommendation_text, variant_rows
from trimflow.stages.finetune import HISTORY_FILE
from trimflow.tracking.runs import Tracker
from trimflow.utils.atomic import atomic_file, read_json

log = logging.getLogger(__name__)
TRADEOFF_CSV = "tradeoff.csv"


def _histories(cfg: TrimflowConfig, layout: Layout) -> dict[str, pd.DataFrame]:
    """Training curves of every trained variant: fine-tune, pruning recoveries, students."""
    trained = [name for name, kind in cfg.variant_kinds().items() if kind != "quantize"]
    return {
        name: pd.read_csv(layout.model_dir(name) / HISTORY_FILE)
        for name in trained
        if (layout.model_dir(name) / HISTORY_FILE).exists()
    }


def _write_tradeoff_csv(rows: list[dict], path: Path) -> None:
    """The numbers behind the trade-off plots, for `dvc plots show`."""
    fields = ["variant", "accuracy", "latency_ms_p50", "size_mb", "throughput_sps"]
    with atomic_file(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def draw_plots(cfg: TrimflowConfig, layout: Layout, metrics: dict) -> dict[str, Path]:
    """Save every figure under reports/plots/; returns caption -> PNG path."""
    plots = layout.plots
    plots.mkdir(parents=True, exist_ok=True)
    figures = {
        "Accuracy vs latency (batch 1, p50)": (
            "accuracy_vs_latency.png",
            tradeoff_figure(metrics, "latency_ms_p50", "p50 latency at batch 1 (ms)"),
        ),
        "Accuracy vs size on disk": (
            "accuracy_vs_size.png",
            tradeoff_figure(metrics, "size_mb", "weights on disk (MB)"),
        ),
    }
    for variant in dict.fromkeys([cfg.report.baseline, metrics["recommended"]]):
        detail = read_json(layout.variant_details / f"{variant}.json")
        figures[f"Confusion matrix: {variant}"] = (
            f"confusion_{variant}.png",
            confusion_figure(detail["label_names"], detail["confusion_matrix"], variant),
        )
    curves = training_curves_figure(_histories(cfg, layout))
    if curves is not None:
        figures["Training curves"] = ("training_curves.png", curves)
    images = {}
    for caption, (name, figure) in figures.items():
        save_figure(figure, plots / name)
        images[caption] = plots / name
    return images


def run(cfg: TrimflowConfig, layout: Layout) -> None:
    metrics = read_json(layout.metrics_file)
    environment = read_json(layout.variant_details / "environment.json")
    rows = variant_rows(metrics, baseline=cfg.report.baseline)
    summary = recommendation_text(metrics["recommendation"])
    notes = [
        f"Measured on {environment['machine']} ({environment['processor']}), "
        f"{environment['cpu_count']} CPUs, {environment['num_threads']} torch threads, "
        f"device {environment['device']}, torch {environment['torch']}.",
        "Size counts the weight files only; the tokenizer is the same for every variant.",
        "Unstructured magnitude sparsity does not speed up dense kernels; its gain is size: "
        "sparse variants are stored as a bitmask plus non-zero values. Structured pruning "
        "(heads, FFN neurons), distillation and int8 give speed.",
        "Agreement is the share of test predictions equal to the source model's (the "
        "quantized model's input, or the fine-tuned model).",
        "bf16/fp16 variants target GPU inference; here they were timed on the CPU.",
    ]
    label_map = read_label_map(layout.finetuned)
    with Tracker(cfg).stage_run("report", label_map["dataset_digest"]) as active:
        images = draw_plots(cfg, layout, metrics)
        _write_tradeoff_csv(rows, layout.plots / TRADEOFF_CSV)
        relative = {
            caption: str(path.relative_to(layout.reports)) for caption, path in images.items()
        }
        markdown = render_markdown(cfg.report.title, summary, rows, relative, notes)
        page = render_html(cfg.report.title, summary, rows, images, notes)
        with atomic_file(layout.reports / "report.md") as handle:
            handle.write(markdown)
        with atomic_file(layout.reports / "report.html") as handle:
            handle.write(page)
        if active is not None:
            import mlflow

            mlflow.log_artifact(str(layout.reports / "report.html"))
            mlflow.log_artifact(str(layout.reports / "report.md"))
            mlflow.log_artifacts(str(layout.plots), "plots")
    log.info("wrote %s", layout.reports / "report.html")

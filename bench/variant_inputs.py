"""What the variant benchmarks share: the variant to measure and the test split's texts."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from trimflow.config.schema import TrimflowConfig
from trimflow.layout import Layout


def bench_variant_dir(layout: Layout, variant: str | None) -> tuple[str, Path]:
    """(name, directory) of `variant`, by default the one reports/metrics.json recommends; a
    clear error if the pipeline has not built it yet."""
    if variant is None:
        metrics = layout.reports / "metrics.json"
        if not metrics.is_file():
            raise SystemExit(f"{metrics} not found: run the pipeline first or pass --variant")
        variant = json.loads(metrics.read_text())["recommended"]
    variant_dir = layout.model_dir(variant)
    if not variant_dir.is_dir():
        raise SystemExit(f"{variant_dir} not found: run `dvc repro` for variant '{variant}' first")
    return variant, variant_dir


def split_texts(cfg: TrimflowConfig, layout: Layout) -> list[str]:
    """The test split's texts in file order (NER: its words joined by spaces)."""
    test = pd.read_parquet(layout.prepared / "test.parquet")
    if cfg.task.type == "ner":
        return test["tokens"].map(" ".join).tolist()
    return test["text"].tolist()

"""What the variant benchmarks share: the variant to measure."""

from __future__ import annotations

import json
from pathlib import Path

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

"""`trimflow compare`'s output: the comparison as rich tables, and as compare.json, .csv, .md."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from trimflow.report.tables import markdown_grid
from trimflow.tracking.compare import SMALLER_IS_BETTER, Comparison, ratio_direction
from trimflow.utils.atomic import atomic_file, write_json

RATIO_NOTE = (
    "(×): ratio to the baseline, baseline/run for "
    + " and ".join(f"{prefix}*" for prefix in SMALLER_IS_BETTER)
    + " (>1: faster, smaller or fewer errors), run/baseline for the other metrics (>1: higher)"
)


def params_table(comparison: Comparison) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the differing-params table."""
    labels = [run.label for run in comparison.runs]
    rows = [[name, *(row[label] for label in labels)] for name, row in comparison.params.items()]
    return ["param", *labels], rows


def metrics_table(comparison: Comparison) -> tuple[list[str], list[list[Any]]]:
    """The metrics table in raw numbers (the CSV): values per run, then ratios per other run."""
    labels = [run.label for run in comparison.runs]
    others = comparison.others
    header = ["metric", *labels, "ratio direction", *(f"{label} ratio" for label in others)]
    rows = [
        [
            name,
            *(values[label] for label in labels),
            ratio_direction(name),
            *(comparison.ratios[name][label] for label in others),
        ]
        for name, values in comparison.metrics.items()
    ]
    return header, rows


def metrics_display(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    """The metrics table for reading: each value followed by its ratio to the baseline."""
    labels = [run.label for run in comparison.runs]
    header = [
        "metric",
        "ratio (×)",
        *(f"{label} (baseline)" if label == comparison.baseline else label for label in labels),
    ]
    rows = [
        [
            name,
            ratio_direction(name),
            *(_with_ratio(values[label], comparison.ratios[name].get(label)) for label in labels),
        ]
        for name, values in comparison.metrics.items()
    ]
    return header, rows


def format_value(value: Any) -> str:
    """A cell for reading: '—' when missing, grouped integers, 4 decimals below 100."""
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if float(value).is_integer():
        return f"{value:,.0f}"
    return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.4f}"


def _with_ratio(value: float | None, to_baseline: float | None) -> str:
    """'0.3750 (0.75×)', or the value alone for the baseline or an undefined ratio."""
    text = format_value(value)
    return text if to_baseline is None else f"{text} ({to_baseline:.2f}×)"


def render_csv(comparison: Comparison) -> str:
    """The metrics table as CSV, raw numbers, empty cells for missing values."""
    header, rows = metrics_table(comparison)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(["" if cell is None else cell for cell in row] for row in rows)
    return buffer.getvalue()


def render_markdown(comparison: Comparison) -> str:
    """Both tables as markdown, with what was compared and the baseline."""
    header, rows = params_table(comparison)
    params = (
        markdown_grid(header, [[format_value(cell) for cell in row] for row in rows])
        if rows
        else "All params are equal."
    )
    lines = [
        "# Run comparison",
        "",
        f"{comparison.description}. Baseline: `{comparison.baseline}`.",
        "",
        "## Params that differ",
        "",
        params,
        "",
        "## Metrics",
        "",
        f"{RATIO_NOTE}.",
        "",
        markdown_grid(*metrics_display(comparison)),
    ]
    return "\n".join(lines) + "\n"


def rich_report(comparison: Comparison) -> list[Any]:
    """What was compared, then both tables as rich Tables (the ratio direction as caption)."""
    from rich.table import Table
    from rich.text import Text

    header, rows = params_table(comparison)
    params = Table(title="Params that differ", caption=None if rows else "all params are equal")
    for name in header:
        params.add_column(name, overflow="fold")
    for row in rows:
        params.add_row(*(format_value(cell) for cell in row))

    header, rows = metrics_display(comparison)
    metrics = Table(title="Metrics", caption=RATIO_NOTE)
    metrics.add_column(header[0], no_wrap=True)
    metrics.add_column(header[1], no_wrap=True)
    for name in header[2:]:
        metrics.add_column(name, justify="right")
    for row in rows:
        metrics.add_row(*row)
    heading = f"{comparison.description}; baseline: {comparison.baseline}"
    return [Text(heading, style="bold"), params, metrics]


def write_outputs(comparison: Comparison, out_dir: str | Path) -> list[Path]:
    """compare.json, compare.csv and compare.md in `out_dir`, each written atomically."""
    out = Path(out_dir)
    write_json(out / "compare.json", comparison.to_dict())
    for name, text in (
        ("compare.csv", render_csv(comparison)),
        ("compare.md", render_markdown(comparison)),
    ):
        with atomic_file(out / name) as handle:
            handle.write(text)
    return [out / name for name in ("compare.json", "compare.csv", "compare.md")]

"""Per-variant comparison rows against a baseline, and their markdown table."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from trimflow.report.pareto import accuracy_points, pareto_front

Row = dict[str, Any]
FRONTIER_MARK = "★"
RECOMMENDED_MARK = "(recommended)"


def variant_rows(metrics: Mapping[str, Any], baseline: str = "finetuned") -> list[Row]:
    """One row per variant: its measured values plus ratios against `baseline`."""
    variants = metrics["variants"]
    if baseline not in variants:
        raise KeyError(
            f"baseline variant {baseline!r} is missing from metrics "
            f"(available: {', '.join(variants) or 'none'})"
        )
    base = variants[baseline]
    latency_front = set(pareto_front(accuracy_points(metrics, "latency_ms_p50")))
    size_front = set(pareto_front(accuracy_points(metrics, "size_mb")))
    return [
        {
            "variant": name,
            **values,
            "sparsity": 1 - values["nonzero_params"] / values["params"],
            "speedup": base["latency_ms_p50"] / values["latency_ms_p50"],
            "size_ratio": base["size_mb"] / values["size_mb"],
            "throughput_ratio": values["throughput_sps"] / base["throughput_sps"],
            "accuracy_delta_pts": 100 * (values["accuracy"] - base["accuracy"]),
            "pareto_latency": name in latency_front,
            "pareto_size": name in size_front,
            "recommended": name == metrics.get("recommended"),
        }
        for name, values in variants.items()
    ]


@dataclass(frozen=True)
class Column:
    """A table column: its header, how to format a row's cell, and whether it is numeric."""

    header: str
    cell: Callable[[Row], str]
    numeric: bool = True


def _milliseconds(value: float) -> str:
    return f"{value:.2f}"


def _ratio(value: float) -> str:
    return f"{value:.2f}x"


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.2f}%"


def _marked(text: str, on_frontier: bool) -> str:
    return f"{text} {FRONTIER_MARK}" if on_frontier else text


COLUMNS: tuple[Column, ...] = (
    Column(
        "Variant",
        lambda row: (
            f"{row['variant']} {RECOMMENDED_MARK}" if row["recommended"] else row["variant"]
        ),
        numeric=False,
    ),
    Column("Accuracy", lambda row: _percent(row["accuracy"])),
    Column("Δ acc (pts)", lambda row: f"{row['accuracy_delta_pts']:+.2f}"),
    Column("Macro-F1", lambda row: f"{row['macro_f1']:.3f}"),
    Column(
        "p50 (ms)", lambda row: _marked(_milliseconds(row["latency_ms_p50"]), row["pareto_latency"])
    ),
    Column("p95 (ms)", lambda row: _milliseconds(row["latency_ms_p95"])),
    Column("Speedup", lambda row: _ratio(row["speedup"])),
    Column("Throughput (samples/s)", lambda row: f"{row['throughput_sps']:.1f}"),
    Column("Throughput gain", lambda row: _ratio(row["throughput_ratio"])),
    Column("Size (MB)", lambda row: _marked(f"{row['size_mb']:.1f}", row["pareto_size"])),
    Column("Smaller", lambda row: _ratio(row["size_ratio"])),
    Column("Sparsity", lambda row: f"{100 * row['sparsity']:.1f}%"),
    Column("Agreement", lambda row: _percent(row["agreement"])),
)


def format_cells(row: Row) -> list[str]:
    """The display text of each column for one row."""
    return [column.cell(row) for column in COLUMNS]


def _markdown_line(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def markdown_table(rows: Sequence[Row]) -> str:
    """A GitHub markdown table of `rows`; frontier cells carry the ★ mark."""
    lines = [
        _markdown_line(column.header for column in COLUMNS),
        _markdown_line("---:" if column.numeric else ":---" for column in COLUMNS),
        *(_markdown_line(format_cells(row)) for row in rows),
    ]
    return "\n".join(lines) + "\n"


def recommendation_text(recommendation: Mapping[str, Any]) -> str:
    """One sentence naming the recommended variant and its ratios against the baseline."""
    return (
        f"Recommended: {recommendation['variant']}, the fastest variant within "
        f"{recommendation['max_accuracy_drop']:.1f} accuracy points of "
        f"{recommendation['baseline']}: {recommendation['speedup']:.2f}x faster at batch 1, "
        f"{recommendation['size_ratio']:.2f}x smaller on disk, "
        f"accuracy {-recommendation['accuracy_drop_pts']:+.2f} points."
    )

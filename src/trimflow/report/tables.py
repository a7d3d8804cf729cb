"""Per-variant comparison rows against a baseline, and their markdown tables."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trimflow.config.schema import FINETUNED
from trimflow.report.pareto import pareto_front, quality_metric, quality_points

Row = dict[str, Any]
FRONTIER_MARK = "★"
RECOMMENDED_MARK = "(recommended)"
# Display name of each quality metric evaluate writes (ranked on: accuracy; f1 for NER).
METRIC_LABELS = {
    "accuracy": "accuracy",
    "macro_f1": "macro-F1",
    "f1": "entity F1",
    "precision": "entity precision",
    "recall": "entity recall",
    "token_accuracy": "token accuracy",
}
# Display name of each runtime a variant runs on (compress.variants.variant_runtime).
RUNTIME_LABELS = {"torch": "torch", "onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}
# How the recommendation sentence describes the variant each report.objective picks.
OBJECTIVE_PHRASES = {
    "latency": "the fastest variant",
    "train_time": "the variant quickest to train",
    "train_memory": "the variant needing the least peak training memory",
}


def variant_rows(metrics: Mapping[str, Any], baseline: str = FINETUNED) -> list[Row]:
    """One row per variant: its measured values plus ratios against `baseline`."""
    variants = metrics["variants"]
    if baseline not in variants:
        raise KeyError(
            f"baseline variant {baseline!r} is missing from metrics "
            f"(available: {', '.join(variants) or 'none'})"
        )
    base = variants[baseline]
    metric = quality_metric(metrics)
    latency_front = set(pareto_front(quality_points(metrics, "latency_ms_p50")))
    size_front = set(pareto_front(quality_points(metrics, "size_mb")))
    return [
        {
            "variant": name,
            **values,
            "sparsity": 1 - values["nonzero_params"] / values["params"],
            "speedup": base["latency_ms_p50"] / values["latency_ms_p50"],
            "size_ratio": base["size_mb"] / values["size_mb"],
            "throughput_ratio": values["throughput_sps"] / base["throughput_sps"],
            "delta_pts": 100 * (values[metric] - base[metric]),
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


def _variant_cell(row: Row) -> str:
    return f"{row['variant']} {RECOMMENDED_MARK}" if row["recommended"] else row["variant"]


def _quality_columns(metric: str) -> tuple[Column, ...]:
    """The task's quality columns: accuracy and macro-F1, or entity F1, P, R, token accuracy."""
    if metric == "f1":
        return (
            Column("Entity F1", lambda row: f"{row['f1']:.3f}"),
            Column("Δ F1 (pts)", lambda row: f"{row['delta_pts']:+.2f}"),
            Column("Precision", lambda row: f"{row['precision']:.3f}"),
            Column("Recall", lambda row: f"{row['recall']:.3f}"),
            Column("Token acc", lambda row: _percent(row["token_accuracy"])),
        )
    return (
        Column("Accuracy", lambda row: _percent(row["accuracy"])),
        Column("Δ acc (pts)", lambda row: f"{row['delta_pts']:+.2f}"),
        Column("Macro-F1", lambda row: f"{row['macro_f1']:.3f}"),
    )


MEASURE_COLUMNS: tuple[Column, ...] = (
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


def _optional(value: float | None, template: str) -> str:
    return "–" if value is None else template.format(value)


# A run on a GPU: where each variant ran (CPU-only kernels stay on the CPU) and its GPU memory.
GPU_COLUMNS: tuple[Column, ...] = (
    Column("Device", lambda row: row["device"], numeric=False),
    Column("GPU memory (MB)", lambda row: _optional(row["peak_gpu_mem_mb"], "{:.0f}")),
)


def ran_on_gpu(metrics: Mapping[str, Any]) -> bool:
    """Whether any variant was evaluated on a GPU."""
    return any(values.get("device") == "cuda" for values in metrics["variants"].values())


def variant_columns(metric: str = "accuracy", gpu: bool = False) -> tuple[Column, ...]:
    """Columns of the main variant table for a task ranked on `metric` (`gpu`: with the
    device and GPU memory of each variant)."""
    return (
        Column("Variant", _variant_cell, numeric=False),
        Column("Runtime", lambda row: RUNTIME_LABELS[row["runtime"]], numeric=False),
        *_quality_columns(metric),
        *(GPU_COLUMNS if gpu else ()),
        *MEASURE_COLUMNS,
    )


@dataclass(frozen=True)
class Table:
    """A report table: a heading (empty for the main one), its columns and rows, and a note
    printed under the heading (what the figures mean, where they come from)."""

    heading: str
    columns: tuple[Column, ...]
    rows: Sequence[Row]
    note: str = ""


@dataclass(frozen=True)
class Section:
    """A report section after the variant table: a heading, an introduction, its tables (under
    sub-headings) and its figures (caption -> PNG path)."""

    heading: str
    intro: str
    tables: Sequence[Table] = ()
    images: Mapping[str, str | Path] = field(default_factory=dict)


def per_type_table(details: Mapping[str, Mapping[str, Any]]) -> Table:
    """Entity F1 per type (columns) for each variant (rows), from evaluate's detail files."""
    types = sorted({t for detail in details.values() for t in detail["per_type"]})

    def f1_cell(entity_type: str) -> Callable[[Row], str]:
        return lambda row: f"{row['per_type'].get(entity_type, {}).get('f1', 0.0):.3f}"

    columns = (
        Column("Variant", lambda row: row["variant"], numeric=False),
        *(Column(t, f1_cell(t)) for t in types),
    )
    rows = [{"variant": name, "per_type": d["per_type"]} for name, d in details.items()]
    return Table("Entity F1 per type", columns, rows)


def baseline_table(metrics: Mapping[str, Any], baseline: str) -> Table:
    """Non-neural NER baselines next to the baseline variant, scored on the same test split."""
    scores = {**metrics["baselines"], baseline: metrics["variants"][baseline]}
    columns = (
        Column("Model", lambda row: row["model"], numeric=False),
        Column("Entity F1", lambda row: f"{row['f1']:.3f}"),
        Column("Precision", lambda row: f"{row['precision']:.3f}"),
        Column("Recall", lambda row: f"{row['recall']:.3f}"),
        Column("Token acc", lambda row: _percent(row["token_accuracy"])),
    )
    rows = [{"model": name, **values} for name, values in scores.items()]
    return Table("Baselines (learned from train, same test split)", columns, rows)


def _saved_size(row: Row) -> str:
    """The adapter's MB where training saved one, else the weight files' MB."""
    if row["adapter_mb"] is None:
        return f"{row['size_mb']:.1f}"
    return f"{row['adapter_mb']:.2f} (adapter)"  # a few hundred KB


COST_COLUMNS: tuple[Column, ...] = (
    Column("Variant", lambda row: row["variant"], numeric=False),
    Column("Trainable params", lambda row: f"{row['trainable_params']:,}"),
    Column(
        "Trainable share",
        lambda row: _percent(row["trainable_params"] / row["train_total_params"]),
    ),
    Column("Train time (s)", lambda row: f"{row['train_s']:.1f}"),
    Column("Samples/s", lambda row: f"{row['train_samples_per_s']:.1f}"),
    Column("Peak train memory (MB)", lambda row: f"{row['peak_train_mem_mb']:.0f}"),
    Column("MFU", lambda row: _optional(row.get("train_mfu"), "{:.1%}")),
    Column("Saved (MB)", _saved_size),
)


def cost_table(metrics: Mapping[str, Any], trained: Collection[str]) -> Table:
    """What training cost each variant in `trained` that has training figures (quantized
    variants, which repeat their source's, are left out by the caller's `trained`)."""
    rows = [
        {"variant": name, **values}
        for name, values in metrics["variants"].items()
        if name in trained and values["train_s"] is not None
    ]
    return Table("Cost to train", COST_COLUMNS, rows)


def runtime_table(metrics: Mapping[str, Any], models: Mapping[str, Sequence[str]]) -> Table:
    """Per trained model (`models`: model -> its variants, itself first), the batch-1 p50 of its
    fastest form on each runtime measured, and which form is fastest on this machine: why a
    variant runs where it does. Empty when no model was measured on more than one runtime."""
    variants = metrics["variants"]
    runtimes = [r for r in RUNTIME_LABELS if any(v["runtime"] == r for v in variants.values())]
    rows = []
    for model, forms in models.items():
        by_runtime = {
            runtime: min(
                (name for name in forms if variants[name]["runtime"] == runtime),
                key=lambda name: variants[name]["latency_ms_p50"],
                default=None,
            )
            for runtime in runtimes
        }
        if sum(name is not None for name in by_runtime.values()) > 1:
            fastest = min(forms, key=lambda name: variants[name]["latency_ms_p50"])
            rows.append({"model": model, "forms": by_runtime, "fastest": fastest})

    def p50_cell(runtime: str) -> Callable[[Row], str]:
        def cell(row: Row) -> str:
            name = row["forms"][runtime]
            return "–" if name is None else f"{variants[name]['latency_ms_p50']:.2f} ({name})"

        return cell

    columns = (
        Column("Model", lambda row: row["model"], numeric=False),
        *(Column(f"{RUNTIME_LABELS[r]} p50 (ms)", p50_cell(r)) for r in runtimes),
        Column("Fastest here", lambda row: row["fastest"], numeric=False),
    )
    return Table("Runtimes on this machine (batch 1, fastest form on each)", columns, rows)


def runtime_note(metrics: Mapping[str, Any], runtimes: Table) -> str:
    """Which runtime the recommended variant runs on, and why."""
    name = metrics["recommended"]
    runtime = RUNTIME_LABELS[metrics["variants"][name]["runtime"]]
    if not any(row["fastest"] == name for row in runtimes.rows):
        return f"The recommended variant, {name}, runs on {runtime}."
    return (
        f"The recommended variant, {name}, runs on {runtime}: of the runtimes its model was "
        "measured on in this run, the fastest at batch 1 on this CPU (table above; int8 "
        "kernels differ most between CPUs with and without VNNI/AMX)."
    )


def format_cells(row: Row, columns: Sequence[Column]) -> list[str]:
    """The display text of each column for one row."""
    return [column.cell(row) for column in columns]


def markdown_grid(
    header: Sequence[str], rows: Iterable[Sequence[str]], rules: Sequence[str] | None = None
) -> str:
    """A GitHub markdown table of text cells, '|' in cells escaped and line breaks made spaces;
    `rules` is the line under the header that aligns the columns (default: '---' each)."""
    lines = [header, rules or ["---"] * len(header), *rows]
    return "\n".join(
        "| " + " | ".join(" ".join(cell.replace("|", "\\|").splitlines()) for cell in line) + " |"
        for line in lines
    )


def markdown_table(rows: Sequence[Row], columns: Sequence[Column] | None = None) -> str:
    """A GitHub markdown table of `rows` (default: the classification variant columns)."""
    columns = columns or variant_columns()
    grid = markdown_grid(
        [column.header for column in columns],
        (format_cells(row, columns) for row in rows),
        ["---:" if column.numeric else ":---" for column in columns],
    )
    return grid + "\n"


def _drops(drops: Mapping[str, float]) -> str:
    """'accuracy -0.14 points, macro-F1 -13.04 points' for metric -> points lost."""
    return ", ".join(
        f"{METRIC_LABELS[metric]} {-drop:+.2f} points" for metric, drop in drops.items()
    )


def recommendation_text(recommendation: Mapping[str, Any]) -> str:
    """One sentence naming the recommended variant, what it was chosen on (report.objective),
    its ratios against the baseline and its change on every guarded metric."""
    *others, last = [METRIC_LABELS[metric] for metric in recommendation["guards"]]
    guards = f"{', '.join(others)} and {last}" if others else last
    return (
        f"Recommended: {recommendation['variant']}, "
        f"{OBJECTIVE_PHRASES[recommendation['objective']]} within "
        f"{recommendation['max_drop_pts']:.1f} points of {recommendation['baseline']} on "
        f"{guards}: {recommendation['speedup']:.2f}x faster at batch 1, "
        f"{recommendation['size_ratio']:.2f}x smaller on disk, "
        f"{_drops(recommendation['drop_pts'])}."
    )


def exclusion_lines(recommendation: Mapping[str, Any]) -> list[str]:
    """One line per variant the quality guards excluded: the guard(s) it failed, by how much."""
    return [f"{name}: {_drops(drops)}" for name, drops in recommendation["excluded"].items()]

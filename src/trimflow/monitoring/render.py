"""monitor.html: the verdict, a table of every feature's PSI and test, and a figure per feature
(reference vs logged), all in one self-contained page (figures as base64 PNG data URIs)."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from trimflow.report.plots import PNG_DPI
from trimflow.report.render import STYLE

HISTOGRAM_BINS = 30
PAGE_STYLE = STYLE + "tr.drifted { background: #fdecea; }\n"
COLUMNS = ("feature", "PSI", "test", "statistic", "p-value", "reference n", "logged n", "drifted")


def _number(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.2e}" if 0 < abs(value) < 10**-digits else f"{value:.{digits}f}"


def _row(name: str, result: Mapping[str, Any]) -> str:
    cells = (
        f"{name}: {result['description']}",
        _number(result["psi"]),
        result.get("test", result.get("note", "")),
        _number(result["statistic"]),
        _number(result["p_value"]),
        str(result["reference_n"]),
        str(result["logged_n"]),
        "yes" if result["drifted"] else "no",
    )
    css = ' class="drifted"' if result["drifted"] else ""
    return f"<tr{css}>" + "".join(f"<td>{escape(cell)}</td>" for cell in cells) + "</tr>"


def _data_uri(fig: Figure) -> str:
    """`fig` as a PNG data URI (the figure is cleared)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=PNG_DPI)
    fig.clear()
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _title(name: str, result: Mapping[str, Any]) -> str:
    """The feature, its PSI and p-value, and the verdict."""
    verdict = ": drift" if result["drifted"] else ""
    return f"{name}: PSI {_number(result['psi'])}, p {_number(result['p_value'])}{verdict}"


def _numeric_figure(title: str, reference: Sequence[float], logged: Sequence[float]) -> Figure:
    """Overlaid density histograms of the reference and the logged values."""
    edges = np.histogram_bin_edges(np.concatenate([reference, logged]), HISTOGRAM_BINS)
    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for values, label, color in ((reference, "reference", "C0"), (logged, "logged", "C1")):
        ax.hist(values, edges, density=True, alpha=0.5, color=color, label=label)
    ax.set(title=title, ylabel="density")
    ax.legend()
    return fig


def _categorical_figure(title: str, result: Mapping[str, Any]) -> Figure:
    """Side-by-side bars of each category's share in the reference and in the log."""
    categories = list(result["reference_shares"])
    positions = np.arange(len(categories))
    fig = Figure(figsize=(max(6.4, 0.7 * len(categories)), 3.6), layout="constrained")
    ax = fig.add_subplot()
    for offset, side, color in ((-0.2, "reference", "C0"), (0.2, "logged", "C1")):
        shares = [result[f"{side}_shares"][category] for category in categories]
        ax.bar(positions + offset, shares, 0.4, color=color, label=side)
    ax.set_xticks(positions, categories, rotation=30, ha="right")
    ax.set(title=title, ylabel="share")
    ax.legend()
    return fig


def _figure(name: str, result: Mapping[str, Any], reference: Sequence, logged: Sequence) -> str:
    if result["kind"] == "numeric":
        fig = _numeric_figure(_title(name, result), reference, logged)
    else:
        fig = _categorical_figure(_title(name, result), result)
    return (
        f'<figure><img src="{_data_uri(fig)}" alt="{escape(name)}">'
        f"<figcaption>{escape(result['description'])}</figcaption></figure>"
    )


def monitor_html(
    summary: Mapping[str, Any],
    reference_values: Mapping[str, Sequence],
    logged_values: Mapping[str, Sequence],
) -> str:
    """The page of a monitor summary (`monitor.monitor`'s) and the values it compared."""
    inputs, thresholds, features = summary["inputs"], summary["thresholds"], summary["features"]
    verdict = (
        f"Drift in {', '.join(summary['drifted_features'])}." if summary["drifted"] else "No drift."
    )
    header = "".join(f"<th>{escape(column)}</th>" for column in COLUMNS)
    rows = "\n".join(_row(name, result) for name, result in features.items())
    figures = [
        _figure(name, result, reference_values[name], logged_values[name])
        for name, result in features.items()
        if result["psi"] is not None
    ]
    body = "\n".join(
        [
            "<h1>Drift monitor</h1>",
            f"<p><strong>{escape(verdict)}</strong></p>",
            f"<p>{escape(inputs['log'])}: {inputs['logged_texts']} texts; reference "
            f"{escape(inputs['reference'])}: {inputs['reference_texts']} texts of "
            f"{escape(inputs['reference_variant'])} ({escape(inputs['task'])}).</p>",
            f"<p>A feature drifts when its PSI exceeds {thresholds['psi_threshold']} and its "
            f"two-sample test's p-value is below {thresholds['p_value']}.</p>",
            f"<table>\n<thead><tr>{header}</tr></thead>\n<tbody>\n{rows}\n</tbody>\n</table>",
            "<h2>Reference vs logged</h2>",
            *figures,
        ]
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>Drift monitor</title>\n<style>{PAGE_STYLE}</style>\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )

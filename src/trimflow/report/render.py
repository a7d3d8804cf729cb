"""Assemble the report as markdown (linked images) or one self-contained HTML page."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path

from trimflow.report.tables import (
    FRONTIER_MARK,
    Column,
    Row,
    Section,
    Table,
    format_cells,
    markdown_table,
)

READING_GUIDE = (
    "Each row is one model variant, evaluated on the same test split on the same machine.",
    "Ratios compare each variant with the baseline (the row at 1.00x): speedup is baseline "
    "p50 latency / variant p50 latency, smaller is baseline size / variant size, and "
    "Δ is the change of the task's metric (accuracy; entity F1 for NER) in percentage points.",
    "The recommendation is the variant best on report.objective (by default the fastest) "
    "among those that lose at most the configured number of points (report.max_drop_pts) on "
    "every guarded quality metric (report.guard_metrics).",
    f"{FRONTIER_MARK} marks the Pareto frontier: no other variant beats a starred one on "
    "that metric or on speed (p50 column) / size (size column) without being worse on the other.",
)

EXCLUDED_INTRO = "Excluded by the quality guards (the guarded metrics each loses too much on):"

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2rem auto;
       padding: 0 1rem; color: #222; line-height: 1.5; }
table { border-collapse: collapse; font-size: 0.9rem; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.frontier { background: #eaf3fb; }
figure { margin: 1.5rem 0; }
img { max-width: 100%; height: auto; }
figcaption { font-style: italic; color: #555; }
"""


def _markdown_table(table: Table, level: int) -> list[str]:
    """A table under its heading (`level` #s) and note, where it has them."""
    parts = [f"{'#' * level} {table.heading}"] if table.heading else []
    if table.note:
        parts.append(table.note)
    parts.append(markdown_table(table.rows, table.columns).rstrip("\n"))
    return parts


def _markdown_figures(images: Mapping[str, str | Path]) -> list[str]:
    return [f"### {caption}\n\n![{caption}]({path})" for caption, path in images.items()]


def _markdown_section(section: Section) -> list[str]:
    parts = [f"## {section.heading}", section.intro]
    for table in section.tables:
        parts.extend(_markdown_table(table, level=3))
    return parts + _markdown_figures(section.images)


def render_markdown(
    title: str,
    summary: str,
    tables: Sequence[Table],
    images: Mapping[str, str],
    notes: Sequence[str],
    excluded: Sequence[str] = (),
    sections: Sequence[Section] = (),
) -> str:
    """The report as markdown; the first table is the variant table, `sections` follow it,
    then the other tables under their headings; `images` (and each section's) map each caption
    to a relative PNG path; `excluded` lists the variants the quality guards excluded (one line
    each)."""
    parts = [f"# {title}", f"**{summary}**"]
    if excluded:
        parts.append(EXCLUDED_INTRO + "\n\n" + "\n".join(f"- {line}" for line in excluded))
    parts.extend(READING_GUIDE)
    main, *others = tables
    parts.extend(_markdown_table(main, level=2))
    for section in sections:
        parts.extend(_markdown_section(section))
    for table in others:
        parts.extend(_markdown_table(table, level=2))
    if images:
        parts.append("## Figures")
        parts.extend(_markdown_figures(images))
    if notes:
        parts.append("## Notes")
        parts.append("\n".join(f"- {note}" for note in notes))
    return "\n\n".join(parts) + "\n"


def _html_list(items: Sequence[str]) -> str:
    return "<ul>" + "".join(f"<li>{escape(item)}</li>" for item in items) + "</ul>"


def _html_cell(text: str, numeric: bool) -> str:
    return f'<td class="num">{escape(text)}</td>' if numeric else f"<td>{escape(text)}</td>"


def _html_row(row: Row, columns: Sequence[Column]) -> str:
    """One table row; rows on either Pareto frontier get the highlighted `frontier` class."""
    cells = "".join(
        _html_cell(text, column.numeric)
        for column, text in zip(columns, format_cells(row, columns), strict=True)
    )
    on_frontier = row.get("pareto_latency") or row.get("pareto_size")
    css_class = ' class="frontier"' if on_frontier else ""
    return f"<tr{css_class}>{cells}</tr>"


def _html_table(table: Table, level: int = 2) -> str:
    """An HTML table with the same columns as the markdown one, under its heading (an
    h`level`) and note, where it has them."""
    header = "".join(f"<th>{escape(column.header)}</th>" for column in table.columns)
    body = "\n".join(_html_row(row, table.columns) for row in table.rows)
    heading = f"<h{level}>{escape(table.heading)}</h{level}>\n" if table.heading else ""
    note = f"<p>{escape(table.note)}</p>\n" if table.note else ""
    return (
        f"{heading}{note}<table>\n<thead><tr>{header}</tr></thead>\n<tbody>\n{body}\n</tbody>\n"
        "</table>"
    )


def _png_data_uri(path: Path) -> str:
    """The PNG at `path` as a base64 data URI."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _html_figure(caption: str, path: Path) -> str:
    return (
        f'<figure><img src="{_png_data_uri(path)}" alt="{escape(caption)}">'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


def _html_section(section: Section) -> str:
    parts = [f"<h2>{escape(section.heading)}</h2>", f"<p>{escape(section.intro)}</p>"]
    parts.extend(_html_table(table, level=3) for table in section.tables)
    parts.extend(_html_figure(caption, Path(path)) for caption, path in section.images.items())
    return "\n".join(parts)


def render_html(
    title: str,
    summary: str,
    tables: Sequence[Table],
    images: Mapping[str, str | Path],
    notes: Sequence[str],
    excluded: Sequence[str] = (),
    sections: Sequence[Section] = (),
) -> str:
    """The report as one self-contained HTML page: inline CSS, images embedded as data URIs;
    laid out as `render_markdown`."""
    parts = [f"<h1>{escape(title)}</h1>", f"<p><strong>{escape(summary)}</strong></p>"]
    if excluded:
        parts.append(f"<p>{escape(EXCLUDED_INTRO)}</p>\n{_html_list(excluded)}")
    main, *others = tables
    parts += [
        *(f"<p>{escape(paragraph)}</p>" for paragraph in READING_GUIDE),
        _html_table(main),
        *(_html_section(section) for section in sections),
        *(_html_table(table) for table in others),
    ]
    if images:
        parts.append("<h2>Figures</h2>")
        parts.extend(_html_figure(caption, Path(path)) for caption, path in images.items())
    if notes:
        parts.append("<h2>Notes</h2>")
        parts.append(_html_list(notes))
    body = "\n".join(parts)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )

"""`trimflow explain`'s outputs: explanations.json and explanations.html, a self-contained page
(inline CSS) showing each text with its words coloured by the sign and size of their
attribution, with its label and score and a legend."""

from __future__ import annotations

from html import escape
from pathlib import Path

from trimflow.report.render import STYLE
from trimflow.utils.atomic import atomic_file, write_json

JSON_FILE = "explanations.json"
PAGE_FILE = "explanations.html"
SUPPORTING = (34, 160, 80)  # green: the word raises the label's logit
OPPOSING = (220, 50, 50)  # red: it lowers it
OPAQUE = 0.7  # the largest attribution's alpha: the word stays readable on it
PAGE_STYLE = (
    STYLE
    + """
.text { white-space: pre-wrap; line-height: 2; }
.word { border-radius: 3px; padding: 0 1px; }
.meta { color: #555; font-size: 0.9rem; }
.legend span { display: inline-block; margin-right: 1rem; padding: 0 0.4rem; }
"""
)
METHOD_NAMES = {"ig": "integrated gradients", "ablation": "feature ablation"}


def word_colour(attribution: float, scale: float) -> str:
    """A CSS colour: green for a word that supports the label, red for one against it, as opaque
    as its attribution is large next to `scale` (the text's largest absolute attribution)."""
    red, green, blue = SUPPORTING if attribution >= 0 else OPPOSING
    alpha = OPAQUE * abs(attribution) / scale if scale > 0 else 0.0
    return f"rgba({red}, {green}, {blue}, {alpha:.2f})"


def highlighted_text(explanation: dict) -> str:
    """The text as HTML, each attributed word in a span coloured by `word_colour` (its value
    on hover); the rest (spaces, words truncation cut) as it is."""
    text, words = explanation["text"], explanation["words"]
    scale = max(abs(word["attribution"]) for word in words)
    parts, end = [], 0
    for word in words:
        parts.append(escape(text[end : word["start"]]))
        parts.append(
            f'<span class="word" style="background: {word_colour(word["attribution"], scale)}" '
            f'title="{word["attribution"]:+.4g}">{escape(word["word"])}</span>'
        )
        end = word["end"]
    parts.append(escape(text[end:]))
    return "".join(parts)


def text_section(number: int, explanation: dict) -> str:
    """One text: its label and score, how it was explained, the highlighted text."""
    meta = (
        f"{METHOD_NAMES[explanation['method']]}, {len(explanation['words'])} words, "
        f"{explanation['cost_ms']:.0f} ms"
    )
    if explanation["truncated"]:
        meta += "; truncated: the model did not read the words left uncoloured"
    return (
        f"<section>\n<h2>{number}. {escape(explanation['label'])} "
        f'(score {explanation["score"]:.3f})</h2>\n<p class="meta">{escape(meta)}</p>\n'
        f'<p class="text">{highlighted_text(explanation)}</p>\n</section>'
    )


def explanation_page(explanations: list[dict], variant: str) -> str:
    """The page of `explain_texts`' explanations of `variant`'s answers."""
    title = f"Explanations: {variant}"
    legend = (
        '<p class="legend">'
        f'<span style="background: {word_colour(1.0, 1.0)}">supports the label</span>'
        f'<span style="background: {word_colour(-1.0, 1.0)}">speaks against it</span>'
        "Colour strength: the word's attribution to the predicted label's logit next to the "
        "text's largest (hover over a word for its value).</p>"
    )
    sections = (text_section(number, row) for number, row in enumerate(explanations, 1))
    body = "\n".join([f"<h1>{escape(title)}</h1>", legend, *sections])
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{escape(title)}</title>\n<style>{PAGE_STYLE}</style>\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )


def write_explanations(out_dir: Path, variant: str, explanations: list[dict]) -> list[Path]:
    """Write explanations.json (`{"variant", "explanations"}`) and explanations.html into
    `out_dir`, each atomically, the page rendered before either is written; their paths."""
    page = explanation_page(explanations, variant)
    write_json(out_dir / JSON_FILE, {"variant": variant, "explanations": explanations})
    with atomic_file(out_dir / PAGE_FILE) as handle:
        handle.write(page)
    return [out_dir / JSON_FILE, out_dir / PAGE_FILE]

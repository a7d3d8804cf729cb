"""The report's "Beyond accuracy" section: what compression changed besides the test score
(loyalty, calibration, robustness, slices, explanations; evaluation/beyond_accuracy.py), and
what the recommended variant forgot. A figure evaluate did not write leaves its column out, a
theme without any its table (NER: no explanations; its robustness score is entity F1)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from matplotlib.figure import Figure

from trimflow.report.pareto import quality_metric
from trimflow.report.plots import reliability_figure, robustness_figure, slice_figure
from trimflow.report.tables import Column, Row, Section, Table, _optional, _percent, _variant_cell

FORGOTTEN_LISTED = 10
# The slicings whose per-slice accuracy is plotted for the baseline and the recommended variant.
PLOTTED_SLICINGS = ("class", "entity", "length")
# A class's recall (NER: an entity type's F1) change below this is listed as a loss.
SCORE_LOSS = -0.01
INVARIANCE_PREFIX = "invariance_failure_"

LOYALTY_KEYS = ("label_loyalty", "probability_loyalty", "flip_rate", "flip_accuracy", "forgotten")
CALIBRATION_KEYS = (
    "ece",
    "ece_calibrated",
    "nll",
    "nll_calibrated",
    "brier",
    "brier_calibrated",
    "temperature",
)
SLICE_KEYS = ("worst_slice", "worst_slice_accuracy", "slice_gap", "slice_gap_change")
EXPLANATION_KEYS = ("attribution_topk_overlap", "attribution_rank_correlation", "explain_ms")

INTRO = (
    "Accuracy can hold while a compressed model changes which examples it gets right, how far "
    "its confidence can be trusted, how it copes with noisy text, which groups it fails and "
    "why it decides. Each table compares every variant with {baseline} on the test split; the "
    "figures show {baseline} and the recommended variant."
)
LOYALTY_NOTE = (
    "Whether each variant still answers as {baseline} does (Xu et al. 2021): label loyalty is "
    "the share of test predictions (NER: word tags) equal to {baseline}'s, probability loyalty "
    "the mean 1 − √JS divergence of the two models' class probabilities (1: identical); "
    "flipped is the share of predictions (NER: entities) that changed, accuracy on flips the "
    "variant's on them, forgotten the examples (NER: entities) {baseline} got right and the "
    "variant gets wrong."
)
CALIBRATION_NOTE = (
    "Whether confidence reads as a probability (lower is better): ECE is the gap between "
    "confidence and accuracy over equal-width confidence bins, NLL the mean negative "
    "log-likelihood of the truth, Brier the mean squared error of the probabilities; "
    "a → b is before → after temperature scaling (Guo et al. 2017: the logits divided by the "
    "temperature fitted on the validation split)."
)
ROBUSTNESS_NOTE = (
    "{score} on a seeded sample of test texts (evaluate.robustness.sample) as they are "
    "(Clean) and under each perturbation, with its change in points; INV is the share of the "
    "sample's predictions (NER: tags of the words left) a perturbation changes, CheckList's "
    "invariance test (Ribeiro et al. 2020), ideally 0."
)
SLICE_NOTE = (
    "Accuracy per slice of the test split (Fairlearn's MetricFrame: by class, length in word "
    "pieces, truncation and the dataset's extra columns; NER: tag accuracy of words by gold "
    "entity type, sentence length and truncation): the worst slice of at least "
    "evaluate.slices.min_size texts (NER: words), the widest gap between two slices of one "
    "slicing, and that gap minus {baseline}'s (positive: compression widened it)."
)
EXPLANATION_NOTE = (
    "Whether each variant explains its answers as {baseline} does (Krishna et al. 2022, the "
    "disagreement problem): word attributions by feature ablation on a seeded sample of test "
    "texts, compared with {baseline}'s as the share of top-k words in common and the Spearman "
    "rank correlation (1: the same); ms per text is the cost of one explanation."
)


class TaskWords(NamedTuple):
    """How the forgotten section names what a task forgets and the score it compares."""

    things: str
    unit: str
    units: str
    score: str


CLASSIFICATION_WORDS = TaskWords("examples", "Class", "classes", "recall")
NER_WORDS = TaskWords("entities", "Entity type", "entity types", "F1")

VARIANT_COLUMN = Column("Variant", _variant_cell, numeric=False)
KeyedColumn = tuple[str, Column]  # a column and the metrics key it needs


def _points(fraction: float | None, template: str = "{:.2f}") -> str:
    """A share as percentage points ('–' for None)."""
    return _optional(None if fraction is None else 100 * fraction, template)


def _before_after(key: str) -> Callable[[Row], str]:
    """The score `key`, and `key`_calibrated after an arrow where temperature scaling ran."""

    def cell(row: Row) -> str:
        calibrated = row.get(f"{key}_calibrated")
        before = f"{row[key]:.3f}"
        return before if calibrated is None else f"{before} → {calibrated:.3f}"

    return cell


LOYALTY_COLUMNS: tuple[KeyedColumn, ...] = (
    ("label_loyalty", Column("Label loyalty", lambda row: _percent(row["label_loyalty"]))),
    (
        "probability_loyalty",
        Column("Probability loyalty", lambda row: f"{row['probability_loyalty']:.3f}"),
    ),
    ("flip_rate", Column("Flipped", lambda row: _percent(row["flip_rate"]))),
    (
        "flip_accuracy",
        Column("Accuracy on flips", lambda row: _optional(row["flip_accuracy"], "{:.2%}")),
    ),
    ("forgotten", Column("Forgotten", lambda row: str(row["forgotten"]))),
)
CALIBRATION_COLUMNS: tuple[KeyedColumn, ...] = (
    ("ece", Column("ECE", _before_after("ece"))),
    ("nll", Column("NLL", _before_after("nll"))),
    ("brier", Column("Brier", _before_after("brier"))),
    ("temperature", Column("Temperature", lambda row: f"{row['temperature']:.2f}")),
)
SLICE_COLUMNS: tuple[KeyedColumn, ...] = (
    ("worst_slice", Column("Worst slice", lambda row: row["worst_slice"] or "–", numeric=False)),
    (
        "worst_slice_accuracy",
        Column(
            "Worst-slice accuracy", lambda row: _optional(row["worst_slice_accuracy"], "{:.2%}")
        ),
    ),
    ("slice_gap", Column("Gap (pts)", lambda row: _points(row["slice_gap"]))),
    (
        "slice_gap_change",
        Column("Gap change (pts)", lambda row: _points(row["slice_gap_change"], "{:+.2f}")),
    ),
)
EXPLANATION_COLUMNS: tuple[KeyedColumn, ...] = (
    (
        "attribution_topk_overlap",
        Column("Top-k overlap", lambda row: f"{row['attribution_topk_overlap']:.3f}"),
    ),
    (
        "attribution_rank_correlation",
        Column("Rank correlation", lambda row: f"{row['attribution_rank_correlation']:+.3f}"),
    ),
    ("explain_ms", Column("ms per text", lambda row: f"{row['explain_ms']:.1f}")),
)


def beyond_rows(metrics: Mapping[str, Any]) -> list[Row]:
    """One row per variant: its metrics and whether it is the recommended one."""
    return [
        {"variant": name, "recommended": name == metrics["recommended"], **values}
        for name, values in metrics["variants"].items()
    ]


def _everywhere(rows: Sequence[Row], key: str) -> bool:
    return all(key in row for row in rows)


def perturbation_kinds(rows: Sequence[Row]) -> list[str]:
    """The perturbations evaluate measured (its `invariance_failure_<kind>` keys)."""
    return [
        key.removeprefix(INVARIANCE_PREFIX)
        for key in rows[0]
        if key.startswith(INVARIANCE_PREFIX) and _everywhere(rows, key)
    ]


def robustness_score(rows: Sequence[Row]) -> str:
    """The score robustness is measured by: accuracy, or NER's entity F1 (`sample_f1`)."""
    return "f1" if _everywhere(rows, "sample_f1") else "accuracy"


def beyond_keys(rows: Sequence[Row]) -> list[str]:
    """The beyond-accuracy figures every row has, theme by theme."""
    kinds, score = perturbation_kinds(rows), robustness_score(rows)
    robustness = [
        *([f"sample_{score}"] if kinds else []),
        *(key for kind in kinds for key in (f"{score}_{kind}", INVARIANCE_PREFIX + kind)),
    ]
    candidates = (*LOYALTY_KEYS, *CALIBRATION_KEYS, *robustness, *SLICE_KEYS, *EXPLANATION_KEYS)
    return [key for key in candidates if _everywhere(rows, key)]


def _theme_table(
    heading: str, note: str, rows: Sequence[Row], columns: Iterable[KeyedColumn]
) -> Table | None:
    """The theme's columns whose key every row has, after the variant's; None without any."""
    kept = tuple(column for key, column in columns if _everywhere(rows, key))
    return Table(heading, (VARIANT_COLUMN, *kept), rows, note) if kept else None


def _perturbed_score(kind: str, score: str) -> Callable[[Row], str]:
    def cell(row: Row) -> str:
        value = row[f"{score}_{kind}"]
        return f"{_percent(value)} ({_points(value - row[f'sample_{score}'], '{:+.2f}')})"

    return cell


def _invariance_failure(kind: str) -> Callable[[Row], str]:
    return lambda row: _percent(row[INVARIANCE_PREFIX + kind])


def robustness_table(rows: Sequence[Row]) -> Table | None:
    """Clean accuracy (NER: entity F1), then per perturbation the score (change in points) and
    INV failure; None when no perturbation was measured."""
    kinds, score = perturbation_kinds(rows), robustness_score(rows)
    if not kinds:
        return None
    columns = (
        VARIANT_COLUMN,
        Column("Clean", lambda row: _percent(row[f"sample_{score}"])),
        *(Column(f"{kind} (Δ pts)", _perturbed_score(kind, score)) for kind in kinds),
        *(Column(f"{kind} INV", _invariance_failure(kind)) for kind in kinds),
    )
    name = "Entity F1" if score == "f1" else "Accuracy"
    return Table("Robustness", columns, rows, ROBUSTNESS_NOTE.format(score=name))


def beyond_tables(metrics: Mapping[str, Any], baseline: str) -> list[Table]:
    """The theme tables whose figures evaluate wrote: loyalty to `baseline`, calibration,
    robustness, slices and explanations."""
    rows = beyond_rows(metrics)
    tables = (
        _theme_table(
            f"Loyalty to {baseline}", LOYALTY_NOTE.format(baseline=baseline), rows, LOYALTY_COLUMNS
        ),
        _theme_table("Calibration", CALIBRATION_NOTE, rows, CALIBRATION_COLUMNS),
        robustness_table(rows),
        _theme_table("Slices", SLICE_NOTE.format(baseline=baseline), rows, SLICE_COLUMNS),
        _theme_table(
            "Explanations", EXPLANATION_NOTE.format(baseline=baseline), rows, EXPLANATION_COLUMNS
        ),
    )
    return [table for table in tables if table is not None]


def beyond_section(
    metrics: Mapping[str, Any], baseline: str, images: Mapping[str, str | Path]
) -> Section | None:
    """The "Beyond accuracy" section: the theme tables and `images`; None without any table."""
    tables = beyond_tables(metrics, baseline)
    if not tables:
        return None
    return Section("Beyond accuracy", INTRO.format(baseline=baseline), tables, images)


def beyond_figures(
    metrics: Mapping[str, Any], details: Mapping[str, Mapping[str, Any]], baseline: str
) -> dict[str, tuple[str, Figure]]:
    """Caption -> (PNG file name, figure) of the figures evaluate measured: the reliability
    diagram (uncalibrated and temperature-scaled) and the per-slice accuracy of `baseline` and
    the recommended variant, and every variant's accuracy (NER: entity F1) under each
    perturbation."""
    compared = {name: details[name] for name in (baseline, metrics["recommended"])}
    reference = compared[baseline]

    def of_both(key: str) -> dict[str, Any]:
        return {name: detail[key] for name, detail in compared.items()}

    figures: dict[str, tuple[str, Figure]] = {}
    if "reliability" in reference:
        panels = {"uncalibrated": of_both("reliability")}
        if "reliability_calibrated" in reference:
            panels["temperature-scaled"] = of_both("reliability_calibrated")
        figures["Reliability diagram"] = ("reliability.png", reliability_figure(panels))
    rows = beyond_rows(metrics)
    kinds, score = perturbation_kinds(rows), robustness_score(rows)
    if kinds:
        scores = {
            row["variant"]: {
                "clean": row[f"sample_{score}"],
                **{k: row[f"{score}_{k}"] for k in kinds},
            }
            for row in rows
        }
        figures[f"{'Entity F1' if score == 'f1' else 'Accuracy'} under perturbations"] = (
            "robustness.png",
            robustness_figure(scores, score),
        )
    if "slices" in reference:
        slices = slice_figure(of_both("slices"), PLOTTED_SLICINGS)
        if slices is not None:
            figures["Accuracy per slice"] = ("slices.png", slices)
    return figures


def _field(key: str) -> Callable[[Row], str]:
    return lambda row: str(row[key])


def _example_columns(baseline: str, variant: str, ner: bool) -> tuple[Column, ...]:
    """Classification: the text's excerpt, truth and both predictions; NER: the entity's
    words, its type and the variant's tags there."""
    if ner:
        return (
            Column("Sentence", _field("row")),
            Column("Entity", _field("text"), numeric=False),
            Column("Type", _field("truth"), numeric=False),
            Column(f"{variant}'s tags", _field("variant"), numeric=False),
        )
    return (
        Column("Row", _field("row")),
        Column("Text", _field("text"), numeric=False),
        Column("Truth", _field("truth"), numeric=False),
        Column(baseline, _field("baseline"), numeric=False),
        Column(variant, _field("variant"), numeric=False),
    )


def _losses_table(score_change: Mapping[str, float], words: TaskWords) -> Table | None:
    """The classes (NER: entity types) whose score fell below SCORE_LOSS, worst first."""
    losses = sorted((change, name) for name, change in score_change.items() if change < SCORE_LOSS)
    if not losses:
        return None
    columns = (
        Column(words.unit, _field("name"), numeric=False),
        Column(
            f"{words.score.capitalize()} change (pts)",
            lambda row: _points(row["change"], "{:+.2f}"),
        ),
    )
    rows = [{"name": name, "change": change} for change, name in losses]
    heading = f"{words.units.capitalize()} whose {words.score} fell by more than 1 point"
    return Table(heading, columns, rows)


def forgotten_section(
    metrics: Mapping[str, Any], details: Mapping[str, Mapping[str, Any]], baseline: str
) -> Section | None:
    """What the recommended variant forgot against `baseline`: up to FORGOTTEN_LISTED forgotten
    examples (NER: entities) and the classes (types) it lost more than 1 point on; None when
    the recommended variant is the baseline or evaluate wrote no flip set."""
    variant = metrics["recommended"]
    detail = details[variant]
    if variant == baseline or "flips" not in detail:
        return None
    ner = quality_metric(metrics) == "f1"
    words = NER_WORDS if ner else CLASSIFICATION_WORDS
    flips = detail["flips"]
    examples = flips["forgotten_examples"][:FORGOTTEN_LISTED]
    intro = (
        f"{variant} misses {flips['forgotten']} test {words.things} {baseline} got right and "
        f"gets {flips['learned']} right that {baseline} missed (cf. Hooker et al. 2019, What do "
        "compressed deep neural networks forget?)."
    )
    tables = []
    if examples:
        heading = f"Forgotten {words.things} (the first {len(examples)} of {flips['forgotten']})"
        tables.append(Table(heading, _example_columns(baseline, variant, ner), examples))
    losses = _losses_table(detail["score_change"], words)
    if losses is None:
        intro += f" No {words.unit.lower()} lost more than 1 point of {words.score}."
    else:
        tables.append(losses)
    return Section("What the recommended variant forgot", intro, tables)

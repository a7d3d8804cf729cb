"""Quality per slice of the test split, with Fairlearn's `MetricFrame`.

A slicing is one column of a features table, one row per test text (`slice_features`): `class`
(the gold class name), `length` (a bucket of the text's word-piece count), `truncated` (`yes`
when the text had more pieces than the model reads) and each extra column of the dataset (a
`source` or `region` column a CSV carries), as strings. `slice_report` scores every slice of
every slicing and names the worst slice and the largest gap between two slices of one slicing;
slices smaller than `min_size` are listed but left out of both, so that a slice of two texts
does not decide them.

NER slices words rather than texts (`word_slice_features`): by gold entity type, sentence
length and truncation, scored by tag accuracy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from fairlearn.metrics import MetricFrame, count
from sklearn.metrics import accuracy_score, f1_score

SliceMetric = Literal["accuracy", "macro_f1"]
DEFAULT_LENGTH_EDGES: tuple[int, ...] = (64, 128, 256)
# The value an extra column's missing cell takes (Fairlearn refuses missing values).
MISSING_VALUE = "missing"
BUILT_IN_SLICINGS: tuple[str, ...] = ("class", "length", "truncated")


def _macro_f1(truth: Sequence[int], predictions: Sequence[int]) -> float:
    """Macro F1 over the labels present in the slice's truth or predictions."""
    return float(f1_score(truth, predictions, average="macro", zero_division=0))


SLICE_METRICS: dict[str, Callable[[Sequence[int], Sequence[int]], float]] = {
    "accuracy": accuracy_score,
    "macro_f1": _macro_f1,
}


def length_buckets(piece_counts: Sequence[int], edges: Sequence[int]) -> list[str]:
    """The bucket of each count: with edges (64, 128) "<64", "64-127" or ">=128"."""
    if not edges or any(low >= high for low, high in zip(edges, edges[1:], strict=False)):
        raise ValueError(f"length edges must be a non-empty increasing sequence, got {edges}")
    names = [f"<{edges[0]}"]
    names += [f"{low}-{high - 1}" for low, high in zip(edges, edges[1:], strict=False)]
    names.append(f">={edges[-1]}")
    positions = np.searchsorted(np.asarray(edges), np.asarray(piece_counts), side="right")
    return [names[position] for position in positions]


def slice_features(
    truth: Sequence[int],
    label_names: Sequence[str],
    piece_counts: Sequence[int],
    truncated: Sequence[bool],
    extra: pd.DataFrame | None = None,
    length_edges: Sequence[int] = DEFAULT_LENGTH_EDGES,
) -> pd.DataFrame:
    """One row per text, one column per slicing: class, length, truncated, then `extra`'s.

    `piece_counts` are the word pieces of each whole text (before truncation); `extra`'s rows
    follow the texts' order, its values become strings and its missing cells `MISSING_VALUE`.
    """
    clashes = sorted(set(BUILT_IN_SLICINGS) & set(extra.columns if extra is not None else []))
    if clashes:
        raise ValueError(f"extra slicing columns {clashes} clash with the built-in slicings")
    lengths = {len(truth), len(piece_counts), len(truncated)}
    if extra is not None:
        lengths.add(len(extra))
    if len(lengths) > 1:
        raise ValueError(f"slice inputs differ in length: {sorted(lengths)}")
    features = pd.DataFrame(
        {
            "class": [label_names[label] for label in truth],
            "length": length_buckets(piece_counts, length_edges),
            "truncated": ["yes" if cut else "no" for cut in truncated],
        }
    )
    if extra is not None:
        for column in extra.columns:
            values = extra[column].reset_index(drop=True)
            features[column] = values.astype(str).where(values.notna(), MISSING_VALUE)
    return features


def word_slice_features(
    gold: Sequence[Sequence[str]],
    piece_counts: Sequence[int],
    truncated: Sequence[bool],
    length_edges: Sequence[int] = DEFAULT_LENGTH_EDGES,
) -> pd.DataFrame:
    """NER: one row per word of every sentence, with its gold entity type (`O` outside any
    entity), its sentence's length bucket (word pieces before truncation) and whether truncation
    cut the sentence."""
    lengths = length_buckets(piece_counts, length_edges)
    return pd.DataFrame(
        [
            {
                "entity": tag.split("-", 1)[-1],
                "length": lengths[row],
                "truncated": "yes" if truncated[row] else "no",
            }
            for row, tags in enumerate(gold)
            for tag in tags
        ],
        columns=["entity", "length", "truncated"],
    )


def _slicing_scores(
    truth: np.ndarray, predictions: np.ndarray, slicing: pd.Series, metric: SliceMetric
) -> dict[str, dict[str, Any]]:
    """Each slice of one slicing with its metric and its count."""
    frame = MetricFrame(
        metrics={metric: SLICE_METRICS[metric], "count": count},
        y_true=truth,
        y_pred=predictions,
        sensitive_features=slicing,
    )
    return {
        str(value): {metric: float(row[metric]), "count": int(row["count"])}
        for value, row in frame.by_group.iterrows()
    }


def slice_report(
    truth: Sequence[int],
    predictions: Sequence[int],
    features: pd.DataFrame,
    metric: SliceMetric = "accuracy",
    min_size: int = 1,
) -> dict[str, Any]:
    """Every slice's `metric` and count, the worst slice and the largest gap, as plain values.

    The worst slice is the lowest-scoring slice of at least `min_size` texts over all slicings
    (`worst_slice` "column=value" and `worst_slice_<metric>`); a slicing's gap is its best
    minus its worst such slice, and `slice_gap` the largest over the slicings, with
    `slice_gap_column`. Both are None when no slice has `min_size` texts.
    """
    if metric not in SLICE_METRICS:
        raise ValueError(f"unknown slice metric {metric!r}; known: {', '.join(SLICE_METRICS)}")
    truth_array, prediction_array = np.asarray(truth), np.asarray(predictions)
    slicings: dict[str, dict[str, Any]] = {}
    worst: tuple[float, str] | None = None
    widest: tuple[float, str] | None = None
    for column in features.columns:
        slices = _slicing_scores(
            truth_array, prediction_array, features[column].reset_index(drop=True), metric
        )
        counted = {value: s[metric] for value, s in slices.items() if s["count"] >= min_size}
        gap = max(counted.values()) - min(counted.values()) if counted else None
        slicings[column] = {"slices": slices, "gap": gap}
        for value, score in counted.items():
            if worst is None or score < worst[0]:
                worst = (score, f"{column}={value}")
        if gap is not None and (widest is None or gap > widest[0]):
            widest = (gap, column)
    return {
        "metric": metric,
        "min_size": min_size,
        "slicings": slicings,
        "worst_slice": worst[1] if worst else None,
        f"worst_slice_{metric}": worst[0] if worst else None,
        "slice_gap": widest[0] if widest else None,
        "slice_gap_column": widest[1] if widest else None,
    }


def gap_change(report: dict[str, Any], baseline_report: dict[str, Any]) -> float | None:
    """The variant's slice gap minus the baseline's (None when either has no gap)."""
    if report["slice_gap"] is None or baseline_report["slice_gap"] is None:
        return None
    return report["slice_gap"] - baseline_report["slice_gap"]

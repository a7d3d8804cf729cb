"""Checks on raw splits: bad rows fail loudly, leakage between splits is reported."""

from __future__ import annotations

import pandas as pd

from trimflow.data.errors import DataError

MAX_LISTED = 5


def check_rows(frame: pd.DataFrame) -> None:
    """Fail on empty or non-text texts and empty labels, naming source file and row numbers."""
    is_text = frame["text"].map(lambda value: isinstance(value, str))
    blank_text = is_text & (frame["text"].astype(str).str.strip() == "")
    blank_label = frame["label"].str.strip() == ""
    for mask, problem in (
        (~is_text, "non-text value in the text column"),
        (blank_text, "empty text"),
        (blank_label, "empty label"),
    ):
        if mask.any():
            bad = frame[mask]
            rows = ", ".join(str(r) for r in bad["row"].head(MAX_LISTED))
            more = f" and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
            raise DataError(f"{bad['source'].iloc[0]}: {problem} at row {rows}{more}")


def check_labels_known(train: pd.DataFrame, other: pd.DataFrame, split: str) -> None:
    """Fail if `other` has labels never seen in train (the model could not predict them)."""
    unknown = sorted(set(other["label"]) - set(train["label"]))
    if unknown:
        first = other[other["label"].isin(unknown)].iloc[0]
        raise DataError(
            f"{first['source']}: {split} labels missing from train: {unknown} "
            f"(first at row {first['row']})"
        )


def shared_texts(train: pd.DataFrame, other: pd.DataFrame) -> list[str]:
    """Texts present in both splits (exact match after whitespace normalisation)."""

    def normalise(series: pd.Series) -> set[str]:
        return set(series.str.split().str.join(" "))

    return sorted(normalise(train["text"]) & normalise(other["text"]))

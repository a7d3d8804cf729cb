"""Seeded, stratified subsampling and validation splits."""

from __future__ import annotations

import pandas as pd
from sklearn.model_selection import train_test_split


def _split(frame: pd.DataFrame, held_out: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split off `held_out` rows, stratified by label when every label fits in both parts."""
    counts = frame["label"].value_counts()
    smaller_part = min(held_out, len(frame) - held_out)
    stratify = frame["label"] if counts.min() >= 2 and smaller_part >= len(counts) else None
    kept, removed = train_test_split(
        frame, test_size=held_out, random_state=seed, stratify=stratify
    )
    return kept.sort_index(), removed.sort_index()


def subsample(frame: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    """Keep at most `limit` rows, preserving label proportions where possible."""
    if limit is None or limit >= len(frame):
        return frame
    return _split(frame, len(frame) - limit, seed)[0]


def split_validation(
    frame: pd.DataFrame, fraction: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split off a stratified validation set of round(`fraction` * rows) rows."""
    return _split(frame, max(1, round(fraction * len(frame))), seed)

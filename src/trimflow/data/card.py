"""The data card: counts per label (or entity type) and split, lengths, leakage report."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def length_stats(texts: pd.Series) -> dict[str, float]:
    """Word-count statistics of a text column."""
    words = texts.str.split().str.len().to_numpy()
    return {
        "mean": round(float(words.mean()), 2),
        "p50": float(np.percentile(words, 50)),
        "p95": float(np.percentile(words, 95)),
        "max": int(words.max()),
    }


def label_summary(splits: dict[str, pd.DataFrame], labels: list[str]) -> dict[str, Any]:
    """Per split of a classification dataset: rows, rows per label, text lengths."""
    return {
        "splits": {
            split: {
                "rows": len(frame),
                "per_label": {label: int((frame["label"] == label).sum()) for label in labels},
                "words": length_stats(frame["text"]),
            }
            for split, frame in splits.items()
        }
    }


def build_card(
    name: str,
    summary: dict[str, Any],
    labels: list[str],
    shared_with_test: list[str],
    digest: str,
) -> dict[str, Any]:
    """Describe the prepared splits (`summary`: the task's per-split counts) as a JSON dict."""
    return {
        "dataset": name,
        "digest": digest,
        "labels": labels,
        **summary,
        "train_test_shared_texts": {
            "count": len(shared_with_test),
            "examples": [text[:120] for text in shared_with_test[:5]],
        },
    }

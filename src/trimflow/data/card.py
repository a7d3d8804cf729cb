"""The data card: counts per label and split, length statistics, leakage report."""

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


def build_card(
    name: str,
    splits: dict[str, pd.DataFrame],
    labels: list[str],
    shared_with_test: list[str],
    digest: str,
) -> dict[str, Any]:
    """Describe the prepared splits in a JSON-serialisable dict."""
    return {
        "dataset": name,
        "digest": digest,
        "labels": labels,
        "splits": {
            split: {
                "rows": len(frame),
                "per_label": {label: int((frame["label"] == label).sum()) for label in labels},
                "words": length_stats(frame["text"]),
            }
            for split, frame in splits.items()
        },
        "train_test_shared_texts": {
            "count": len(shared_with_test),
            "examples": [text[:120] for text in shared_with_test[:5]],
        },
    }

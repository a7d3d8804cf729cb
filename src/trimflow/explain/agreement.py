"""How far two variants' word attributions of the same texts agree, after Krishna et al.
(2022), "The disagreement problem in explainable machine learning": the overlap of their top-k
words (by absolute attribution) and the Spearman correlation of their attributions."""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr


def top_words(attributions: np.ndarray, k: int) -> set[int]:
    """The indices of the `k` words with the largest absolute attribution (ties: first word)."""
    return set(np.argsort(-np.abs(attributions), kind="stable")[:k].tolist())


def attribution_agreement(
    reference: list[np.ndarray], other: list[np.ndarray], k: int = 5
) -> dict[str, float]:
    """Agreement of `other`'s word attributions with `reference`'s, text by text (the same words
    in both): `attribution_topk_overlap`, the mean share of the top `k` words they share (k
    capped at the text's word count), and `attribution_rank_correlation`, the mean Spearman
    correlation over the texts where it is defined (at least two words, neither side constant;
    NaN if no text is)."""
    if k < 1:
        raise ValueError(f"k={k}: at least one top word is needed")
    if not reference or len(reference) != len(other):
        raise ValueError(f"{len(reference)} reference and {len(other)} other texts: need as many")
    overlaps, correlations = [], []
    for index, (first, second) in enumerate(zip(reference, other, strict=True)):
        if first.shape != second.shape or first.ndim != 1 or not len(first):
            raise ValueError(
                f"text {index}: attributions of shapes {first.shape} and {second.shape}; "
                "both need one per word of the text, the same words"
            )
        top = min(k, len(first))
        overlaps.append(len(top_words(first, top) & top_words(second, top)) / top)
        if np.ptp(first) > 0 and np.ptp(second) > 0:
            correlations.append(spearmanr(first, second).statistic)
    return {
        "attribution_topk_overlap": float(np.mean(overlaps)),
        "attribution_rank_correlation": float(np.mean(correlations)) if correlations else np.nan,
    }

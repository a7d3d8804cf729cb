"""Drift of one feature between the reference profile and the logged traffic.

Two measures per feature, and a verdict that needs both:

- PSI, the population stability index: sum over bins of (logged share - reference share) *
  ln(logged share / reference share). Numeric features are cut at quantiles of the reference
  (each bin holds about 1/bins of it; ties merge bins), categorical ones have a bin per
  category, those only the log has included; an empty bin counts as `EMPTY_BIN_SHARE`. By
  common practice PSI < 0.1 is stable, 0.1-0.2 a slight shift, > 0.2 a significant one. It
  sizes the shift whatever the sample sizes, but on a few texts sampling noise alone raises it.
- A two-sample test: Kolmogorov-Smirnov (scipy.stats.ks_2samp) for numeric features,
  chi-square on the 2 x categories table of counts (scipy.stats.chi2_contingency) for
  categorical ones. Its p-value says how likely so large a difference is between two samples
  of one distribution; on thousands of texts it calls shifts significant that are too small
  to matter.

A feature drifts when its PSI exceeds `monitor.psi_threshold` AND its p-value is below
`monitor.p_value`: a shift large enough to matter that is not sampling noise. Either alone
would page someone for nothing: the test alone on every busy day, the PSI alone on quiet ones.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
from scipy.stats import chi2_contingency, ks_2samp

from trimflow.config.schema import MonitorConfig
from trimflow.monitoring.features import Feature

# The share an empty bin counts as in the PSI (its logarithm must stay finite).
EMPTY_BIN_SHARE = 1e-4


def psi(reference_shares: np.ndarray, logged_shares: np.ndarray) -> float:
    """The population stability index of two distributions over the same bins."""
    reference = np.clip(reference_shares, EMPTY_BIN_SHARE, None)
    logged = np.clip(logged_shares, EMPTY_BIN_SHARE, None)
    return float(np.sum((logged - reference) * np.log(logged / reference)))


def quantile_edges(reference: np.ndarray, bins: int) -> np.ndarray:
    """The inner bin edges cutting `reference` into `bins` equal parts (fewer when tied)."""
    return np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))


def bin_shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The share of `values` in each bin (-inf, e1], (e1, e2], ..., (en, inf)."""
    counts = np.bincount(np.searchsorted(edges, values, side="left"), minlength=len(edges) + 1)
    return counts / len(values)


def numeric_drift(reference: Sequence[float], logged: Sequence[float], bins: int) -> dict:
    """PSI over the reference's quantile bins and the Kolmogorov-Smirnov test."""
    reference, logged = np.asarray(reference, float), np.asarray(logged, float)
    edges = quantile_edges(reference, bins)
    test = ks_2samp(reference, logged)
    return {
        "test": "kolmogorov-smirnov",
        "psi": psi(bin_shares(reference, edges), bin_shares(logged, edges)),
        "statistic": float(test.statistic),
        "p_value": float(test.pvalue),
        "reference_median": float(np.median(reference)),
        "logged_median": float(np.median(logged)),
    }


def categorical_drift(reference: Sequence[str], logged: Sequence[str]) -> dict:
    """PSI over the categories of both samples and the chi-square test of their counts."""
    reference_counts, logged_counts = Counter(reference), Counter(logged)
    categories = sorted(reference_counts.keys() | logged_counts.keys())
    table = np.array(
        [
            [counts[category] for category in categories]
            for counts in (reference_counts, logged_counts)
        ]
    )
    shares = table / table.sum(axis=1, keepdims=True)
    if len(categories) > 1:
        statistic, p_value, _, _ = chi2_contingency(table)
    else:  # one category in both: no difference to test
        statistic, p_value = 0.0, 1.0
    return {
        "test": "chi-square",
        "psi": psi(shares[0], shares[1]),
        "statistic": float(statistic),
        "p_value": float(p_value),
        "reference_shares": dict(zip(categories, shares[0].round(4).tolist(), strict=True)),
        "logged_shares": dict(zip(categories, shares[1].round(4).tolist(), strict=True)),
    }


def feature_drift(
    feature: Feature, reference: Sequence, logged: Sequence, cfg: MonitorConfig
) -> dict:
    """One feature's PSI, test and verdict (see the module docstring), with the sample sizes.

    A feature without values on one side (NER traffic without entities) gets no verdict: the
    entities-per-text feature shows that shift."""
    sizes = {"reference_n": len(reference), "logged_n": len(logged)}
    described = {"kind": feature.kind, "description": feature.description}
    if not reference or not logged:
        side = "the reference" if not reference else "the log"
        return {
            **described,
            **sizes,
            "psi": None,
            "statistic": None,
            "p_value": None,
            "drifted": False,
            "note": f"no values in {side}",
        }
    if feature.kind == "numeric":
        measured = numeric_drift(reference, logged, cfg.bins)
    else:
        measured = categorical_drift(reference, logged)
    drifted = measured["psi"] > cfg.psi_threshold and measured["p_value"] < cfg.p_value
    return {**described, **sizes, **measured, "drifted": drifted}

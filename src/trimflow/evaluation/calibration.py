"""Whether a variant's scores can be read as probabilities: ECE, NLL, Brier score, the
reliability diagram's bins, and temperature scaling (Guo et al. 2017).

Binning: `bins` equal-width bins of the top-label confidence over [0, 1] (a confidence of
exactly 1 falls in the last bin); ECE is the support-weighted mean of |accuracy - confidence|
over the non-empty bins. The Brier score is the multi-class one: the mean over examples of the
squared distance between the probability vector and the one-hot truth (0 best, 2 worst).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

# Temperatures outside this range mean the fit went astray (or the logits are constant).
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of `logits / temperature`, in float64."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=-1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=-1, keepdims=True)


def reliability_bins(
    probabilities: np.ndarray, truth: Sequence[int], bins: int
) -> list[dict[str, float | int]]:
    """Per equal-width confidence bin: its bounds, number of examples, mean confidence and
    accuracy (None for an empty bin's means)."""
    confidence = probabilities.max(axis=-1)
    correct = probabilities.argmax(axis=-1) == np.asarray(truth)
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    rows = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        rows.append(
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "count": count,
                "confidence": float(confidence[members].mean()) if count else None,
                "accuracy": float(correct[members].mean()) if count else None,
            }
        )
    return rows


def expected_calibration_error(probabilities: np.ndarray, truth: Sequence[int], bins: int) -> float:
    """ECE over `bins` equal-width confidence bins (see the module docstring)."""
    total = len(truth)
    return float(
        sum(
            row["count"] / total * abs(row["accuracy"] - row["confidence"])
            for row in reliability_bins(probabilities, truth, bins)
            if row["count"]
        )
    )


def negative_log_likelihood(probabilities: np.ndarray, truth: Sequence[int]) -> float:
    """Mean -log p(true label), probabilities clipped at 1e-12."""
    picked = probabilities[np.arange(len(truth)), np.asarray(truth)]
    return float(-np.log(np.clip(picked, 1e-12, None)).mean())


def brier_score(probabilities: np.ndarray, truth: Sequence[int]) -> float:
    """Mean squared distance between each probability vector and its one-hot truth."""
    one_hot = np.eye(probabilities.shape[-1])[np.asarray(truth)]
    return float(((probabilities - one_hot) ** 2).sum(axis=-1).mean())


def calibration_scores(
    logits: np.ndarray, truth: Sequence[int], bins: int, temperature: float = 1.0
) -> dict[str, float]:
    """`{"ece", "nll", "brier"}` of `logits / temperature`."""
    probabilities = softmax(logits, temperature)
    return {
        "ece": expected_calibration_error(probabilities, truth, bins),
        "nll": negative_log_likelihood(probabilities, truth),
        "brier": brier_score(probabilities, truth),
    }


def fit_temperature(logits: np.ndarray, truth: Sequence[int]) -> float:
    """The temperature T minimising the NLL of `logits / T` (L-BFGS on log T, from T = 1),
    kept within [MIN_TEMPERATURE, MAX_TEMPERATURE]."""
    logits_t = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    truth_t = torch.as_tensor(np.asarray(truth), dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits_t / log_t.exp(), truth_t)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(np.clip(log_t.exp().item(), MIN_TEMPERATURE, MAX_TEMPERATURE))


def calibrate(
    test_logits: np.ndarray,
    test_truth: Sequence[int],
    validation_logits: np.ndarray,
    validation_truth: Sequence[int],
    bins: int,
) -> dict[str, Any]:
    """A variant's calibration on the test split before and after temperature scaling fitted
    on the validation split: `temperature`, `ece`, `nll`, `brier`, the same `*_calibrated`,
    and the reliability bins of both (`reliability`, `reliability_calibrated`)."""
    temperature = fit_temperature(validation_logits, validation_truth)
    before = calibration_scores(test_logits, test_truth, bins)
    after = calibration_scores(test_logits, test_truth, bins, temperature)
    return {
        "temperature": temperature,
        **before,
        **{f"{key}_calibrated": value for key, value in after.items()},
        "reliability": reliability_bins(softmax(test_logits), test_truth, bins),
        "reliability_calibrated": reliability_bins(
            softmax(test_logits, temperature), test_truth, bins
        ),
    }


def served_temperature(metrics: dict[str, Any], variant: str) -> float:
    """The temperature evaluate fitted for `variant` (metrics.json's payload), 1.0 when it fitted
    none (`evaluate.calibration.temperature_scaling` off, NER, or an older metrics.json)."""
    return float(metrics["variants"].get(variant, {}).get("temperature") or 1.0)

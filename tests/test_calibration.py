"""Calibration (ECE, NLL, Brier, temperature scaling) and loyalty against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trimflow.evaluation.calibration import (
    brier_score,
    calibrate,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
    served_temperature,
    softmax,
)
from trimflow.evaluation.loyalty import (
    entity_flips,
    excerpt,
    label_flips,
    probability_loyalty,
    score_change,
)

# Confidences 0.9, 0.85 (bin 4 of 5), 0.65, 0.7 (bin 3); the second prediction is wrong.
PROBABILITIES = np.array([[0.9, 0.1], [0.85, 0.15], [0.65, 0.35], [0.3, 0.7]])
TRUTH = [0, 1, 0, 1]


def test_ece_nll_and_brier_equal_hand_computed_values():
    # bin 4: confidence 0.875, accuracy 0.5; bin 3: confidence 0.675, accuracy 1.0.
    assert expected_calibration_error(PROBABILITIES, TRUTH, bins=5) == pytest.approx(
        0.5 * 0.375 + 0.5 * 0.325
    )
    assert negative_log_likelihood(PROBABILITIES, TRUTH) == pytest.approx(
        -(math.log(0.9) + math.log(0.15) + math.log(0.65) + math.log(0.7)) / 4
    )
    assert brier_score(PROBABILITIES, TRUTH) == pytest.approx(
        2 * (0.1**2 + 0.85**2 + 0.35**2 + 0.3**2) / 4
    )


def test_reliability_bins_count_every_example_once_and_put_confidence_one_in_the_last_bin():
    bins = reliability_bins(np.array([[1.0, 0.0], [0.55, 0.45]]), [0, 1], bins=10)
    assert [row["count"] for row in bins] == [0] * 5 + [1] + [0] * 3 + [1]
    assert bins[9]["accuracy"] == 1.0 and bins[5]["accuracy"] == 0.0
    assert bins[0]["confidence"] is None
    assert sum(row["count"] for row in reliability_bins(PROBABILITIES, TRUTH, 15)) == 4


def overconfident(seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z), and logits 4 z: a model four times too sure."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(0, 1.5, size=(size, 4))
    truth = np.array([rng.choice(4, p=p) for p in softmax(true_logits)])
    return 4 * true_logits, truth


def test_temperature_scaling_finds_the_overconfidence_and_lowers_nll_and_ece():
    fit_logits, fit_truth = overconfident(0, 4000)
    test_logits, test_truth = overconfident(1, 4000)
    temperature = fit_temperature(fit_logits, fit_truth)
    assert temperature == pytest.approx(4.0, rel=0.1)
    result = calibrate(test_logits, test_truth, fit_logits, fit_truth, bins=15)
    assert result["nll_calibrated"] < 0.8 * result["nll"]
    assert result["ece_calibrated"] < 0.03 < result["ece"]
    assert result["brier_calibrated"] < result["brier"]
    assert sum(row["count"] for row in result["reliability_calibrated"]) == 4000


def test_a_calibrated_model_keeps_a_temperature_near_one():
    logits, truth = overconfident(2, 4000)
    assert fit_temperature(logits / 4, truth) == pytest.approx(1.0, abs=0.1)


def test_served_temperature_falls_back_to_one():
    metrics = {"variants": {"a": {"temperature": 1.7}, "b": {}, "c": {"temperature": None}}}
    assert served_temperature(metrics, "a") == 1.7
    assert served_temperature(metrics, "b") == served_temperature(metrics, "c") == 1.0
    assert served_temperature(metrics, "missing") == 1.0


def test_probability_loyalty_is_one_for_equal_and_zero_for_disjoint_distributions():
    assert probability_loyalty(PROBABILITIES, PROBABILITIES) == pytest.approx(1.0)
    assert probability_loyalty(np.eye(2), np.eye(2)[::-1]) == pytest.approx(0.0, abs=1e-5)
    # JS([1, 0], [0.5, 0.5]), the mixture being [0.75, 0.25]: half of each KL to it, in bits.
    js = 0.5 * math.log2(1 / 0.75) + 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(2))
    assert probability_loyalty(np.array([[1.0, 0.0]]), np.array([[0.5, 0.5]])) == pytest.approx(
        1 - math.sqrt(js), abs=1e-5
    )


def test_label_flips_count_forgotten_and_learned_examples():
    truth = [0, 0, 1, 1, 2]
    baseline = [0, 0, 1, 0, 2]
    variant = [0, 1, 1, 1, 1]
    texts = ["a", "b " * 100, "c", "d", "e"]
    flips = label_flips(truth, baseline, variant, ["x", "y", "z"], texts)
    assert flips["flips"] == 3 and flips["flip_rate"] == pytest.approx(0.6)
    assert flips["flip_accuracy"] == pytest.approx(1 / 3)
    assert flips["baseline_flip_accuracy"] == pytest.approx(2 / 3)
    assert flips["forgotten"] == 2 and flips["learned"] == 1
    assert [e["row"] for e in flips["forgotten_examples"]] == [1, 4]
    assert flips["forgotten_examples"][0]["text"].endswith(" …")
    assert flips["forgotten_examples"][1] == {
        "row": 4,
        "text": "e",
        "truth": "z",
        "baseline": "z",
        "variant": "y",
    }
    assert label_flips(truth, baseline, baseline, ["x", "y", "z"], texts)["flip_accuracy"] is None


def test_entity_flips_compare_spans_and_types():
    words = [["Angela", "Merkel", "visited", "Paris"], ["Oil", "rose"]]
    gold = [["B-per", "I-per", "O", "B-loc"], ["O", "O"]]
    baseline = [["B-per", "I-per", "O", "B-loc"], ["B-org", "O"]]
    variant = [["B-per", "O", "O", "B-loc"], ["O", "O"]]
    flips = entity_flips(gold, baseline, variant, "default", words)
    # Angela Merkel (per) lost, Angela (per) new, Oil (org) lost: 3 of 4 distinct entities.
    assert flips["entity_flips"] == 3 and flips["flip_rate"] == pytest.approx(0.75)
    assert flips["forgotten"] == 1 and flips["learned"] == 0
    assert flips["forgotten_examples"] == [
        {"row": 0, "text": "Angela Merkel", "truth": "per", "variant": "B-per O"}
    ]


def test_score_change_and_excerpt():
    baseline = {"a": {"recall": 0.9}, "b": {"recall": 0.5}}
    variant = {"a": {"recall": 0.8}, "b": {"recall": 0.75}}
    assert score_change(variant, baseline, "recall") == pytest.approx({"a": -0.1, "b": 0.25})
    assert excerpt("short") == "short"
    assert excerpt("word " * 50, chars=12) == "word word …"

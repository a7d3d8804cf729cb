"""The recommendation: the variant best on the objective (by default the fastest) within the drop
budget on every guarded metric."""

from __future__ import annotations

import pytest

from trimflow.evaluation.recommend import drop_points, guard_failures, headline, recommend

ACCURACY = ["accuracy"]
CLASSIFICATION_GUARDS = ["accuracy", "macro_f1"]


def _variant(
    accuracy: float,
    latency: float,
    size: float,
    macro_f1: float = 0.9,
    train_s: float | None = None,
    memory_mb: float | None = None,
) -> dict:
    return {
        "accuracy": accuracy,
        "macro_f1": macro_f1,
        "latency_ms_p50": latency,
        "size_mb": size,
        "train_s": train_s,
        "peak_train_mem_mb": memory_mb,
    }


def test_recommendation_is_the_fastest_variant_inside_the_accuracy_budget():
    variants = {
        "finetuned": _variant(0.970, 30.0, 80.0),
        "fast_but_bad": _variant(0.950, 5.0, 10.0),  # 2.0 points lost: over budget
        "fast": _variant(0.962, 9.0, 20.0),  # 0.8 points lost
        "faster_tie_smaller": _variant(0.961, 9.0, 16.0),  # same latency, smaller
        "slow": _variant(0.975, 25.0, 40.0),
    }
    chosen = recommend(variants, "finetuned", 1.0, ACCURACY)
    assert chosen["variant"] == "faster_tie_smaller"
    assert chosen["speedup"] == pytest.approx(30.0 / 9.0)
    assert chosen["size_ratio"] == pytest.approx(5.0)
    assert chosen["drop_pts"] == {"accuracy": pytest.approx(0.9)}
    assert chosen["excluded"] == {"fast_but_bad": {"accuracy": pytest.approx(2.0)}}
    assert recommend(variants, "finetuned", 3.0, ACCURACY)["variant"] == "fast_but_bad"
    assert recommend(variants, "finetuned", 0.0, ACCURACY)["variant"] == "slow"  # gains


def test_recommendation_falls_back_to_the_baseline_and_rejects_unknown_ones():
    variants = {"finetuned": _variant(0.9, 30.0, 80.0), "bad": _variant(0.5, 1.0, 1.0)}
    assert recommend(variants, "finetuned", 1.0, ACCURACY)["variant"] == "finetuned"
    with pytest.raises(KeyError, match="nope"):
        recommend(variants, "nope", 1.0, ACCURACY)


# R8-like: the distilled student keeps accuracy but loses the rare classes (macro-F1).
R8_LIKE = {
    "finetuned": _variant(0.9712, 24.8, 86.7, macro_f1=0.925),
    "pruned_onnx_int8": _variant(0.9726, 7.0, 16.9, macro_f1=0.930),
    "distilled": _variant(0.9694, 12.3, 66.4, macro_f1=0.794),
    "distilled_onnx_int8": _variant(0.9698, 4.8, 16.8, macro_f1=0.795),
    "sparse80": _variant(0.9625, 24.6, 21.2, macro_f1=0.868),
    "tiny": _variant(0.9500, 3.0, 5.0, macro_f1=0.700),  # made up: fastest, fails both guards
}


def test_macro_f1_guard_excludes_a_variant_that_keeps_accuracy_only():
    by_accuracy = recommend(R8_LIKE, "finetuned", 1.0, ACCURACY)
    assert by_accuracy["variant"] == "distilled_onnx_int8"
    assert by_accuracy["excluded"] == {"tiny": {"accuracy": pytest.approx(2.12)}}
    chosen = recommend(R8_LIKE, "finetuned", 1.0, CLASSIFICATION_GUARDS)
    assert chosen["variant"] == "pruned_onnx_int8"
    assert chosen["guards"] == CLASSIFICATION_GUARDS
    assert chosen["drop_pts"] == {
        "accuracy": pytest.approx(-0.14),
        "macro_f1": pytest.approx(-0.5),
    }
    assert chosen["excluded"] == {
        "distilled": {"macro_f1": pytest.approx(13.1)},
        "distilled_onnx_int8": {"macro_f1": pytest.approx(13.0)},
        "sparse80": {"macro_f1": pytest.approx(5.7)},  # 0.87 accuracy points: within
        "tiny": {"accuracy": pytest.approx(2.12), "macro_f1": pytest.approx(22.5)},
    }


def test_every_guard_is_checked_and_the_budget_is_inclusive():
    base = _variant(0.90, 10.0, 10.0, macro_f1=0.80)
    at_budget = _variant(0.89, 5.0, 5.0, macro_f1=0.79)  # exactly 1.0 point on both
    over_on_f1 = _variant(0.90, 5.0, 5.0, macro_f1=0.7899)
    assert guard_failures(at_budget, base, CLASSIFICATION_GUARDS, 1.0) == {}
    assert guard_failures(over_on_f1, base, CLASSIFICATION_GUARDS, 1.0) == {
        "macro_f1": pytest.approx(1.01)
    }
    assert guard_failures(over_on_f1, base, ACCURACY, 1.0) == {}


def test_headline_states_the_ratios_and_the_quality_each_guard_costs():
    variants = {
        "finetuned": _variant(0.970, 30.0, 80.0, macro_f1=0.925),
        "small": _variant(0.968, 7.5, 16.0, macro_f1=0.930),
    }
    line = headline(recommend(variants, "finetuned", 1.0, CLASSIFICATION_GUARDS))
    assert line == (
        "recommended small: 4.00x faster at batch 1 and 5.00x smaller than finetuned"
        " (accuracy -0.20 pts, macro_f1 +0.50 pts)"
    )


# Training figures: the baseline trained longest; "untrained" has none (magnitude pruning
# without recovery); "bad" trains fastest but fails the guard.
COSTED = {
    "finetuned": _variant(0.970, 30.0, 80.0, train_s=100.0, memory_mb=900.0),
    "distilled": _variant(0.965, 12.0, 40.0, train_s=60.0, memory_mb=700.0),
    "adapted": _variant(0.968, 30.0, 80.0, train_s=60.0, memory_mb=400.0),
    "quantized": _variant(0.966, 8.0, 20.0, train_s=60.0, memory_mb=700.0),  # distilled's
    "untrained": _variant(0.969, 5.0, 20.0),
    "bad": _variant(0.900, 20.0, 80.0, train_s=5.0, memory_mb=100.0),
}


def test_latency_objective_is_the_default_and_is_recorded():
    chosen = recommend(COSTED, "finetuned", 1.0, ACCURACY)
    assert (chosen["variant"], chosen["objective"]) == ("untrained", "latency")
    assert recommend(COSTED, "finetuned", 1.0, ACCURACY, "latency") == chosen


def test_train_time_objective_picks_the_quickest_to_train_ties_to_latency():
    chosen = recommend(COSTED, "finetuned", 1.0, ACCURACY, "train_time")
    # distilled, adapted and quantized trained 60 s; quantized is the fastest of them.
    assert (chosen["variant"], chosen["objective"]) == ("quantized", "train_time")
    assert chosen["speedup"] == pytest.approx(30.0 / 8.0)
    assert chosen["excluded"] == {"bad": {"accuracy": pytest.approx(7.0)}}


def test_train_memory_objective_picks_the_least_peak_training_memory():
    chosen = recommend(COSTED, "finetuned", 1.0, ACCURACY, "train_memory")
    assert (chosen["variant"], chosen["objective"]) == ("adapted", "train_memory")
    only_baseline = {"finetuned": COSTED["finetuned"], "untrained": COSTED["untrained"]}
    assert recommend(only_baseline, "finetuned", 1.0, ACCURACY, "train_memory")["variant"] == (
        "finetuned"
    )


def test_training_objectives_need_figures_of_an_eligible_variant():
    variants = {"finetuned": _variant(0.97, 30.0, 80.0), "bad": COSTED["bad"]}
    with pytest.raises(ValueError, match=r"report.objective=train_time: .* train_s"):
        recommend(variants, "finetuned", 1.0, ACCURACY, "train_time")
    assert recommend(variants, "finetuned", 1.0, ACCURACY)["variant"] == "finetuned"


def test_headline_names_an_objective_other_than_latency():
    line = headline(recommend(COSTED, "finetuned", 1.0, ACCURACY, "train_memory"))
    assert line.startswith("recommended adapted (objective train_memory): 1.00x faster at batch 1")
    assert "objective" not in headline(recommend(COSTED, "finetuned", 1.0, ACCURACY))


def test_lower_is_better_guards_count_a_rise_as_the_drop():
    base = {**_variant(0.95, 10.0, 100.0), "ece_calibrated": 0.02, "accuracy_typo1": 0.93}
    worse_calibrated = {**_variant(0.95, 2.0, 20.0), "ece_calibrated": 0.05, "accuracy_typo1": 0.93}
    fragile = {**_variant(0.95, 3.0, 20.0), "ece_calibrated": 0.01, "accuracy_typo1": 0.80}
    steady = {**_variant(0.95, 4.0, 20.0), "ece_calibrated": 0.025, "accuracy_typo1": 0.925}
    variants = {"base": base, "worse": worse_calibrated, "fragile": fragile, "steady": steady}
    result = recommend(variants, "base", 1.0, ["accuracy", "ece_calibrated", "accuracy_typo1"])
    assert result["variant"] == "steady"
    assert result["excluded"] == {
        "worse": {"ece_calibrated": 3.0},
        "fragile": {"accuracy_typo1": 13.0},
    }
    assert result["drop_pts"] == {"accuracy": 0.0, "ece_calibrated": 0.5, "accuracy_typo1": 0.5}
    assert drop_points(fragile, base, "ece_calibrated") == pytest.approx(-1.0)

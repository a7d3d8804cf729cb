"""Per-slice quality against hand counts: the slicings, the min_size rule, an extra column."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from trimflow.evaluation.slices import (
    gap_change,
    length_buckets,
    slice_features,
    slice_report,
    word_slice_features,
)

LABELS = ["earn", "acq"]
TRUTH = [0, 0, 0, 0, 1, 1, 1, 1]
PREDICTIONS = [0, 0, 0, 1, 1, 0, 0, 1]
PIECE_COUNTS = [10, 70, 300, 20, 130, 5, 600, 40]
TRUNCATED = [False, False, True, False, False, False, True, False]
EXTRA = pd.DataFrame({"source": ["a", "a", "b", "b", "a", "b", None, "a"]}, index=range(10, 18))


def features(extra: pd.DataFrame | None = EXTRA) -> pd.DataFrame:
    """The handmade set's slicings, with the `source` column unless told otherwise."""
    return slice_features(TRUTH, LABELS, PIECE_COUNTS, TRUNCATED, extra)


def test_slice_features_columns_and_values():
    table = features()
    assert list(table.columns) == ["class", "length", "truncated", "source"]
    assert table["class"].tolist() == ["earn"] * 4 + ["acq"] * 4
    assert table["length"].tolist() == [
        "<64", "64-127", ">=256", "<64", "128-255", "<64", ">=256", "<64"
    ]  # fmt: skip
    assert table["truncated"].tolist() == ["no", "no", "yes", "no", "no", "no", "yes", "no"]
    assert table["source"].tolist() == ["a", "a", "b", "b", "a", "b", "missing", "a"]


def test_length_buckets_with_configured_edges():
    buckets = length_buckets([0, 31, 32, 99, 100], [32, 100])
    assert buckets == ["<32", "<32", "32-99", "32-99", ">=100"]
    for edges in ([], [64, 64], [128, 64]):
        with pytest.raises(ValueError, match="increasing"):
            length_buckets([1], edges)


def test_slice_features_rejects_clashing_columns_and_length_mismatch():
    with pytest.raises(ValueError, match="clash"):
        features(pd.DataFrame({"class": ["x"] * 8}))
    with pytest.raises(ValueError, match="differ in length"):
        features(EXTRA.iloc[:5])


def test_every_slice_against_hand_counts():
    report = slice_report(TRUTH, PREDICTIONS, features())
    scores = {
        column: {value: (s["accuracy"], s["count"]) for value, s in slicing["slices"].items()}
        for column, slicing in report["slicings"].items()
    }
    assert scores["class"] == {"earn": (0.75, 4), "acq": (0.5, 4)}
    assert scores["length"] == {
        "<64": (0.5, 4), "64-127": (1.0, 1), "128-255": (1.0, 1), ">=256": (0.5, 2)
    }  # fmt: skip
    assert scores["truncated"] == {"yes": (0.5, 2), "no": (pytest.approx(4 / 6), 6)}
    assert scores["source"] == {"a": (1.0, 4), "b": (pytest.approx(1 / 3), 3), "missing": (0.0, 1)}
    assert report["worst_slice"] == "source=missing"
    assert report["worst_slice_accuracy"] == 0.0
    assert report["slice_gap"] == 1.0 and report["slice_gap_column"] == "source"
    assert report["slicings"]["class"]["gap"] == 0.25
    assert report["slicings"]["length"]["gap"] == 0.5


def test_min_size_leaves_small_slices_out_of_worst_and_gap_but_lists_them():
    report = slice_report(TRUTH, PREDICTIONS, features(), min_size=2)
    assert report["slicings"]["source"]["slices"]["missing"]["count"] == 1
    assert report["worst_slice"] == "source=b"
    assert report["worst_slice_accuracy"] == pytest.approx(1 / 3)
    assert report["slicings"]["length"]["gap"] == 0.0
    assert report["slice_gap"] == pytest.approx(2 / 3) and report["slice_gap_column"] == "source"
    report = slice_report(TRUTH, PREDICTIONS, features(), min_size=4)
    assert report["worst_slice"] == "class=acq"  # ties with length=<64: the first slicing wins
    assert report["slice_gap"] == 0.25 and report["slice_gap_column"] == "class"
    report = slice_report(TRUTH, PREDICTIONS, features(), min_size=9)
    assert report["worst_slice"] is None and report["slice_gap"] is None
    assert report["slicings"]["class"]["gap"] is None


def test_macro_f1_per_slice():
    report = slice_report(TRUTH, PREDICTIONS, features(), metric="macro_f1")
    slices = report["slicings"]["source"]["slices"]
    assert slices["a"] == {"macro_f1": 1.0, "count": 4}
    # source=b: truth [0, 0, 1], predictions [0, 1, 0]: F1 0.5 for earn, 0 for acq.
    assert slices["b"] == {"macro_f1": 0.25, "count": 3}
    assert report["worst_slice_macro_f1"] == 0.0


def test_report_is_json_serialisable_plain_values():
    report = slice_report(TRUTH, PREDICTIONS, features(), min_size=2)
    assert json.loads(json.dumps(report)) == report


def test_gap_change_is_the_variant_gap_minus_the_baseline_gap():
    with_source = slice_report(TRUTH, PREDICTIONS, features())
    without_source = slice_report(TRUTH, PREDICTIONS, features(extra=None))
    assert without_source["slice_gap"] == 0.5 and without_source["slice_gap_column"] == "length"
    assert gap_change(with_source, without_source) == 0.5
    assert gap_change(without_source, with_source) == -0.5
    empty = slice_report(TRUTH, PREDICTIONS, features(), min_size=9)
    assert gap_change(empty, with_source) is None


def test_ner_slices_words_by_gold_entity_type_sentence_length_and_truncation():
    gold = [["B-PER", "I-PER", "O"], ["B-LOC", "O"]]
    table = word_slice_features(gold, piece_counts=[5, 80], truncated=[False, True])
    assert table.to_dict("list") == {
        "entity": ["PER", "PER", "O", "LOC", "O"],
        "length": ["<64", "<64", "<64", "64-127", "64-127"],
        "truncated": ["no", "no", "no", "yes", "yes"],
    }
    truth = ["B-PER", "I-PER", "O", "B-LOC", "O"]
    report = slice_report(truth, ["B-PER", "O", "O", "B-LOC", "O"], table)
    assert report["slicings"]["entity"]["slices"]["PER"] == {"accuracy": 0.5, "count": 2}
    assert report["worst_slice"] == "entity=PER" and report["slice_gap"] == 0.5

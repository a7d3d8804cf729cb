"""NER entity metrics, the entity-type confusion matrix and the non-neural baselines."""

from __future__ import annotations

import json
import random

import pytest
from seqeval.metrics import (
    accuracy_score,
    classification_report,
    f1_score,
    precision_score,
    recall_score,
)
from seqeval.scheme import IOB2

from trimflow.data.conll import repaired_tags
from trimflow.evaluation.baselines import (
    GazetteerBaseline,
    MajorityTagBaseline,
    baseline_scores,
)
from trimflow.evaluation.entities import NO_ENTITY, entity_confusion, entity_metrics

# Three gold entities (person, location, org); two predicted, only the person one correct.
GOLD = [["B-person", "I-person", "O", "B-location"], ["B-org", "O"]]
PREDICTED = [["B-person", "I-person", "O", "O"], ["O", "B-location"]]
SEQEVAL_ARGS = {"default": {}, "strict": {"mode": "strict", "scheme": IOB2}}


def messy_tag_sequences(seed: int) -> tuple[list[list[str]], list[list[str]]]:
    """Random aligned gold and predicted tags, including invalid IOB2 (I-X after O)."""
    rng = random.Random(seed)
    lengths = [rng.randint(1, 12) for _ in range(40)]
    choices = ["O", "O", "B-a", "I-a", "B-b", "I-b", "B-c"]
    gold = [[rng.choice(choices) for _ in range(n)] for n in lengths]
    predicted = [[rng.choice(choices) for _ in range(n)] for n in lengths]
    return gold, predicted


# --- entity_metrics ----------------------------------------------------------------------------


def test_metrics_match_hand_computed_values():
    metrics = entity_metrics(GOLD, PREDICTED)

    assert metrics["precision"] == pytest.approx(1 / 2)
    assert metrics["recall"] == pytest.approx(1 / 3)
    assert metrics["f1"] == pytest.approx(0.4)
    assert metrics["token_accuracy"] == pytest.approx(3 / 6)
    assert metrics["entity_types"] == ["location", "org", "person"]
    assert metrics["macro_f1"] == pytest.approx(1 / 3)
    assert metrics["per_type"] == {
        "location": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
        "org": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
        "person": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1},
    }
    assert metrics["confusion_labels"] == ["location", "org", "person", NO_ENTITY]
    assert metrics["confusion_matrix"] == [
        [0, 0, 0, 1],  # the gold location is missed
        [0, 0, 0, 1],  # the gold org is missed
        [0, 0, 1, 0],
        [1, 0, 0, 0],  # a spurious location in the second sentence
    ]


def test_metrics_are_exactly_seqevals_and_json_serialisable():
    metrics = entity_metrics(GOLD, PREDICTED)

    assert metrics["f1"] == f1_score(GOLD, PREDICTED)
    assert metrics["precision"] == precision_score(GOLD, PREDICTED)
    assert metrics["recall"] == recall_score(GOLD, PREDICTED)
    assert metrics["token_accuracy"] == accuracy_score(GOLD, PREDICTED)
    assert json.loads(json.dumps(metrics)) == metrics


@pytest.mark.parametrize("mode", ["default", "strict"])
def test_per_type_matches_seqeval_report_on_messy_predictions(mode):
    gold, predicted = messy_tag_sequences(seed=0)
    scheme_args = SEQEVAL_ARGS[mode]

    metrics = entity_metrics(gold, predicted, mode)
    report = classification_report(
        gold, predicted, output_dict=True, zero_division=0, **scheme_args
    )

    assert metrics["f1"] == f1_score(gold, predicted, **scheme_args)
    assert metrics["entity_types"] == sorted(
        set(report) - {"micro avg", "macro avg", "weighted avg"}
    )
    for entity_type, scores in metrics["per_type"].items():
        expected = report[entity_type]
        assert scores == {
            "precision": expected["precision"],
            "recall": expected["recall"],
            "f1": expected["f1-score"],
            "support": expected["support"],
        }
    assert metrics["macro_f1"] == pytest.approx(report["macro avg"]["f1-score"])


def test_strict_mode_ignores_an_inside_tag_after_outside():
    gold = [["O", "B-person", "I-person", "O"]]
    predicted = [["O", "I-person", "I-person", "O"]]

    default = entity_metrics(gold, predicted)
    strict = entity_metrics(gold, predicted, mode="strict")

    assert default["f1"] == 1.0  # conlleval-style: I-person after O opens an entity
    assert strict["f1"] == 0.0
    assert strict["precision"] == 0.0
    assert strict["f1"] == f1_score(gold, predicted, mode="strict", scheme=IOB2)
    assert strict["confusion_matrix"] == [[0, 1], [0, 0]]  # the gold person is missed
    assert default["token_accuracy"] == strict["token_accuracy"] == pytest.approx(3 / 4)


def test_a_type_only_in_invalid_predictions_counts_in_default_mode_only():
    gold = [["B-person", "O", "O"]]
    predicted = [["B-person", "O", "I-misc"]]

    assert entity_metrics(gold, predicted)["entity_types"] == ["misc", "person"]
    assert entity_metrics(gold, predicted)["per_type"]["misc"]["support"] == 0
    assert entity_metrics(gold, predicted, mode="strict")["entity_types"] == ["person"]


def test_no_entities_anywhere_scores_zero():
    metrics = entity_metrics([["O", "O"]], [["O", "O"]])

    assert (metrics["f1"], metrics["macro_f1"], metrics["token_accuracy"]) == (0.0, 0.0, 1.0)
    assert metrics["per_type"] == {}
    assert metrics["confusion_matrix"] == [[0]]


def test_length_mismatch_names_the_sentence():
    with pytest.raises(ValueError, match="sentence 1: 2 gold tags but 1 predicted"):
        entity_metrics([["O"], ["O", "B-person"], ["O"]], [["O"], ["O"], ["O", "O"]])
    with pytest.raises(ValueError, match="2 gold sentences but 1 predicted"):
        entity_metrics([["O"], ["O"]], [["O"]])


def test_rejects_unknown_mode_and_empty_input():
    with pytest.raises(ValueError, match="unknown seqeval mode"):
        entity_metrics(GOLD, PREDICTED, mode="lenient")
    with pytest.raises(ValueError, match="no words"):
        entity_metrics([[]], [[]])


# --- entity_confusion --------------------------------------------------------------------------


def test_confusion_places_wrong_type_missed_and_spurious_entities():
    gold = [
        ["B-person", "I-person", "O", "B-org", "I-org"],
        ["B-location", "O", "O"],
    ]
    predicted = [
        ["B-org", "I-org", "O", "B-org", "O"],  # person -> org; org span cut short
        ["O", "O", "B-person"],  # location missed; person spurious
    ]

    labels, matrix = entity_confusion(gold, predicted, ["location", "org", "person"])

    assert labels == ["location", "org", "person", NO_ENTITY]
    assert matrix == [
        [0, 0, 0, 1],
        [0, 0, 0, 1],  # an overlapping but shorter span is a miss ...
        [0, 1, 0, 0],
        [0, 1, 1, 0],  # ... and a spurious prediction
    ]


@pytest.mark.parametrize("mode", ["default", "strict"])
def test_confusion_rows_and_columns_add_up_to_entity_counts(mode):
    gold, predicted = messy_tag_sequences(seed=1)
    scheme_args = SEQEVAL_ARGS[mode]

    metrics = entity_metrics(gold, predicted, mode)
    matrix = metrics["confusion_matrix"]
    report = classification_report(
        gold, predicted, output_dict=True, zero_division=0, **scheme_args
    )

    for i, entity_type in enumerate(metrics["entity_types"]):
        per_type = metrics["per_type"][entity_type]
        assert sum(matrix[i]) == per_type["support"]
        assert matrix[i][i] == round(per_type["recall"] * per_type["support"])
    assert matrix[-1][-1] == 0
    gold_total = sum(sum(row) for row in matrix[:-1])
    predicted_total = sum(row[i] for row in matrix for i in range(len(matrix) - 1))
    assert gold_total == report["micro avg"]["support"]
    correct = sum(matrix[i][i] for i in range(len(matrix) - 1))
    assert correct / predicted_total == pytest.approx(metrics["precision"])


def test_confusion_rejects_types_it_was_not_given():
    with pytest.raises(ValueError, match=r"\['org'\] are not in the given types"):
        entity_confusion(GOLD, PREDICTED, ["location", "person"])
    with pytest.raises(ValueError, match="clashes"):
        entity_confusion(GOLD, PREDICTED, ["location", "org", "person", NO_ENTITY])


# --- baselines ---------------------------------------------------------------------------------


def test_majority_tag_learns_each_words_most_frequent_tag_case_insensitively():
    tokens = [["Paris", "is", "nice"], ["paris", "Hilton"], ["PARIS", "is"], ["Lima", "Lima"]]
    tags = [
        ["B-location", "O", "O"],
        ["B-person", "I-person"],
        ["B-location", "O"],
        ["B-city", "O"],  # a tie for "lima": the tag seen first wins
    ]

    baseline = MajorityTagBaseline(tokens, tags)

    assert baseline.predict([["pArIs", "IS", "unseen", "lima"]]) == [
        ["B-location", "O", "O", "B-city"]
    ]


def test_majority_tag_repairs_inside_tags_that_open_an_entity():
    tokens = [["New", "York"], ["Paris", "Hilton"]]
    tags = [["B-location", "I-location"], ["B-person", "I-person"]]

    predicted = MajorityTagBaseline(tokens, tags).predict(
        [["york", "is", "new", "york"], ["new", "hilton"]]
    )

    assert predicted == [
        ["B-location", "O", "B-location", "I-location"],
        ["B-location", "B-person"],
    ]


def test_repaired_tags_only_touch_inside_tags_that_continue_nothing():
    tags = ["I-a", "I-a", "B-b", "I-a", "O", "I-b", "B-a", "I-a"]

    assert repaired_tags(tags) == ["B-a", "I-a", "B-b", "B-a", "O", "B-b", "B-a", "I-a"]


def test_gazetteer_prefers_the_longest_entry_case_insensitively():
    tokens = [["I", "love", "New", "York"], ["New", "York", "City", "!"]]
    tags = [["O", "O", "B-location", "I-location"], ["B-city", "I-city", "I-city", "O"]]

    baseline = GazetteerBaseline(tokens, tags)

    assert baseline.predict([["NEW", "YORK", "city", "and", "new", "york"]]) == [
        ["B-city", "I-city", "I-city", "O", "B-location", "I-location"]
    ]


def test_gazetteer_matches_whole_entries_only():
    baseline = GazetteerBaseline([["New", "York", "City"]], [["B-city", "I-city", "I-city"]])

    assert baseline.predict([["new", "york"], ["york", "city"], ["new", "jersey", "city"]]) == [
        ["O", "O"],
        ["O", "O"],
        ["O", "O", "O"],
    ]


def test_gazetteer_types_an_entry_by_its_majority():
    tokens = [["Jordan"], ["Jordan"], ["Jordan"], ["Apple"], ["Apple"]]
    tags = [["B-location"], ["B-person"], ["B-person"], ["B-org"], ["B-fruit"]]

    baseline = GazetteerBaseline(tokens, tags)

    assert baseline.predict([["jordan", "apple"]]) == [["B-person", "B-org"]]


def test_baselines_reject_misaligned_training_data():
    with pytest.raises(ValueError, match=r"train row 1: 1 tokens but 2 tags"):
        GazetteerBaseline([["a"], ["b"]], [["O"], ["O", "O"]])
    with pytest.raises(ValueError, match="train: 2 token rows but 1 tag rows"):
        MajorityTagBaseline([["a"], ["b"]], [["O"]])


def test_baseline_scores_reward_memorised_entities_only():
    train_tokens = [["Angela", "Merkel", "visited", "Berlin"], ["Berlin", "is", "big"]]
    train_tags = [["B-person", "I-person", "O", "B-location"], ["B-location", "O", "O"]]
    memorised_tokens = [["Berlin", "welcomed", "angela", "merkel"]]
    memorised_tags = [["B-location", "O", "B-person", "I-person"]]
    unseen_tokens = [["Oslo", "welcomed", "Jonas"]]
    unseen_tags = [["B-location", "O", "B-person"]]

    on_memorised = baseline_scores(train_tokens, train_tags, memorised_tokens, memorised_tags)
    on_unseen = baseline_scores(train_tokens, train_tags, unseen_tokens, unseen_tags)

    assert set(on_memorised) == {"majority_tag", "gazetteer"}
    assert on_memorised["gazetteer"]["predictions"] == memorised_tags
    assert on_memorised["gazetteer"]["f1"] == 1.0
    assert on_unseen["gazetteer"]["predictions"] == [["O", "O", "O"]]
    assert on_unseen["gazetteer"]["f1"] == 0.0
    majority = dict(on_memorised["majority_tag"])
    predictions = majority.pop("predictions")
    assert majority == entity_metrics(memorised_tags, predictions)


@pytest.mark.parametrize("mode", ["default", "strict"])
def test_baseline_predictions_are_valid_iob2_in_either_mode(mode):
    train_tokens = [["New", "York", "is", "big"]]
    train_tags = [["B-location", "I-location", "O", "O"]]

    scores = baseline_scores(
        train_tokens, train_tags, [["york", "is", "big"]], [["B-location", "O", "O"]], mode
    )

    assert scores["majority_tag"]["predictions"] == [["B-location", "O", "O"]]
    assert scores["majority_tag"]["f1"] == 1.0

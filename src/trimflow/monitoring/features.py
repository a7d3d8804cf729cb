"""The features `trimflow monitor` compares, drawn from prediction-log records.

Per text: its length in characters and in word pieces, the share of its pieces the tokenizer
did not know, and whether it was truncated. Per answer: the predicted label and its confidence
for classification; for NER every entity counts (its type, its score), and so does the number
of entities per text, which drops when traffic holds no entities the model knows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trimflow.monitoring.records import LoggedText


@dataclass(frozen=True)
class Feature:
    """A compared feature: numeric (KS test, quantile bins) or categorical (chi-square)."""

    name: str
    kind: Literal["numeric", "categorical"]
    description: str


COMMON_FEATURES = (
    Feature("chars", "numeric", "characters per text"),
    Feature("pieces", "numeric", "word pieces per text (before truncation)"),
    Feature("unknown_share", "numeric", "share of a text's word pieces that are unknown"),
    Feature("truncated", "categorical", "texts longer than the model's max_length"),
)
TASK_FEATURES = {
    "classification": (
        Feature("label", "categorical", "predicted label"),
        Feature("confidence", "numeric", "probability of the predicted label"),
    ),
    "ner": (
        Feature("label", "categorical", "entity type, per entity"),
        Feature("confidence", "numeric", "entity score (mean tag probability), per entity"),
        Feature("entities", "numeric", "entities per text"),
    ),
}


def task_features(task: str) -> tuple[Feature, ...]:
    """The features compared for `task`."""
    return (*TASK_FEATURES[task], *COMMON_FEATURES)


def feature_values(records: list[LoggedText], task: str) -> dict[str, list]:
    """Each of `task_features(task)` -> its values over `records` (categories as strings)."""
    if task == "ner":
        entities = [entity for record in records for entity in record.entities]
        answers = {
            "label": [entity.type for entity in entities],
            "confidence": [entity.score for entity in entities],
            "entities": [len(record.entities) for record in records],
        }
    else:
        answers = {
            "label": [record.label for record in records],
            "confidence": [record.score for record in records],
        }
    return {
        **answers,
        "chars": [record.chars for record in records],
        "pieces": [record.pieces for record in records],
        "unknown_share": [record.unknown_pieces / max(record.pieces, 1) for record in records],
        "truncated": [str(record.truncated).lower() for record in records],
    }

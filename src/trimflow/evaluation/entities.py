"""Entity-level NER metrics (seqeval) as JSON-serialisable plain Python values."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score
from seqeval.metrics.sequence_labeling import get_entities
from seqeval.metrics.sequence_labeling import (
    precision_recall_fscore_support as default_precision_recall_fscore_support,
)
from seqeval.metrics.v1 import (
    precision_recall_fscore_support as strict_precision_recall_fscore_support,
)
from seqeval.scheme import IOB2, Tokens

SeqevalMode = Literal["default", "strict"]
NO_ENTITY = "none"

Span = tuple[int, int]
TagSequences = Sequence[Sequence[str]]
TagLists = list[list[str]]


def entity_metrics(
    gold: TagSequences, predicted: TagSequences, mode: SeqevalMode = "default"
) -> dict[str, Any]:
    """Micro and per-type entity scores, token accuracy and the entity-type confusion matrix.

    `gold` and `predicted` hold one IOB2 tag per word, sentence by sentence. `mode="default"`
    scores like conlleval (an I-X after O starts an entity); `"strict"` follows IOB2 exactly.
    """
    gold, predicted = _aligned_lists(gold, predicted)
    if not any(gold):
        raise ValueError("no words to evaluate")
    scheme_args = _scheme_args(mode)
    per_type = _per_type_scores(gold, predicted, mode)
    entity_types = list(per_type)
    labels, matrix = entity_confusion(gold, predicted, entity_types, mode=mode)
    return {
        "f1": entity_f1(gold, predicted, mode),
        "precision": float(precision_score(gold, predicted, zero_division=0, **scheme_args)),
        "recall": float(recall_score(gold, predicted, zero_division=0, **scheme_args)),
        "macro_f1": _mean([scores["f1"] for scores in per_type.values()]),
        "token_accuracy": float(accuracy_score(gold, predicted)),
        "per_type": per_type,
        "entity_types": entity_types,
        "confusion_labels": labels,
        "confusion_matrix": matrix,
    }


def entity_f1(gold: TagSequences, predicted: TagSequences, mode: SeqevalMode = "default") -> float:
    """Micro entity F1 (seqeval, in `mode`) of `predicted` against `gold`."""
    gold, predicted = _aligned_lists(gold, predicted)
    return float(f1_score(gold, predicted, zero_division=0, **_scheme_args(mode)))


def entity_confusion(
    gold: TagSequences,
    predicted: TagSequences,
    types: Sequence[str],
    mode: SeqevalMode = "default",
) -> tuple[list[str], list[list[int]]]:
    """Counts of gold type (rows) against predicted type (columns) for entities with equal spans.

    Labels are `[*types, NO_ENTITY]`: a gold entity no prediction matches by span counts in the
    NO_ENTITY column, a predicted entity matching no gold span in the NO_ENTITY row.
    """
    gold, predicted = _aligned_lists(gold, predicted)
    _check_mode(mode)
    sentences = [
        (entity_spans(gold_tags, mode), entity_spans(predicted_tags, mode))
        for gold_tags, predicted_tags in zip(gold, predicted, strict=True)
    ]
    _check_known_types(_entity_types(gold + predicted, mode), types)
    labels = [*types, NO_ENTITY]
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for gold_spans, predicted_spans in sentences:
        for span, gold_type in gold_spans.items():
            matrix[index[gold_type]][index[predicted_spans.get(span, NO_ENTITY)]] += 1
        for span, predicted_type in predicted_spans.items():
            if span not in gold_spans:
                matrix[index[NO_ENTITY]][index[predicted_type]] += 1
    return labels, matrix


def _aligned_lists(gold: TagSequences, predicted: TagSequences) -> tuple[TagLists, TagLists]:
    """Both inputs as lists of lists (as seqeval needs) after checking they align word by word."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold sentences but {len(predicted)} predicted")
    for i, (gold_tags, predicted_tags) in enumerate(zip(gold, predicted, strict=True)):
        if len(gold_tags) != len(predicted_tags):
            raise ValueError(
                f"sentence {i}: {len(gold_tags)} gold tags but {len(predicted_tags)} predicted"
            )
    return [list(tags) for tags in gold], [list(tags) for tags in predicted]


def _check_mode(mode: str) -> None:
    """Raise unless `mode` is a SeqevalMode."""
    if mode not in get_args(SeqevalMode):
        raise ValueError(f"unknown seqeval mode {mode!r}; expected one of {get_args(SeqevalMode)}")


def _scheme_args(mode: SeqevalMode) -> dict[str, Any]:
    """Keyword arguments selecting `mode` in seqeval's scoring functions."""
    _check_mode(mode)
    return {"mode": "strict", "scheme": IOB2} if mode == "strict" else {}


def entity_spans(tags: list[str], mode: SeqevalMode) -> dict[Span, str]:
    """Entity type by half-open word span, extracted as seqeval does in `mode`."""
    if mode == "strict":
        return {(e.start, e.end): e.tag for e in Tokens(tags, scheme=IOB2).entities}
    return {(start, end + 1): entity_type for entity_type, start, end in get_entities(tags)}


def _entity_types(sequences: TagLists, mode: SeqevalMode) -> list[str]:
    """Sorted entity types found in `sequences`, the order seqeval reports per-type scores in."""
    return sorted({t for tags in sequences for t in entity_spans(tags, mode).values()})


def _per_type_scores(
    gold: TagLists, predicted: TagLists, mode: SeqevalMode
) -> dict[str, dict[str, float | int]]:
    """Precision, recall, F1 and gold support for every type in gold or predictions."""
    if mode == "strict":
        scores = strict_precision_recall_fscore_support(
            gold, predicted, average=None, zero_division=0, scheme=IOB2
        )
    else:
        scores = default_precision_recall_fscore_support(
            gold, predicted, average=None, zero_division=0
        )
    precision, recall, f1, support = scores
    return {
        entity_type: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, entity_type in enumerate(_entity_types(gold + predicted, mode))
    }


def _check_known_types(found: list[str], types: Sequence[str]) -> None:
    """Raise if a found entity type is missing from `types` or `types` shadows NO_ENTITY."""
    if NO_ENTITY in types:
        raise ValueError(f"entity type {NO_ENTITY!r} clashes with the no-entity label")
    unknown = sorted(set(found) - set(types))
    if unknown:
        raise ValueError(f"entity types {unknown} are not in the given types {list(types)}")


def _mean(values: list[float]) -> float:
    """Arithmetic mean, 0.0 for no values."""
    return sum(values) / len(values) if values else 0.0

"""Test-set quality of one model, per task: the metrics, and the predictions behind them.

A scorer is built once from the test split; `score(model, batches, order)` runs the model over
length-sorted batches (`order[k]` is the test row of the k-th sorted example) and returns
JSON-serialisable metrics plus `predictions` in test-row order and the `logits` behind them (a
NumPy array the caller drops before writing): one row per text, or for NER one row per word the
model read (its first sub-token's), sentence by sentence. `truth` holds the gold label ids of
those rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import pandas as pd
from torch import Tensor, nn

from trimflow.config.schema import TrimflowConfig
from trimflow.data.token_labels import first_pieces, word_predictions
from trimflow.evaluation.classification import classification_metrics
from trimflow.evaluation.entities import SeqevalMode, entity_metrics
from trimflow.evaluation.inference import predict_logits, token_logits_in_rows
from trimflow.layout import Layout

Batches = Sequence[dict[str, Tensor]]


class LabelScorer:
    """Classification: one label per text; accuracy, macro-F1, per-class scores, confusion."""

    quality_keys = ("accuracy", "macro_f1")

    def __init__(self, truth: Sequence[int], labels: list[str]) -> None:
        self.truth = list(truth)
        self.labels = labels

    def score(self, model: nn.Module, batches: Batches, order: np.ndarray) -> dict[str, Any]:
        """Classification metrics of `model`, its label ids and logits in test-row order."""
        logits = np.empty((len(self.truth), len(self.labels)), dtype=np.float32)
        logits[order] = predict_logits(model, batches)
        predictions = logits.argmax(axis=-1)
        return {
            **classification_metrics(self.truth, predictions.tolist(), self.labels),
            "label_names": self.labels,
            "predictions": predictions.tolist(),
            "logits": logits,
        }


class EntityScorer:
    """NER: one tag per word, scored against the untruncated gold tags with seqeval.

    A word's prediction is its first word piece's; words cut by truncation are predicted `O`,
    so entities truncation removed count as missed.
    """

    quality_keys = ("f1", "precision", "recall", "macro_f1", "token_accuracy")

    def __init__(
        self,
        gold: Sequence[Sequence[str]],
        word_ids: Sequence[Sequence[int]],
        labels: list[str],
        mode: SeqevalMode,
    ) -> None:
        self.gold = [list(tags) for tags in gold]
        self.word_ids = word_ids
        self.labels = labels
        self.outside = labels.index("O")
        self.mode = mode
        self.pieces = [first_pieces(ids) for ids in word_ids]
        index = {label: i for i, label in enumerate(labels)}
        self.truth = np.array(
            [
                index[tags[word]]
                for tags, kept in zip(self.gold, self.pieces, strict=True)
                for word in kept
            ],
            dtype=np.int64,
        )

    def score(self, model: nn.Module, batches: Batches, order: np.ndarray) -> dict[str, Any]:
        """Entity metrics of `model`'s word tags, the tags themselves and the logits of the
        words it read, in test-row order."""
        by_row = token_logits_in_rows(model, batches, order)
        predicted = [
            [
                self.labels[i]
                for i in word_predictions(logits.argmax(axis=-1), word_ids, len(gold), self.outside)
            ]
            for logits, word_ids, gold in zip(by_row, self.word_ids, self.gold, strict=True)
        ]
        return {
            **entity_metrics(self.gold, predicted, self.mode),
            "predictions": predicted,
            "logits": word_logits(by_row, self.pieces),
        }


def word_logits(token_logits: Sequence[np.ndarray], pieces: Sequence[dict[int, int]]) -> np.ndarray:
    """The logits of each sentence's words at their first sub-tokens, sentences concatenated."""
    return np.concatenate(
        [logits[list(kept.values())] for logits, kept in zip(token_logits, pieces, strict=True)]
    )


def make_scorer(
    cfg: TrimflowConfig, layout: Layout, labels: list[str]
) -> LabelScorer | EntityScorer:
    """The task's scorer over the test split (NER: untruncated gold tags from data/prepared)."""
    if cfg.task.type == "ner":
        test = pd.read_parquet(layout.prepared / "test.parquet")
        word_ids = datasets.load_from_disk(str(layout.tokenized_splits))["test"]["word_ids"]
        return EntityScorer(
            test["tags"].map(list).tolist(), word_ids, labels, cfg.task.seqeval_mode
        )
    truth = datasets.load_from_disk(str(layout.tokenized_splits))["test"]["labels"]
    return LabelScorer(truth, labels)


def agreement(predictions: Sequence[Any], reference: Sequence[Any]) -> float:
    """Share of equal predictions: labels of texts, or tags of words (sentences flattened)."""
    return float(np.mean(_flat(predictions) == _flat(reference)))


def _flat(predictions: Sequence[Any]) -> np.ndarray:
    if predictions and isinstance(predictions[0], list):
        return np.array([tag for sentence in predictions for tag in sentence])
    return np.array(predictions)

"""Non-neural NER baselines learned from training sentences, scored with `entity_metrics`."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from seqeval.metrics.sequence_labeling import get_entities

from trimflow.data.conll import repaired_tags, sentences_from_columns
from trimflow.evaluation.entities import SeqevalMode, entity_metrics

OUTSIDE = "O"


class MajorityTagBaseline:
    """Each word gets the tag it most often had in train (case-insensitive); unseen words get O."""

    def __init__(self, tokens: Sequence[Sequence[str]], tags: Sequence[Sequence[str]]) -> None:
        tag_counts: defaultdict[str, Counter[str]] = defaultdict(Counter)
        for words, sentence_tags in _training_sentences(tokens, tags):
            for word, tag in zip(words, sentence_tags, strict=True):
                tag_counts[word][tag] += 1
        self.tag_by_word = {word: _most_common(counts) for word, counts in tag_counts.items()}

    def predict(self, sentences_tokens: Sequence[Sequence[str]]) -> list[list[str]]:
        """Valid IOB2 tags for every token of every sentence."""
        return [
            repaired_tags([self.tag_by_word.get(token.lower(), OUTSIDE) for token in tokens])
            for tokens in sentences_tokens
        ]


class GazetteerBaseline:
    """Train entities (exact token sequences, case-insensitive) matched longest-first."""

    def __init__(self, tokens: Sequence[Sequence[str]], tags: Sequence[Sequence[str]]) -> None:
        type_counts: defaultdict[tuple[str, ...], Counter[str]] = defaultdict(Counter)
        for words, sentence_tags in _training_sentences(tokens, tags):
            for entity_type, start, end in get_entities(sentence_tags):
                type_counts[words[start : end + 1]][entity_type] += 1
        self.type_by_entry = {entry: _most_common(counts) for entry, counts in type_counts.items()}
        self.longest_entry = max(map(len, self.type_by_entry), default=0)

    def predict(self, sentences_tokens: Sequence[Sequence[str]]) -> list[list[str]]:
        """Valid IOB2 tags for every token of every sentence."""
        return [self._tag_sentence(tuple(t.lower() for t in tokens)) for tokens in sentences_tokens]

    def _tag_sentence(self, lowered: tuple[str, ...]) -> list[str]:
        """Tags from scanning left to right, taking the longest entry starting at each word."""
        tags: list[str] = []
        while len(tags) < len(lowered):
            length, entity_type = self._longest_match(lowered, len(tags))
            if entity_type is None:
                tags.append(OUTSIDE)
            else:
                tags.extend([f"B-{entity_type}"] + [f"I-{entity_type}"] * (length - 1))
        return tags

    def _longest_match(self, lowered: tuple[str, ...], start: int) -> tuple[int, str | None]:
        """Length and type of the longest entry starting at `start`; (1, None) when none does."""
        for length in range(min(self.longest_entry, len(lowered) - start), 0, -1):
            entity_type = self.type_by_entry.get(lowered[start : start + length])
            if entity_type is not None:
                return length, entity_type
        return 1, None


def baseline_scores(
    train_tokens: Sequence[Sequence[str]],
    train_tags: Sequence[Sequence[str]],
    test_tokens: Sequence[Sequence[str]],
    test_tags: Sequence[Sequence[str]],
    mode: SeqevalMode = "default",
) -> dict[str, dict[str, Any]]:
    """`entity_metrics` plus `"predictions"` for each baseline fitted on train, run on test."""
    baselines = {
        "majority_tag": MajorityTagBaseline(train_tokens, train_tags),
        "gazetteer": GazetteerBaseline(train_tokens, train_tags),
    }
    scores = {}
    for name, baseline in baselines.items():
        predictions = baseline.predict(test_tokens)
        scores[name] = {**entity_metrics(test_tags, predictions, mode), "predictions": predictions}
    return scores


def _training_sentences(
    tokens: Sequence[Sequence[str]], tags: Sequence[Sequence[str]]
) -> list[tuple[tuple[str, ...], list[str]]]:
    """(lowercased words, tags) per training sentence; a `DataError` names a misaligned row."""
    return [
        (tuple(token.lower() for token in sentence.tokens), list(sentence.tags))
        for sentence in sentences_from_columns(tokens, tags, "train")
    ]


def _most_common(counts: Counter[str]) -> str:
    """The most frequent key; ties go to the key counted first."""
    return counts.most_common(1)[0][0]

"""Word-level tags to word-piece labels and back, for token classification (NER)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from seqeval.metrics.sequence_labeling import get_entities
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
SPECIAL_WORD_ID = -1


def inside_tag_ids(label_names: Sequence[str]) -> list[int]:
    """Per label id, the id for a word's later sub-tokens: `B-X` -> `I-X` if known, else itself."""
    ids = {name: index for index, name in enumerate(label_names)}
    return [
        ids.get(f"I-{name[2:]}", index) if name.startswith("B-") else index
        for index, name in enumerate(label_names)
    ]


def align_labels(
    word_ids: Sequence[int | None],
    word_tag_ids: Sequence[int],
    label_all_tokens: bool,
    inside: Sequence[int],
) -> list[int]:
    """One label per token: the word's tag on its first sub-token, ignored or `inside` after."""
    labels = []
    previous_word = None
    for word_id in word_ids:
        if word_id is None:
            labels.append(IGNORE_INDEX)
        elif word_id != previous_word:
            labels.append(word_tag_ids[word_id])
        elif label_all_tokens:
            labels.append(inside[word_tag_ids[word_id]])
        else:
            labels.append(IGNORE_INDEX)
        previous_word = word_id
    return labels


@dataclass
class TruncationCount:
    """What truncation to `max_length` removed; combine batches with `add`."""

    examples: int = 0
    words: int = 0
    entities: int = 0

    def add(self, other: TruncationCount) -> None:
        """Accumulate `other` into this count in place."""
        self.examples += other.examples
        self.words += other.words
        self.entities += other.entities


def cut_word_ids(encoding: Any) -> set[int]:
    """Words whose sub-tokens all landed in the overflow of a (fast) tokenizer encoding."""
    kept = {word_id for word_id in encoding.word_ids if word_id is not None}
    overflow = {
        word_id for part in encoding.overflowing for word_id in part.word_ids if word_id is not None
    }
    return overflow - kept


def count_truncation(cut_words: set[int], tags: Sequence[str]) -> TruncationCount:
    """The truncation count of one sentence given its cut words and tag strings."""
    entities = sum(
        any(word in cut_words for word in range(start, end + 1))
        for _, start, end in get_entities(list(tags))
    )
    return TruncationCount(examples=int(bool(cut_words)), words=len(cut_words), entities=entities)


def tokenize_words(
    batch_tokens: Sequence[Sequence[str]],
    batch_tag_ids: Sequence[Sequence[int]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    label_names: Sequence[str],
    label_all_tokens: bool,
) -> tuple[dict[str, list], TruncationCount]:
    """Tokenize pre-split sentences with aligned labels; count what truncation cut off."""
    encoded = tokenizer(
        [list(tokens) for tokens in batch_tokens],
        is_split_into_words=True,
        truncation=True,
        max_length=max_length,
    )
    inside = inside_tag_ids(label_names)
    columns = dict(encoded)
    columns["labels"] = []
    columns["word_ids"] = []
    count = TruncationCount()
    for index, tag_ids in enumerate(batch_tag_ids):
        word_ids = encoded.word_ids(index)
        columns["labels"].append(align_labels(word_ids, tag_ids, label_all_tokens, inside))
        columns["word_ids"].append(
            [SPECIAL_WORD_ID if word_id is None else word_id for word_id in word_ids]
        )
        tags = [label_names[tag_id] for tag_id in tag_ids]
        count.add(count_truncation(cut_word_ids(encoded.encodings[index]), tags))
    columns["length"] = [len(ids) for ids in encoded["input_ids"]]
    columns["num_words"] = [len(tokens) for tokens in batch_tokens]
    return columns, count


def first_pieces(word_ids: Sequence[int | None]) -> dict[int, int]:
    """Each word's first sub-token position, for the words the encoding kept (truncation cuts the
    rest), in word order."""
    positions: dict[int, int] = {}
    for position, word_id in enumerate(word_ids):
        if word_id is not None and word_id >= 0 and word_id not in positions:
            positions[word_id] = position
    return positions


def word_predictions(
    token_predictions: Sequence[int], word_ids: Sequence[int], num_words: int, fill: int
) -> list[int]:
    """Each word's prediction at its first sub-token; `fill` for words without sub-tokens."""
    predictions = [fill] * num_words
    for word_id, position in first_pieces(word_ids[: len(token_predictions)]).items():
        predictions[word_id] = int(token_predictions[position])
    return predictions

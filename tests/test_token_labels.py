"""Word-piece label alignment, truncation counting, word predictions and the entity-F1 metric."""

from __future__ import annotations

import pytest
import torch
from seqeval.metrics import f1_score

from trimflow.data.token_labels import (
    IGNORE_INDEX,
    TruncationCount,
    align_labels,
    inside_tag_ids,
    tokenize_words,
    word_predictions,
)
from trimflow.models.entity_metric import EntityF1

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
ID = {name: index for index, name in enumerate(LABELS)}
ZERO_WIDTH = "\u200b"  # the BERT tokenizer drops it: a word with no sub-token
X = IGNORE_INDEX


def tag_ids(*tags: str) -> list[int]:
    """The label ids of tag strings."""
    return [ID[tag] for tag in tags]


def test_inside_tag_ids_maps_begin_to_inside_and_keeps_unpaired_tags():
    labels = ["O", "B-PER", "I-PER", "B-MISC"]
    assert inside_tag_ids(labels) == [0, 2, 2, 3]


@pytest.mark.parametrize(
    ("label_all_tokens", "expected"),
    [
        (False, [X, ID["B-PER"], X, X, ID["O"], ID["B-MISC"], X, X]),
        (True, [X, ID["B-PER"], ID["I-PER"], ID["I-PER"], ID["O"], ID["B-MISC"], ID["I-MISC"], X]),
    ],
)
def test_alignment_of_multi_piece_words(packaged_tokenizer, label_all_tokens, expected):
    # [CLS] @ paul ##walk loves token ##ization [SEP]
    columns, count = tokenize_words(
        [["@paulwalk", "loves", "tokenization"]],
        [tag_ids("B-PER", "O", "B-MISC")],
        packaged_tokenizer,
        max_length=32,
        label_names=LABELS,
        label_all_tokens=label_all_tokens,
    )
    assert columns["word_ids"] == [[-1, 0, 0, 0, 1, 2, 2, -1]]
    assert columns["labels"] == [expected]
    assert count == TruncationCount()


def test_alignment_of_single_piece_entity(packaged_tokenizer):
    encoded = packaged_tokenizer(["Empire", "State", "Building", "rocks"], is_split_into_words=True)
    word_tags = tag_ids("B-LOC", "I-LOC", "I-LOC", "O")
    labels = align_labels(encoded.word_ids(), word_tags, True, inside_tag_ids(LABELS))
    assert labels == [X, *word_tags, X]


def test_begin_tag_without_inside_tag_repeats_on_later_pieces():
    labels = ["O", "B-MISC"]
    aligned = align_labels([None, 0, 0, 1, None], [1, 0], True, inside_tag_ids(labels))
    assert aligned == [X, 1, 1, 0, X]


def tokenize_batch(tokenizer, max_length):
    """A long sentence with a zero-width word, one that fits, one exactly 6 tokens long."""
    long_words = ["John", "tokenization", "New", "York", ZERO_WIDTH, "rocks"]
    long_tags = tag_ids("B-PER", "O", "B-LOC", "I-LOC", "O", "O")
    fitting_words = ["Empire", "State"]
    fitting_tags = tag_ids("B-LOC", "I-LOC")
    # exactly max_length=6 tokens; the trailing zero-width word lies beyond the last kept word
    edge_words = ["John", "New", "York", "rocks", ZERO_WIDTH]
    edge_tags = tag_ids("B-PER", "B-LOC", "I-LOC", "O", "B-MISC")
    return tokenize_words(
        [long_words, fitting_words, edge_words],
        [long_tags, fitting_tags, edge_tags],
        tokenizer,
        max_length=max_length,
        label_names=LABELS,
        label_all_tokens=False,
    )


def test_truncation_counts_cut_words_and_straddling_entity(packaged_tokenizer):
    # long sentence: [CLS] john token ##ization new | york rocks [SEP]; cut York and rocks
    columns, count = tokenize_batch(packaged_tokenizer, max_length=6)
    assert count == TruncationCount(examples=1, words=2, entities=1)
    assert columns["word_ids"][0] == [-1, 0, 1, 1, 2, -1]
    assert columns["labels"][0] == [X, ID["B-PER"], ID["O"], X, ID["B-LOC"], X]
    assert columns["length"] == [6, 4, 6]
    assert columns["num_words"] == [6, 2, 5]
    assert set(columns) >= {"input_ids", "attention_mask", "token_type_ids"}
    assert [len(ids) for ids in columns["input_ids"]] == columns["length"]


def test_partly_kept_word_is_not_cut(packaged_tokenizer):
    # long sentence: [CLS] john token | ##ization new york rocks [SEP]
    # edge sentence: [CLS] john new | york rocks [SEP]
    _, count = tokenize_batch(packaged_tokenizer, max_length=4)
    assert count == TruncationCount(examples=2, words=3 + 2, entities=1 + 1)


def test_nothing_counted_when_everything_fits(packaged_tokenizer):
    _, count = tokenize_batch(packaged_tokenizer, max_length=64)
    assert count == TruncationCount()


def test_truncation_counts_add_up():
    total = TruncationCount(examples=1, words=2, entities=3)
    total.add(TruncationCount(examples=4, words=5, entities=6))
    assert total == TruncationCount(examples=5, words=7, entities=9)


def test_word_predictions_take_first_piece_and_fill_missing_words():
    word_ids = [-1, 0, 1, 1, 2, -1]
    padded_predictions = [6, 1, 0, 4, 3, 6, 6, 6]
    fill = ID["O"]
    predicted = word_predictions(padded_predictions, word_ids, num_words=6, fill=fill)
    assert predicted == [1, 0, 3, fill, fill, fill]


def test_word_predictions_round_trip_labels(packaged_tokenizer):
    columns, _ = tokenize_batch(packaged_tokenizer, max_length=6)
    recovered = [
        word_predictions(labels, word_ids, num_words, fill=ID["O"])
        for labels, word_ids, num_words in zip(
            columns["labels"], columns["word_ids"], columns["num_words"], strict=True
        )
    ]
    assert recovered == [
        tag_ids("B-PER", "O", "B-LOC", "O", "O", "O"),
        tag_ids("B-LOC", "I-LOC"),
        tag_ids("B-PER", "B-LOC", "I-LOC", "O", "O"),
    ]


GOLD_PRED_BATCHES = [
    [
        (["B-PER", "I-PER", "O", "B-LOC"], ["B-PER", "I-PER", "O", "B-LOC"]),
        (["O", "O", "O"], ["O", "I-MISC", "O"]),
    ],
    [
        (["B-LOC", "I-LOC", "O", "B-MISC"], ["B-LOC", "O", "O", "B-MISC"]),
        (["B-PER", "O"], ["I-PER", "I-PER"]),
        (["O", "B-MISC", "I-MISC", "O", "O"], ["O", "B-MISC", "I-MISC", "O", "B-LOC"]),
    ],
]


def to_tensors(pairs: list[tuple[list[str], list[str]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad like a real batch: an ignored special first, an ignored piece per word, padding."""
    width = 2 + 2 * max(len(gold) for gold, _ in pairs) + 1
    preds = torch.full((len(pairs), width), ID["B-LOC"])  # spurious entities if not masked
    target = torch.full((len(pairs), width), IGNORE_INDEX)
    for row, (gold, pred) in enumerate(pairs):
        positions = torch.arange(len(gold)) * 2 + 1
        target[row, positions] = torch.tensor(tag_ids(*gold))
        preds[row, positions] = torch.tensor(tag_ids(*pred))
    return preds, target


def test_entity_f1_matches_seqeval():
    metric = EntityF1(LABELS)
    for pairs in GOLD_PRED_BATCHES:
        metric.update(*to_tensors(pairs))
    pairs = [pair for batch in GOLD_PRED_BATCHES for pair in batch]
    expected = f1_score([gold for gold, _ in pairs], [pred for _, pred in pairs])
    assert metric.compute().item() == pytest.approx(expected)
    assert (metric.correct.item(), metric.predicted.item(), metric.gold.item()) == (4, 8, 6)


def test_entity_f1_is_zero_without_entities_and_resets():
    metric = EntityF1(LABELS)
    metric.update(*to_tensors(GOLD_PRED_BATCHES[0]))
    assert metric.compute().item() > 0
    metric.reset()
    metric.update(*to_tensors([(["O", "O"], ["O", "O"])]))
    result = metric.compute()
    assert result.dtype == torch.float32
    assert result.item() == 0.0


def test_entity_f1_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ"):
        EntityF1(LABELS).update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4))

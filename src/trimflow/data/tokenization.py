"""Batched tokenization of prepared splits; no padding on disk, truncation counted.

Classification: one label per text, the tokens `model.truncation` keeps of a long one
(`trimflow.data.truncation`). NER: word lists with one tag each, labels aligned to word pieces
(`trimflow.data.token_labels`), the head of a long sentence kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from trimflow.data.token_labels import TruncationCount, tokenize_words
from trimflow.data.truncation import DEFAULT_TRUNCATION, truncate_texts

MAP_BATCH_SIZE = 1000


def tokenize_split(
    data: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    truncation: str = DEFAULT_TRUNCATION,
) -> tuple[datasets.Dataset, int]:
    """Tokenize the `text` column keeping `truncation`'s tokens of a long text; return the
    dataset and how many examples were truncated."""

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        kept = truncate_texts(tokenizer, batch["text"], max_length, truncation)
        encoded = dict(kept.inputs)
        encoded["labels"] = batch["label_id"]
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
        encoded["truncated"] = kept.truncated
        return encoded

    tokenized = _map_batches(data, encode)
    truncated = int(sum(tokenized["truncated"]))
    return tokenized.remove_columns("truncated"), truncated


def tokenize_tagged_split(
    data: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    label_names: list[str],
    label_all_tokens: bool,
) -> tuple[datasets.Dataset, TruncationCount]:
    """Tokenize the `tokens` word lists with aligned `tag_ids`; count what truncation cut."""
    cut = TruncationCount()

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        encoded, batch_cut = tokenize_words(
            batch["tokens"], batch["tag_ids"], tokenizer, max_length, label_names, label_all_tokens
        )
        cut.add(batch_cut)
        return encoded

    return _map_batches(data, encode), cut


def _map_batches(
    data: datasets.Dataset, encode: Callable[[dict[str, list[Any]]], dict[str, list[Any]]]
) -> datasets.Dataset:
    """`encode` over batches of `data`, replacing its columns (never from a stale cache)."""
    return data.map(
        encode,
        batched=True,
        batch_size=MAP_BATCH_SIZE,
        remove_columns=data.column_names,
        desc="tokenize",
        load_from_cache_file=False,
    )

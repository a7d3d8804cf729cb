"""Batched tokenization of prepared splits; no padding on disk, truncation counted."""

from __future__ import annotations

from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

MAP_BATCH_SIZE = 1000


def tokenize_split(
    data: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[datasets.Dataset, int]:
    """Tokenize the `text` column; return the dataset and how many examples were truncated."""

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        encoded = tokenizer(batch["text"], truncation=True, max_length=max_length)
        encoded["labels"] = batch["label_id"]
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
        encoded["truncated"] = [bool(e.overflowing) for e in encoded.encodings]
        return dict(encoded)

    tokenized = data.map(
        encode,
        batched=True,
        batch_size=MAP_BATCH_SIZE,
        remove_columns=data.column_names,
        desc="tokenize",
        load_from_cache_file=False,
    )
    truncated = int(sum(tokenized["truncated"]))
    return tokenized.remove_columns("truncated"), truncated

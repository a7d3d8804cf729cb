"""Which tokens of a long text a classifier reads (`model.truncation`), one function for both
the tokenize stage and the served model, so that they keep exactly the same tokens.

Texts are tokenized in one batched call without special tokens and without truncation; each
piece list longer than the budget (`max_length` less the tokenizer's special tokens) is cut:
`head` keeps its first pieces, `tail` its last, `head_tail` a quarter of the budget from the
head and the rest from the tail (Sun et al., 2019: 128 + 382 of 510). The special tokens are
then put around the kept pieces as the tokenizer's post-processor puts them around a whole text
(`[CLS] ... [SEP]`, `<s> ... </s>`), with its segment ids. `head` gives exactly what the
tokenizer's own `truncation=True` gives.

The mode travels with the data and the models: the tokenize stage records it in the label map
of data/tokenized, which every model directory carries (`recorded_truncation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from tokenizers import Encoding
from transformers import PreTrainedTokenizerBase

from trimflow.config.schema import Truncation
from trimflow.layout import read_label_map

TRUNCATIONS: tuple[str, ...] = get_args(Truncation)
DEFAULT_TRUNCATION = "head"
# The label map key that records the mode (a label map without it: `head`).
LABEL_MAP_KEY = "truncation"
# A text whose pieces locate the special tokens the post-processor adds around a text.
_PROBE = "a"


def head_tail_split(budget: int) -> tuple[int, int]:
    """(head, tail) pieces `head_tail` keeps of `budget`: a quarter, rounded half up, from the
    head; the rest from the tail (510 -> 128 + 382, as Sun et al., 2019)."""
    head = (budget + 2) // 4
    return head, budget - head


def keep_pieces(pieces: Sequence[int], budget: int, truncation: str) -> list[int]:
    """The pieces (ids, no special tokens) of one text that `truncation` keeps within `budget`."""
    pieces = list(pieces)
    if len(pieces) <= budget:
        return pieces
    if truncation == "head":
        return pieces[:budget]
    if truncation == "tail":
        return pieces[len(pieces) - budget :]
    if truncation == "head_tail":
        head, tail = head_tail_split(budget)
        return pieces[:head] + pieces[len(pieces) - tail :]
    raise ValueError(f"model.truncation: '{truncation}' is not one of {', '.join(TRUNCATIONS)}")


@dataclass(frozen=True)
class SpecialTokens:
    """What the tokenizer's post-processor puts around one text: the special tokens before and
    after it and their segment ids, and the segment id of the text's own pieces."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    prefix_types: tuple[int, ...]
    suffix_types: tuple[int, ...]
    text_type: int

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase) -> SpecialTokens:
        """Read them off the tokenizer: a probe text encoded with and without special tokens."""
        plain = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
        full = tokenizer(_PROBE, return_token_type_ids=True)
        ids, types = full["input_ids"], full["token_type_ids"]
        starts = [
            start
            for start in range(len(ids) - len(plain) + 1)
            if ids[start : start + len(plain)] == plain
        ]
        if not plain or not starts:
            raise ValueError(
                f"{type(tokenizer).__name__}: cannot tell its special tokens from a text's pieces"
            )
        start, end = starts[0], starts[0] + len(plain)
        return cls(
            prefix=tuple(ids[:start]),
            suffix=tuple(ids[end:]),
            prefix_types=tuple(types[:start]),
            suffix_types=tuple(types[end:]),
            text_type=types[start],
        )

    @property
    def count(self) -> int:
        """How many special tokens a text gets."""
        return len(self.prefix) + len(self.suffix)


@dataclass
class TruncatedTexts:
    """Texts tokenized for the model, one row each.

    inputs: the model inputs the tokenizer itself returns (`input_ids`, and `token_type_ids`,
        `attention_mask` where its `model_input_names` have them), special tokens included,
        unpadded.
    truncated: whether the text had more pieces than fit, so some were cut.
    encodings: each text's whole encoding (every piece, no special tokens), for piece counts.
    """

    inputs: dict[str, list[list[int]]]
    truncated: list[bool]
    encodings: list[Encoding]


def truncate_texts(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_length: int,
    truncation: str = DEFAULT_TRUNCATION,
) -> TruncatedTexts:
    """Tokenize `texts` (one batched call of a fast tokenizer) keeping at most `max_length`
    tokens each, special tokens included, chosen by `truncation` (see the module docstring)."""
    if truncation not in TRUNCATIONS:
        raise ValueError(f"model.truncation: '{truncation}' is not one of {', '.join(TRUNCATIONS)}")
    special = SpecialTokens.of(tokenizer)
    budget = max_length - special.count
    if budget < 1:
        raise ValueError(
            f"model.max_length={max_length} leaves no room beside {special.count} special tokens"
        )
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)
    names = tokenizer.model_input_names
    inputs: dict[str, list[list[int]]] = {"input_ids": []}
    if "token_type_ids" in names:
        inputs["token_type_ids"] = []
    if "attention_mask" in names:
        inputs["attention_mask"] = []
    truncated = []
    for pieces in encoded["input_ids"]:
        kept = keep_pieces(pieces, budget, truncation)
        truncated.append(len(kept) < len(pieces))
        inputs["input_ids"].append([*special.prefix, *kept, *special.suffix])
        if "token_type_ids" in inputs:
            inputs["token_type_ids"].append(
                [*special.prefix_types, *[special.text_type] * len(kept), *special.suffix_types]
            )
        if "attention_mask" in inputs:
            inputs["attention_mask"].append([1] * (len(kept) + special.count))
    return TruncatedTexts(inputs, truncated, encoded.encodings)


def recorded_truncation(directory: str | Path) -> str:
    """The truncation the data or model in `directory` was tokenized with, from its label map;
    `head` where none is recorded (directories made before `model.truncation` existed)."""
    return read_label_map(directory).get(LABEL_MAP_KEY, DEFAULT_TRUNCATION)

"""NER data for the prepare stage: read, check and split tagged sentences into tables.

Sentences come from the dataset source (`data/sources.py`): CoNLL-style files
(`dataset.format: conll`, also `package://` files) or Hugging Face datasets whose
`dataset.text_column` holds token lists and `dataset.label_column` tag lists (class ids are
mapped to their names). Missing validation/test splits are cut from train with the seed so that
every entity type appears in every split.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from trimflow.config.schema import DatasetConfig, NerTask
from trimflow.data.card import length_stats
from trimflow.data.conll import (
    Sentence,
    check_tags,
    entity_types,
    missing_types,
    split_fractions,
    stratified_split,
    tag_labels,
)
from trimflow.data.errors import DataError
from trimflow.data.sources import load_tagged_splits

log = logging.getLogger(__name__)


def split_tagged(
    raw: Mapping[str, list[Sentence]], cfg: DatasetConfig, seed: int
) -> dict[str, list[Sentence]]:
    """Train, validation and test sentences; missing splits are cut from train, subsamples
    taken, each keeping every entity type where the counts allow."""
    train = raw["train"]
    held_out = {
        split: fraction
        for split, fraction in (
            ("validation", cfg.validation_fraction),
            ("test", cfg.test_fraction),
        )
        if split not in raw
    }
    if held_out:
        if sum(held_out.values()) >= 1.0:
            raise DataError("dataset.validation_fraction + dataset.test_fraction must stay below 1")
        parts = split_fractions(train, {"train": 1.0 - sum(held_out.values()), **held_out}, seed)
    else:
        parts = {"train": train}
    splits = {
        "train": parts["train"],
        **{s: parts.get(s, raw.get(s)) for s in ("validation", "test")},
    }
    splits["train"] = _subsample(splits["train"], cfg.max_train_samples, seed)
    splits["test"] = _subsample(splits["test"], cfg.max_test_samples, seed)
    for split, sentences in splits.items():
        if not sentences:
            raise DataError(
                f"the {split} split is empty: {len(train)} sentences are too few for "
                "dataset.validation_fraction / dataset.test_fraction / dataset.max_*_samples"
            )
    for split, types in missing_types(splits).items():
        log.warning("%s split has no %s entity (too few sentences to spread them)", split, types)
    return splits


def _subsample(sentences: list[Sentence], limit: int | None, seed: int) -> list[Sentence]:
    if limit is None or limit >= len(sentences):
        return sentences
    return stratified_split(sentences, {"kept": limit, "rest": len(sentences) - limit}, seed)[
        "kept"
    ]


def check_types_known(splits: Mapping[str, Sequence[Sentence]]) -> None:
    """Fail if validation or test holds entity types never seen in train."""
    known = set(entity_types(tag for s in splits["train"] for tag in s.tags))
    for split in ("validation", "test"):
        for sentence in splits[split]:
            for index, tag in enumerate(sentence.tags):
                if tag != "O" and tag[2:] not in known:
                    raise DataError(
                        f"{sentence.where(index)}: {split} entity type '{tag[2:]}' is missing "
                        "from train (the model could not predict it)"
                    )


def sentence_table(sentences: Sequence[Sentence], label_ids: Mapping[str, int]) -> pd.DataFrame:
    """The prepared table: tokens, tags, their ids, and the joined text (for leakage checks)."""
    return pd.DataFrame(
        {
            "tokens": [list(s.tokens) for s in sentences],
            "tags": [list(s.tags) for s in sentences],
            "tag_ids": [[label_ids[tag] for tag in s.tags] for s in sentences],
            "text": [" ".join(s.tokens) for s in sentences],
        }
    )


def entity_counts(sentences: Sequence[Sentence]) -> dict[str, int]:
    """Entities per type (B- tags), sorted by type."""
    counts = Counter(tag[2:] for s in sentences for tag in s.tags if tag.startswith("B-"))
    return dict(sorted(counts.items()))


def ner_card(splits: Mapping[str, Sequence[Sentence]], repaired: int) -> dict[str, Any]:
    """Per split: sentences, entities per type and sentence lengths in words."""
    return {
        "repaired_iob_tags": repaired,
        "splits": {
            split: {
                "rows": len(sentences),
                "entities": entity_counts(sentences),
                "words": length_stats(pd.Series([" ".join(s.tokens) for s in sentences])),
            }
            for split, sentences in splits.items()
        },
    }


def prepare_tagged(
    cfg: DatasetConfig, task: NerTask, seed: int
) -> tuple[dict[str, pd.DataFrame], list[str], dict[str, Any]]:
    """Prepared NER tables per split, the tag labels, and the card's NER section."""
    raw = load_tagged_splits(cfg)
    repaired = 0
    for split, sentences in raw.items():
        checked = check_tags(sentences, repair=task.repair_iob)
        raw[split], repaired = checked.sentences, repaired + checked.repaired
    if repaired:
        log.warning("rewrote %d I- tags that started an entity as B- (task.repair_iob)", repaired)
    splits = split_tagged(raw, cfg, seed)
    check_types_known(splits)
    labels = tag_labels(entity_types(tag for s in splits["train"] for tag in s.tags))
    label_ids = {label: i for i, label in enumerate(labels)}
    tables = {split: sentence_table(sentences, label_ids) for split, sentences in splits.items()}
    return tables, labels, ner_card(splits, repaired)

"""prepare: raw dataset -> validated, split parquet files, label map and data card."""

from __future__ import annotations

import logging

import pandas as pd

from trimflow.config.schema import TrimflowConfig
from trimflow.data.card import build_card, label_summary
from trimflow.data.ner import prepare_tagged
from trimflow.data.sources import extra_columns, load_raw_splits
from trimflow.data.splits import split_validation, subsample
from trimflow.data.validation import check_labels_known, check_rows, shared_texts
from trimflow.layout import LABEL_MAP_FILE, Layout
from trimflow.tracking.runs import DATA_PREFIX, Tracker
from trimflow.utils.atomic import atomic_dir, write_json
from trimflow.utils.hashing import digest_json

log = logging.getLogger(__name__)
CARD_FILE = "card.json"
# The columns that define a prepared dataset (its digest), per task.
CONTENT_COLUMNS = {"classification": ["text", "label"], "ner": ["tokens", "tags"]}


def run(cfg: TrimflowConfig, layout: Layout) -> None:
    """Prepare the dataset for the task.

    Load the raw splits, check them and split off the validation and test sets the source
    lacks; write the parquet splits, the label map (with the dataset digest) and the data card;
    log the row counts and the card.
    """
    data_cfg = cfg.dataset
    if cfg.task.type == "ner":
        tables, labels, summary = prepare_tagged(data_cfg, cfg.task, cfg.seed)
    else:
        tables, labels, summary = _prepare_labelled(cfg)
    shared = shared_texts(tables["train"], tables["test"])
    if shared:
        log.warning("%d texts appear in both train and test (listed in %s)", len(shared), CARD_FILE)
    content = CONTENT_COLUMNS[cfg.task.type]
    digest = digest_json({split: table[content].to_dict("list") for split, table in tables.items()})
    card = build_card(data_cfg.name, summary, labels, shared, digest)

    tracker = Tracker(cfg)
    with tracker.stage_run("prepare", dataset_digest=digest), atomic_dir(layout.prepared) as out:
        for split, table in tables.items():
            table.to_parquet(out / f"{split}.parquet", index=False)
        write_json(
            out / LABEL_MAP_FILE,
            {"labels": labels, "dataset": data_cfg.name, "dataset_digest": digest},
        )
        write_json(out / CARD_FILE, card)
        tracker.log_metrics(
            {f"{split}_rows": len(table) for split, table in tables.items()}
            | {"train_test_shared_texts": len(shared)},
            DATA_PREFIX,
        )
        tracker.log_dict(card, CARD_FILE)
    log.info(
        "prepared %s: %s", data_cfg.name, ", ".join(f"{s}={len(t)}" for s, t in tables.items())
    )


def _prepare_labelled(cfg: TrimflowConfig) -> tuple[dict[str, pd.DataFrame], list[str], dict]:
    """Classification tables (text, label, label_id and the source's extra columns) per split,
    the labels, the card summary."""
    data_cfg = cfg.dataset
    raw = load_raw_splits(data_cfg)
    for frame in raw.values():
        check_rows(frame)
    for split in ("test", "validation"):
        if split in raw:
            check_labels_known(raw["train"], raw[split], split)

    train = raw["train"]
    if "test" in raw:
        test = raw["test"]
    else:
        train, test = split_validation(train, data_cfg.test_fraction, cfg.seed)
    train = subsample(train, data_cfg.max_train_samples, cfg.seed)
    test = subsample(test, data_cfg.max_test_samples, cfg.seed)
    if "validation" in raw:
        validation = raw["validation"]
    else:
        train, validation = split_validation(train, data_cfg.validation_fraction, cfg.seed)
    splits = {"train": train, "validation": validation, "test": test}

    labels = sorted(train["label"].unique())
    label_ids = {label: i for i, label in enumerate(labels)}
    tables = {
        split: pd.DataFrame(
            {
                "text": frame["text"].to_numpy(),
                "label": frame["label"].to_numpy(),
                "label_id": frame["label"].map(label_ids).to_numpy(),
                **{column: frame[column].to_numpy() for column in extra_columns(frame)},
            }
        )
        for split, frame in splits.items()
    }
    return tables, labels, label_summary(splits, labels)

"""prepare: raw dataset -> validated, split parquet files, label map and data card."""

from __future__ import annotations

import logging

import pandas as pd

from trimflow.config.schema import TrimflowConfig
from trimflow.data.card import build_card
from trimflow.data.sources import load_raw_splits
from trimflow.data.splits import split_validation, subsample
from trimflow.data.validation import check_labels_known, check_rows, shared_texts
from trimflow.layout import Layout
from trimflow.models.loading import LABEL_MAP_FILE
from trimflow.tracking.runs import Tracker
from trimflow.utils.atomic import atomic_dir, write_json
from trimflow.utils.hashing import digest_json

log = logging.getLogger(__name__)
SPLITS = ("train", "validation", "test")
CARD_FILE = "card.json"


def run(cfg: TrimflowConfig, layout: Layout) -> None:
    data_cfg = cfg.dataset
    raw = load_raw_splits(data_cfg)
    for frame in raw.values():
        check_rows(frame)
    for split in ("test", "validation"):
        if split in raw:
            check_labels_known(raw["train"], raw[split], split)

    train = subsample(raw["train"], data_cfg.max_train_samples, cfg.seed)
    test = subsample(raw["test"], data_cfg.max_test_samples, cfg.seed)
    if "validation" in raw:
        validation = raw["validation"]
    else:
        train, validation = split_validation(train, data_cfg.validation_fraction, cfg.seed)
    splits = {"train": train, "validation": validation, "test": test}

    labels = sorted(train["label"].unique())
    label_ids = {label: i for i, label in enumerate(labels)}
    shared = shared_texts(train, test)
    if shared:
        log.warning("%d texts appear in both train and test (listed in %s)", len(shared), CARD_FILE)
    digest = digest_json({s: f[["text", "label"]].to_dict("list") for s, f in splits.items()})
    card = build_card(data_cfg.name, splits, labels, shared, digest)

    with (
        Tracker(cfg).stage_run("prepare", dataset_digest=digest) as active,
        atomic_dir(layout.prepared) as out,
    ):
        for split, frame in splits.items():
            table = pd.DataFrame(
                {
                    "text": frame["text"].to_numpy(),
                    "label": frame["label"].to_numpy(),
                    "label_id": frame["label"].map(label_ids).to_numpy(),
                }
            )
            table.to_parquet(out / f"{split}.parquet", index=False)
        write_json(
            out / LABEL_MAP_FILE,
            {"labels": labels, "dataset": data_cfg.name, "dataset_digest": digest},
        )
        write_json(out / CARD_FILE, card)
        if active is not None:
            import mlflow

            mlflow.log_metrics(
                {f"data/{split}_rows": len(f) for split, f in splits.items()}
                | {"data/train_test_shared_texts": len(shared)}
            )
            mlflow.log_dict(card, CARD_FILE)
    log.info(
        "prepared %s: %s", data_cfg.name, ", ".join(f"{s}={len(f)}" for s, f in splits.items())
    )

"""tokenize: prepared splits -> Arrow datasets of token ids (no padding), truncation counted."""

from __future__ import annotations

import logging
import shutil

import datasets
import pandas as pd

from trimflow.config.schema import TrimflowConfig
from trimflow.data.tokenization import tokenize_split
from trimflow.layout import TOKENIZED_SPLITS, TOKENIZER, Layout
from trimflow.models.loading import LABEL_MAP_FILE, load_tokenizer, read_label_map
from trimflow.stages.prepare import SPLITS
from trimflow.tracking.runs import Tracker
from trimflow.utils.atomic import atomic_dir, write_json

log = logging.getLogger(__name__)
STATS_FILE = "tokenization.json"


def run(cfg: TrimflowConfig, layout: Layout) -> None:
    tokenizer = load_tokenizer(cfg.model.name)
    tokenized, stats = {}, {}
    for split in SPLITS:
        frame = pd.read_parquet(layout.prepared / f"{split}.parquet")
        data = datasets.Dataset.from_pandas(frame, preserve_index=False)
        tokenized[split], truncated = tokenize_split(data, tokenizer, cfg.model.max_length)
        lengths = tokenized[split]["length"]
        stats[split] = {
            "examples": len(data),
            "truncated": truncated,
            "truncated_fraction": round(truncated / max(len(data), 1), 4),
            "mean_tokens": round(sum(lengths) / max(len(lengths), 1), 1),
        }
        log.info(
            "%s: %d examples, %d truncated at %d tokens",
            split,
            len(data),
            truncated,
            cfg.model.max_length,
        )

    with (
        Tracker(cfg).stage_run(
            "tokenize", read_label_map(layout.prepared)["dataset_digest"]
        ) as active,
        atomic_dir(layout.tokenized) as out,
    ):
        datasets.DatasetDict(tokenized).save_to_disk(str(out / TOKENIZED_SPLITS))
        tokenizer.save_pretrained(out / TOKENIZER)
        shutil.copy(layout.prepared / LABEL_MAP_FILE, out / LABEL_MAP_FILE)
        write_json(out / STATS_FILE, {"max_length": cfg.model.max_length, "splits": stats})
        if active is not None:
            import mlflow

            mlflow.log_metrics({f"data/{s}_truncated": v["truncated"] for s, v in stats.items()})

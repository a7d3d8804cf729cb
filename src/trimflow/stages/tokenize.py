"""tokenize: prepared splits -> Arrow datasets of token ids (no padding), truncation counted."""

from __future__ import annotations

import logging

import datasets
import pandas as pd

from trimflow.config.schema import TrimflowConfig
from trimflow.data.tokenization import tokenize_split, tokenize_tagged_split
from trimflow.data.truncation import LABEL_MAP_KEY
from trimflow.layout import (
    LABEL_MAP_FILE,
    SPLITS,
    TOKENIZED_SPLITS,
    TOKENIZER,
    Layout,
    read_label_map,
)
from trimflow.models.loading import load_task_tokenizer
from trimflow.tracking.runs import DATA_PREFIX, Tracker
from trimflow.utils.atomic import atomic_dir, write_json

log = logging.getLogger(__name__)
STATS_FILE = "tokenization.json"


def run(cfg: TrimflowConfig, layout: Layout) -> None:
    """Tokenize every prepared split (no padding) and count what truncation cut; write the Arrow
    splits, the tokenizer, the label map (with `model.truncation`, which every model directory
    carries on, so the served model truncates as training did) and tokenization.json; log the
    truncation counts."""
    tokenizer = load_task_tokenizer(cfg.model.name, cfg.task.type)
    label_map = read_label_map(layout.prepared)
    labels = label_map["labels"]
    tokenized, stats = {}, {}
    for split in SPLITS:
        frame = pd.read_parquet(layout.prepared / f"{split}.parquet")
        tokenized[split], stats[split] = _tokenize_table(cfg, frame, tokenizer, labels)
        log.info(
            "%s: %s (max_length %d, truncation %s)",
            split,
            ", ".join(f"{key} {value}" for key, value in stats[split].items()),
            cfg.model.max_length,
            cfg.model.truncation,
        )
        if stats[split].get("entities_cut"):
            log.warning(
                "%s: truncation at %d tokens cut %d entities (counted as missed in evaluate)",
                split,
                cfg.model.max_length,
                stats[split]["entities_cut"],
            )

    tracker = Tracker(cfg)
    with (
        tracker.stage_run("tokenize", label_map["dataset_digest"]),
        atomic_dir(layout.tokenized) as out,
    ):
        datasets.DatasetDict(tokenized).save_to_disk(str(out / TOKENIZED_SPLITS))
        tokenizer.save_pretrained(out / TOKENIZER)
        write_json(out / LABEL_MAP_FILE, {**label_map, LABEL_MAP_KEY: cfg.model.truncation})
        write_json(
            out / STATS_FILE,
            {
                "max_length": cfg.model.max_length,
                "truncation": cfg.model.truncation,
                "splits": stats,
            },
        )
        tracker.log_metrics(
            {
                f"{split}_{key}": value
                for split, counts in stats.items()
                for key, value in counts.items()
                if key in ("truncated", "entities_cut")
            },
            DATA_PREFIX,
        )


def _tokenize_table(
    cfg: TrimflowConfig, frame: pd.DataFrame, tokenizer, labels: list[str]
) -> tuple[datasets.Dataset, dict]:
    """One tokenized split and what truncation cut from it (texts; words and entities for NER)."""
    data = datasets.Dataset.from_pandas(frame, preserve_index=False)
    if cfg.task.type == "ner":
        tokenized, cut = tokenize_tagged_split(
            data.select_columns(["tokens", "tag_ids"]),
            tokenizer,
            cfg.model.max_length,
            labels,
            cfg.task.label_all_tokens,
        )
        truncated = {
            "truncated": cut.examples,
            "words_cut": cut.words,
            "entities_cut": cut.entities,
        }
    else:
        tokenized, count = tokenize_split(
            data, tokenizer, cfg.model.max_length, cfg.model.truncation
        )
        truncated = {"truncated": count}
    lengths = tokenized["length"]
    return tokenized, {
        "examples": len(data),
        **truncated,
        "truncated_fraction": round(truncated["truncated"] / max(len(data), 1), 4),
        "mean_tokens": round(sum(lengths) / max(len(lengths), 1), 1),
    }

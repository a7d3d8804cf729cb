"""The cost to train a variant: the figures its training stage wrote next to it, and the size of
its peft adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trimflow.evaluation.footprint import size_on_disk_mb
from trimflow.layout import ADAPTER_DIR, TRAINING_FILE
from trimflow.utils.atomic import read_json

# metrics.json field -> the training.json field it comes from (see models.recipe); the trained
# module's total parameters are counted at train start, before any structured pruning.
TRAINING_FIELDS = {
    "trainable_params": "trainable_params",
    "train_total_params": "total_params",
    "train_s": "train_s",
    "train_samples_per_s": "train_samples_per_s",
    "peak_train_mem_mb": "peak_train_mem_mb",
    "train_tokens_per_s": "train_tokens_per_s",
    "train_mfu": "train_mfu",
}


def training_cost(model_dir: Path) -> dict[str, Any]:
    """The cost to train the variant in `model_dir`: its training.json figures (`TRAINING_FIELDS`),
    None each where
    it has none (not trained, e.g. magnitude pruning without recovery, or written before a
    figure was recorded), and `adapter_mb`, the MiB of its adapter folder or None.

    A quantized variant's directory holds a copy of its source's training.json, not its
    adapter folder: it carries the cost to train what it quantizes, and no adapter.
    """
    summary_file = model_dir / TRAINING_FILE
    summary = read_json(summary_file) if summary_file.exists() else {}
    adapter = model_dir / ADAPTER_DIR
    return {
        **{field: summary.get(key) for field, key in TRAINING_FIELDS.items()},
        "adapter_mb": size_on_disk_mb(adapter) if adapter.is_dir() else None,
    }

"""Load base models and tokenizers (hub id, local dir or package://) and save variants."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from trimflow.assets import resolve
from trimflow.utils.atomic import read_json, write_json

LABEL_MAP_FILE = "label_map.json"
# Files holding a variant's weights; everything else in its directory is shared metadata.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".onnx")
log = logging.getLogger(__name__)


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The fast tokenizer of `name` (hub id, local directory or package:// URI)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve(name))
    if not tokenizer.is_fast:
        raise ValueError(f"model.name={name}: trimflow needs a fast tokenizer")
    return tokenizer


def load_base_classifier(name: str, labels: list[str]) -> PreTrainedModel:
    """A pretrained encoder with a fresh classification head for `labels`."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" report is expected
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            resolve(name),
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )
    finally:
        hf_logging.set_verbosity(verbosity)


def save_model_dir(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, label_map: dict, out_dir: Path
) -> None:
    """Write a save_pretrained directory (safetensors, tokenizer, label map) into `out_dir`."""
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    write_json(out_dir / LABEL_MAP_FILE, label_map)


def read_label_map(directory: str | Path) -> dict:
    """The label map that travels with data and models: labels, dataset name and digest."""
    return read_json(Path(directory) / LABEL_MAP_FILE)


def copy_metadata(source_dir: Path, out_dir: Path) -> None:
    """Copy a variant directory's config, tokenizer and label map (everything but weights)."""
    for item in Path(source_dir).iterdir():
        if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(item, Path(out_dir) / item.name)

"""Load base models and tokenizers (hub id, local dir or package://) and save variants."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from trimflow.assets import resolve
from trimflow.layout import ADAPTATION_FILE, LABEL_MAP_FILE
from trimflow.utils.atomic import write_json

# Files holding a variant's weights; everything else in its directory is shared metadata.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".onnx")
log = logging.getLogger(__name__)


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The fast tokenizer of `name` (hub id, local directory or package:// URI)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve(name))
    if not tokenizer.is_fast:
        raise ValueError(f"model.name={name}: trimflow needs a fast tokenizer")
    return tokenizer


# The Auto class of each task: one label per text, or one label per token.
TASK_MODELS = {
    "classification": AutoModelForSequenceClassification,
    "ner": AutoModelForTokenClassification,
}


TOKEN_HEAD_SUFFIX = "ForTokenClassification"


def is_token_classifier(model: PreTrainedModel) -> bool:
    """Whether `model` labels every token (NER) rather than the whole text."""
    return type(model).__name__.endswith(TOKEN_HEAD_SUFFIX)


def auto_model_class(config: PreTrainedConfig) -> type:
    """The Auto class that rebuilds a saved classifier, from the architecture it was saved as."""
    saved_as_token = any(name.endswith(TOKEN_HEAD_SUFFIX) for name in config.architectures or ())
    return TASK_MODELS["ner" if saved_as_token else "classification"]


def load_classifier(path: str | Path) -> PreTrainedModel:
    """A saved (unpruned) sequence or token classifier, in eval mode."""
    return auto_model_class(AutoConfig.from_pretrained(path)).from_pretrained(path).eval()


def load_base_classifier(
    name: str, labels: list[str], task: str = "classification"
) -> PreTrainedModel:
    """A pretrained encoder with a fresh head for `labels`: per text, or per token for NER.

    In fp32 whatever the checkpoint's dtype (hub models often ship bf16 or fp16 weights): these
    are the master weights training updates; mixed precision is the trainer's business.
    """
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" report is expected
    try:
        return TASK_MODELS[task].from_pretrained(
            resolve(name),
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            dtype=torch.float32,
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


def copy_metadata(source_dir: Path, out_dir: Path) -> None:
    """Copy a variant directory's config, tokenizer, label map and training record: everything
    but weights and an adapted variant's record (what is built from it is no adapter)."""
    for item in Path(source_dir).iterdir():
        if (
            item.is_file()
            and not item.name.endswith(WEIGHT_SUFFIXES)
            and item.name != ADAPTATION_FILE
        ):
            shutil.copy2(item, Path(out_dir) / item.name)

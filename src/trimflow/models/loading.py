"""Load base models and tokenizers (hub id, local dir or package://) and save variants."""

from __future__ import annotations

import inspect
import json
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
from trimflow.models.families import ENCODER_FAMILIES
from trimflow.utils.atomic import write_json

# Files holding a variant's weights; everything else in its directory is shared metadata. An
# OpenVINO IR's graph (.xml, ~0.3 MB for MiniLM) counts with its weights (.bin), as an ONNX
# file's graph does.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".onnx", ".xml")
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


SEGMENT_INPUT = "token_type_ids"


def takes_token_type_ids(config: PreTrainedConfig) -> bool:
    """Whether a model of `config` reads segment ids: its family's row, else whether its
    classifier's forward names them (RoBERTa's accepts them, but has no segments to read)."""
    family = ENCODER_FAMILIES.get(config.model_type)
    if family is not None:
        return family.token_type_ids
    model_class = auto_model_class(config)._model_mapping[type(config)]
    return SEGMENT_INPUT in inspect.signature(model_class.forward).parameters


def load_task_tokenizer(name: str, task: str = "classification") -> PreTrainedTokenizerBase:
    """The tokenizer of model `name` as its `task` model reads it; what it saves loads the same.

    It yields no `token_type_ids` where the model takes none (whatever the tokenizer's own
    `model_input_names` say), so neither do the tokenized data, batches, ONNX graphs and served
    requests built from it. For NER it reads pre-split words: a byte-level BPE pre-tokenizer
    (RoBERTa, ModernBERT) gets `add_prefix_space`, or it would read every word as the start of
    a text ("prices", not " prices" as within a sentence).
    """
    tokenizer = load_tokenizer(name)
    if not takes_token_type_ids(AutoConfig.from_pretrained(resolve(name))):
        names = [key for key in tokenizer.model_input_names if key != SEGMENT_INPUT]
        _persist(tokenizer, "model_input_names", names)
    if task == "ner":
        byte_level = _byte_level_steps(tokenizer.backend_tokenizer.pre_tokenizer)
        for step in byte_level:
            step.add_prefix_space = True
        if byte_level:
            _persist(tokenizer, "add_prefix_space", True)
    return tokenizer


def _persist(tokenizer: PreTrainedTokenizerBase, key: str, value) -> None:
    """Set a tokenizer attribute and its init argument, which `save_pretrained` writes."""
    setattr(tokenizer, key, value)
    tokenizer.init_kwargs[key] = value


def _byte_level_steps(pre_tokenizer) -> list:
    """The ByteLevel steps of a backend pre-tokenizer: itself, or those of its Sequence."""
    if pre_tokenizer is None:
        return []
    state = json.loads(pre_tokenizer.__getstate__())
    if state["type"] == "Sequence":
        return [
            step
            for index in range(len(state["pretokenizers"]))
            for step in _byte_level_steps(pre_tokenizer[index])
        ]
    return [pre_tokenizer] if state["type"] == "ByteLevel" else []


def load_base_classifier(
    name: str, labels: list[str], task: str = "classification"
) -> PreTrainedModel:
    """A pretrained encoder with a fresh head for `labels`: per text, or per token for NER.

    A checkpoint whose head was trained for another number of labels (a 2-label sentiment model
    fine-tuned on 8 labels) gets that head re-initialised, as `ignore_mismatched_sizes` does,
    with a warning naming it and its old and new sizes. In fp32 whatever the checkpoint's dtype
    (hub models often ship bf16 or fp16 weights): these are the master weights training
    updates; mixed precision is the trainer's business.
    """
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" report is expected
    try:
        model, loading = TASK_MODELS[task].from_pretrained(
            resolve(name),
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            dtype=torch.float32,
            ignore_mismatched_sizes=True,
            output_loading_info=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    if loading["mismatched_keys"]:
        replaced = sorted(loading["mismatched_keys"])
        log.warning(
            "model.name=%s: its head is for another number of labels; re-initialised %s for %d"
            " labels (%s)",
            name,
            ", ".join(sorted({key.rsplit(".", 1)[0] for key, _, _ in replaced})),
            len(labels),
            ", ".join(f"{key} {list(old)} -> {list(new)}" for key, old, new in replaced),
        )
    return model


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

"""An MLflow pyfunc serving any saved variant: texts in, labels or entity spans out.

The logged model holds the variant directory as its artifact (HF, pruned, sparse, torch int8 or
ONNX: `load_variant` reads them all) and `model_config` with `max_chars` (longest accepted text),
`max_length` (tokens; longer texts are truncated and flagged `"truncated": true`) and
`truncation` (which tokens of a longer text are kept: the mode the variant was trained with, from
its label map; `trimflow.data.truncation` tokenizes for it as the tokenize stage did) and
`temperature` (scores are the softmax of logits / temperature: evaluate fits it on the validation
split, so that a score of 0.9 is right 90% of the time).
"""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, infer_signature
from mlflow.models.model import ModelInfo
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema
from seqeval.metrics.sequence_labeling import get_entities
from tokenizers import Encoding
from torch import Tensor
from transformers import AutoConfig, BatchEncoding, PreTrainedTokenizerBase

from trimflow.compress.variants import load_variant, variant_runtime
from trimflow.data.token_labels import word_predictions
from trimflow.data.truncation import DEFAULT_TRUNCATION, recorded_truncation, truncate_texts
from trimflow.layout import read_label_map
from trimflow.models.loading import (
    TASK_MODELS,
    auto_model_class,
    load_task_tokenizer,
    load_tokenizer,
)

VARIANT_ARTIFACT = "variant"
MODEL_CODE = Path(__file__).with_name("model_code.py")
DEFAULT_MAX_CHARS = 10_000
BATCH_SIZE = 32
OUTSIDE = "O"
WORD = re.compile(r"\S+")  # words as the training data splits them: on whitespace
INPUT_EXAMPLE = ["Oil prices rose in Paris after the OPEC meeting."]
# What the model imports at load time; trimflow itself must be installed where it is served.
RUNTIME_PACKAGES = (
    "mlflow",
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "onnx",
    "onnxruntime",
    "seqeval",
    "pandas",
    "peft",  # a prefix-tuned variant runs as base model + adapter
)
# What a variant of a runtime imports besides (openvino pulls openvino-telemetry, unused).
RUNTIME_EXTRAS = {"openvino": ("openvino",)}
OUTPUT_EXAMPLES = {
    "classification": [{"label": "earn", "score": 0.9, "truncated": False}],
    "ner": [
        {
            "entities": [{"type": "loc", "text": "Paris", "start": 19, "end": 24, "score": 0.9}],
            "truncated": False,
        }
    ],
}


def invalid_input(message: str) -> MlflowException:
    """An input error; the scoring server answers it with HTTP 400."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def is_token_task(variant_dir: str | Path) -> bool:
    """Whether the variant labels words (NER) rather than whole texts, from its config.json."""
    return auto_model_class(AutoConfig.from_pretrained(variant_dir)) is TASK_MODELS["ner"]


def default_max_length(variant_dir: str | Path, tokenizer: PreTrainedTokenizerBase) -> int:
    """The longest input the model takes: its position embeddings or the tokenizer's limit."""
    positions = AutoConfig.from_pretrained(variant_dir).max_position_embeddings
    return min(positions, tokenizer.model_max_length)


def input_texts(model_input: Any) -> list:
    """The texts of a list, array, Series, or a DataFrame's `text` (or only) column."""
    if isinstance(model_input, pd.DataFrame):
        if "text" in model_input.columns:
            return model_input["text"].tolist()
        if len(model_input.columns) == 1:
            return model_input.iloc[:, 0].tolist()
        raise invalid_input(
            f"expected a 'text' column or a single column, got {list(model_input.columns)}"
        )
    if isinstance(model_input, list | tuple | np.ndarray | pd.Series):
        return list(model_input)
    raise invalid_input(f"expected a list of texts, got {type(model_input).__name__}")


def text_problem(text: Any, max_chars: int) -> str | None:
    """What makes `text` unfit to predict (missing, not a string, empty, longer than
    `max_chars`), as `is ...`/`has ...`; None when it is fit."""
    if text is None or (pd.api.types.is_scalar(text) and pd.isna(text)):
        return "is missing (null)"
    if not isinstance(text, str):
        return f"is a {type(text).__name__}, not a string"
    if not text.strip():
        return "is empty"
    if len(text) > max_chars:
        return f"has {len(text)} characters, more than max_chars={max_chars}"
    return None


def validate_texts(texts: list, max_chars: int) -> list[str]:
    """The texts as str; raises naming the first missing, non-string, empty or too long item."""
    if not texts:
        raise invalid_input("no texts to predict: the input list is empty")
    for index, text in enumerate(texts):
        problem = text_problem(text, max_chars)
        if problem is not None:
            raise invalid_input(f"input[{index}] {problem}")
    return [str(text) for text in texts]


def text_entities(
    text: str, words: list[re.Match], probabilities: Tensor, word_ids: list, labels: list[str]
) -> list[dict]:
    """Entity spans of one text from its token probabilities, tagged at each word's first piece.

    Words cut off by truncation have no piece and are tagged outside.
    """
    first_pieces = word_predictions(range(len(word_ids)), word_ids, len(words), fill=-1)
    best, best_ids = probabilities.max(dim=-1)
    tags = [labels[best_ids[piece]] if piece >= 0 else OUTSIDE for piece in first_pieces]
    scores = [float(best[piece]) if piece >= 0 else 0.0 for piece in first_pieces]
    entities = []
    for kind, first, last in get_entities(tags):
        start, end = words[first].start(), words[last].end()
        entities.append(
            {
                "type": kind,
                "text": text[start:end],
                "start": start,
                "end": end,
                "score": float(np.mean(scores[first : last + 1])),
            }
        )
    return entities


def piece_counts(encoding: Encoding, unknown_id: int | None) -> dict[str, int]:
    """`{"pieces", "unknown_pieces"}` of one text: its word pieces, those truncation cut off
    included (special tokens and padding not), and how many are the tokenizer's unknown token."""
    ids = [
        piece
        for part in (encoding, *encoding.overflowing)
        for piece, word in zip(part.ids, part.word_ids, strict=True)
        if word is not None
    ]
    return {"pieces": len(ids), "unknown_pieces": ids.count(unknown_id)}


class VariantModel(mlflow.pyfunc.PythonModel):
    """A variant directory behind MLflow's pyfunc API (see the module docstring)."""

    def load_context(self, context) -> None:
        """Load the variant, its tokenizer and labels from the logged artifact."""
        self.load(
            context.artifacts[VARIANT_ARTIFACT],
            max_chars=int(context.model_config["max_chars"]),
            max_length=int(context.model_config["max_length"]),
            truncation=context.model_config.get("truncation"),
            temperature=float(context.model_config.get("temperature", 1.0)),
        )

    def load(
        self,
        variant_dir: str | Path,
        max_chars: int = DEFAULT_MAX_CHARS,
        max_length: int | None = None,
        truncation: str | None = None,
        temperature: float = 1.0,
        model=None,
    ) -> VariantModel:
        """Load a variant directory itself (`trimflow serve --variant`); `max_length` defaults
        to the model's limit, `truncation` to the one it was trained with (`head` if its label
        map records none); scores are the softmax of the logits divided by `temperature` (the
        one evaluate fitted: see evaluation/calibration.py). `model`: the variant already
        loaded from `variant_dir`. Returns this model."""
        variant_dir = Path(variant_dir)
        if temperature <= 0:
            raise ValueError(f"{variant_dir}: temperature {temperature} is not positive")
        if model is None:
            model = load_variant(variant_dir, num_threads=torch.get_num_threads())
        self.model = model
        self.temperature = temperature
        self.token_task = is_token_task(variant_dir)
        self.tokenizer = load_task_tokenizer(
            str(variant_dir), "ner" if self.token_task else "classification"
        )
        self.labels = read_label_map(variant_dir)["labels"]
        self.max_chars = max_chars
        self.max_length = (
            default_max_length(variant_dir, self.tokenizer) if max_length is None else max_length
        )
        self.truncation = recorded_truncation(variant_dir) if truncation is None else truncation
        if self.token_task and self.truncation != DEFAULT_TRUNCATION:
            raise ValueError(
                f"{variant_dir}: truncation '{self.truncation}' is for classification; NER keeps "
                "the head of each sentence"
            )
        return self

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[dict]:
        """Per text `{"label", "score", "truncated"}`, or `{"entities", "truncated"}` for NER.

        `model_input`: a DataFrame with a `text` column (or one column), which is what MLflow's
        signature check makes of a list of texts; a list is accepted too. (A DataFrame hint
        leaves validation to the signature, as `{"dataframe_split": ...}` requests need.)
        """
        return self.predict_texts(validate_texts(input_texts(model_input), self.max_chars))

    def predict_texts(self, texts: list[str], batch_size: int = BATCH_SIZE) -> list[dict]:
        """`predict`'s rows for texts `validate_texts` accepted, `batch_size` per forward pass."""
        return self._predict(texts, batch_size)[0]

    def predict_with_pieces(
        self, texts: list[str], batch_size: int = BATCH_SIZE
    ) -> tuple[list[dict], list[dict[str, int]]]:
        """`predict_texts`' rows, and per text its word pieces and unknown ones (`piece_counts`)
        from the same tokenization."""
        rows, encodings = self._predict(texts, batch_size)
        unknown_id = self.tokenizer.unk_token_id
        return rows, [piece_counts(encoding, unknown_id) for encoding in encodings]

    def _predict(self, texts: list[str], batch_size: int) -> tuple[list[dict], list[Encoding]]:
        """The rows of `texts` and each text's encoding, `batch_size` per forward pass."""
        predict_batch = self._entities if self.token_task else self._labels
        rows, encodings = [], []
        for start in range(0, len(texts), batch_size):
            batch_rows, batch_encodings = predict_batch(texts[start : start + batch_size])
            rows += batch_rows
            encodings += batch_encodings
        return rows, encodings

    def _probabilities(self, encoded: BatchEncoding) -> Tensor:
        """The softmax over labels of one padded batch, at the model's temperature."""
        with torch.inference_mode():
            logits = self.model(**encoded).logits
        return (logits.float() / self.temperature).softmax(dim=-1)

    def _labels(self, texts: list[str]) -> tuple[list[dict], list[Encoding]]:
        """Rows of one batch of texts, tokenized as the tokenize stage did (`truncate_texts`),
        and each text's whole encoding."""
        kept = truncate_texts(self.tokenizer, texts, self.max_length, self.truncation)
        probabilities = self._probabilities(self.tokenizer.pad(kept.inputs, return_tensors="pt"))
        scores, label_ids = probabilities.max(dim=-1)
        rows = [
            {"label": self.labels[label_id], "score": score, "truncated": truncated}
            for label_id, score, truncated in zip(
                label_ids.tolist(), scores.tolist(), kept.truncated, strict=True
            )
        ]
        return rows, kept.encodings

    def _entities(self, texts: list[str]) -> tuple[list[dict], list[Encoding]]:
        """Rows of one batch of texts, their words tokenized as the tokenize stage did (the
        head kept), and each text's encoding (what truncation cut in its overflow)."""
        words = [list(WORD.finditer(text)) for text in texts]
        encoded = self.tokenizer(
            [[match.group() for match in matches] for matches in words],
            is_split_into_words=True,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        probabilities = self._probabilities(encoded)
        rows = [
            {
                "entities": text_entities(
                    text, words[row], probabilities[row], encoded.word_ids(row), self.labels
                ),
                "truncated": bool(encoded.encodings[row].overflowing),
            }
            for row, text in enumerate(texts)
        ]
        return rows, encoded.encodings


def signature(token_task: bool) -> ModelSignature:
    """Input: one unnamed string column (a list of texts); output: the task's records."""
    inferred = infer_signature(
        INPUT_EXAMPLE, OUTPUT_EXAMPLES["ner" if token_task else "classification"]
    )
    return ModelSignature(Schema([ColSpec("string")]), inferred.outputs)


def runtime_requirements(variant_dir: str | Path | None = None) -> list[str]:
    """The packages the model imports (those of `variant_dir`'s runtime included), pinned to
    the versions installed here."""
    extras = RUNTIME_EXTRAS.get(variant_runtime(variant_dir), ()) if variant_dir else ()
    return [f"{package}=={version(package)}" for package in (*RUNTIME_PACKAGES, *extras)]


def log_variant_model(
    variant_dir: str | Path,
    artifact_path: str = "model",
    registered_model_name: str | None = None,
    max_chars: int = DEFAULT_MAX_CHARS,
    max_length: int | None = None,
    temperature: float = 1.0,
) -> ModelInfo:
    """Log `variant_dir` as a pyfunc model (in the active run); `max_length` defaults to the
    model's limit; the truncation is the one the variant was trained with; `temperature`
    divides its logits before the softmax (evaluate's temperature scaling)."""
    variant_dir = Path(variant_dir)
    if max_length is None:
        max_length = default_max_length(variant_dir, load_tokenizer(str(variant_dir)))
    return mlflow.pyfunc.log_model(
        name=artifact_path,
        python_model=str(MODEL_CODE),
        artifacts={VARIANT_ARTIFACT: str(variant_dir)},
        signature=signature(is_token_task(variant_dir)),
        input_example=INPUT_EXAMPLE,
        pip_requirements=runtime_requirements(variant_dir),
        model_config={
            "max_chars": max_chars,
            "max_length": max_length,
            "truncation": recorded_truncation(variant_dir),
            "temperature": temperature,
        },
        registered_model_name=registered_model_name,
    )

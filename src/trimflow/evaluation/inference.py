"""Batched arg-max prediction with a sequence or token classifier."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor, nn


def model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The batch without its `labels`, ready to be passed as model keyword arguments."""
    return {key: value for key, value in batch.items() if key != "labels"}


def predict(model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> np.ndarray:
    """Arg-max label ids for every example in `batches`, in order (sequence classifiers)."""
    predictions = []
    with torch.inference_mode():
        for batch in batches:
            predictions.append(model(**model_inputs(batch)).logits.argmax(dim=-1))
    if not predictions:
        return np.empty(0, dtype=np.int64)
    return torch.cat(predictions).numpy()


def predict_tokens(model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> list[np.ndarray]:
    """Arg-max label ids of every token of every example, padding removed (token classifiers)."""
    predictions = []
    with torch.inference_mode():
        for batch in batches:
            best = model(**model_inputs(batch)).logits.argmax(dim=-1)
            lengths = batch["attention_mask"].sum(dim=-1).tolist()
            predictions += [row[:length].numpy() for row, length in zip(best, lengths, strict=True)]
    return predictions

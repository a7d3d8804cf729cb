"""Batched prediction on the device the model lives on: logits of a sequence classifier, of every
token of a token classifier."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn


def input_device(model) -> torch.device:
    """Where `model` takes its inputs: its first parameter's device (the CPU for an ONNX
    Runtime session, which copies its inputs itself, or a model without parameters)."""
    if isinstance(model, nn.Module):
        for parameter in model.parameters():
            return parameter.device
    return torch.device("cpu")


def model_inputs(
    batch: dict[str, Tensor], device: torch.device | str | None = None
) -> dict[str, Tensor]:
    """The batch without its `labels`, on `device` if given, ready to be passed as model
    keyword arguments."""
    return {
        key: value if device is None else value.to(device, non_blocking=True)
        for key, value in batch.items()
        if key != "labels"
    }


def predict_logits(model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> np.ndarray:
    """The float32 logits of every example in `batches`, in order (sequence classifiers)."""
    device = input_device(model)
    logits = []
    with torch.inference_mode():
        for batch in batches:
            logits.append(model(**model_inputs(batch, device)).logits.float().cpu())
    if not logits:
        return np.empty((0, 0), dtype=np.float32)
    return torch.cat(logits).numpy()


def predict_token_logits(
    model: nn.Module, batches: Iterable[dict[str, Tensor]]
) -> list[np.ndarray]:
    """The float32 logits of every token of every example, padding removed (token classifiers):
    one (tokens, labels) array per example."""
    device = input_device(model)
    logits = []
    with torch.inference_mode():
        for batch in batches:
            scores = model(**model_inputs(batch, device)).logits.float().cpu()
            lengths = batch["attention_mask"].sum(dim=-1).tolist()
            logits += [row[:length].numpy() for row, length in zip(scores, lengths, strict=True)]
    return logits


def token_logits_in_rows(
    model: nn.Module, batches: Iterable[dict[str, Tensor]], order: Sequence[int]
) -> list[np.ndarray]:
    """`predict_token_logits` of length-sorted `batches`, put back in row order (`order[k]` is the
    row of the k-th example)."""
    in_rows: list[np.ndarray] = [np.empty(0)] * len(order)
    for row, logits in zip(order, predict_token_logits(model, batches), strict=True):
        in_rows[row] = logits
    return in_rows

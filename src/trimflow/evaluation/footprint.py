"""Model footprint: bytes on disk and (non-zero) parameter counts, fp32, half or quantized."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.ao.nn.quantized import Embedding as QuantizedEmbedding
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear


def size_on_disk_mb(path: str | Path) -> float:
    """Size of a file, or the recursive sum of a directory's file sizes, in MiB."""
    path = Path(path)
    files = [path] if path.is_file() else [item for item in path.rglob("*") if item.is_file()]
    return sum(item.stat().st_size for item in files) / 2**20


def _weight_tensors(model: nn.Module) -> Iterator[Tensor]:
    """Every parameter, plus the packed weights (and linear biases) of quantized modules."""
    yield from model.parameters()
    for module in model.modules():
        if isinstance(module, DynamicQuantizedLinear | QuantizedEmbedding):
            yield module.weight().dequantize()
        if isinstance(module, DynamicQuantizedLinear) and module.bias() is not None:
            yield module.bias()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, non-zero) parameter counts; quantized weights count like fp32 ones. An exported
    graph (ONNX Runtime, OpenVINO: no nn.Module) counts its own (`parameter_counts`).

    A magnitude-pruned model should be made permanent first, or `weight_orig` is counted.
    """
    if not isinstance(model, nn.Module):
        return model.parameter_counts()
    total = nonzero = 0
    with torch.no_grad():
        for tensor in _weight_tensors(model):
            total += tensor.numel()
            nonzero += int(torch.count_nonzero(tensor))
    return total, nonzero


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts: those that take gradients, and all of them."""
    parameters = list(model.parameters())
    return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)

"""Sparse storage for magnitude-pruned models: a bitmask plus the non-zero values per tensor.

Unstructured zeros do not speed up dense kernels, but they need not be stored: a float tensor
that is at least half zeros is written as its non-zero values and a packed bitmask (1 bit per
element), so an 80%-sparse fp32 tensor takes 0.2 * 4 + 1/8 bytes per element instead of 4.
The file is `model.sparse.safetensors`; loading rebuilds the dense model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

SPARSE_FILE = "model.sparse.safetensors"
MASK, VALUES = ".__mask", ".__values"
# Below this fraction of zeros the bitmask costs more than it saves; the tensor stays dense.
MIN_SPARSITY = 0.5


def _split(name: str, tensor: Tensor) -> dict[str, Tensor]:
    """`{name: tensor}`, or its packed mask and non-zero values when that is smaller."""
    tensor = tensor.detach().contiguous().cpu()
    nonzero = tensor != 0
    if not tensor.is_floating_point() or 1 - nonzero.float().mean() < MIN_SPARSITY:
        return {name: tensor}
    bits = np.packbits(nonzero.flatten().numpy())
    return {name + MASK: torch.from_numpy(bits), name + VALUES: tensor[nonzero]}


def save_sparse(state: dict[str, Tensor], path: str | Path) -> None:
    """Write a state dict in the bitmask format (shapes in the file's metadata)."""
    tensors: dict[str, Tensor] = {}
    for name, tensor in state.items():
        tensors.update(_split(name, tensor))
    shapes = {name: list(tensor.shape) for name, tensor in state.items()}
    save_file(tensors, str(path), metadata={"shapes": json.dumps(shapes)})


def load_sparse(path: str | Path) -> dict[str, Tensor]:
    """The dense state dict written by `save_sparse`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        shapes = json.loads(handle.metadata()["shapes"])
    stored = load_file(str(path))
    state = {}
    for name, shape in shapes.items():
        if name in stored:
            state[name] = stored[name]
            continue
        count = int(np.prod(shape))
        mask = np.unpackbits(stored[name + MASK].numpy(), count=count).astype(bool)
        values = stored[name + VALUES]
        dense = torch.zeros(count, dtype=values.dtype)
        dense[torch.from_numpy(mask)] = values
        state[name] = dense.reshape(shape)
    return state

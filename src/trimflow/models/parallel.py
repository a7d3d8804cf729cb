"""What the processes of data-parallel training share: RNG states, a verdict on their weights.

All collective: every process of the group calls them at the same point.
"""

from __future__ import annotations

import hashlib
import logging

import lightning as L
import torch
from torch import nn

log = logging.getLogger(__name__)


def world() -> tuple[int, int]:
    """(rank, number of processes) of the initialised process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gathered(value: object) -> list[object]:
    """`value` of every process, in rank order."""
    _, size = world()
    if size == 1:
        return [value]
    values: list[object] = [None] * size
    torch.distributed.all_gather_object(values, value)
    return values


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state (names, shapes, dtypes and bytes), in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def end_other_processes(trainer: L.Trainer, module: nn.Module) -> None:
    """After data-parallel training: check that every process holds the same weights, then end
    the processes of rank > 0 (exit 0), so that rank 0 alone saves and logs the result."""
    digests = gathered(weights_digest(module))
    if len(set(digests)) > 1:
        raise RuntimeError(f"data-parallel processes ended with different weights: {digests}")
    if not trainer.is_global_zero:
        raise SystemExit(0)
    log.info(
        "%d processes ended training with identical weights (sha256 %s)",
        trainer.world_size,
        digests[0][:12],
    )

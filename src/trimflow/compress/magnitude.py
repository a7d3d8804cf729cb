"""Global unstructured L1-magnitude pruning of the encoder's linear layers."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import prune
from transformers import PreTrainedModel


def prunable_linears(model: PreTrainedModel) -> list[tuple[nn.Module, str]]:
    """(module, "weight") for every nn.Linear in the encoder; embeddings and heads are excluded."""
    encoder = model.base_model.encoder
    return [(module, "weight") for module in encoder.modules() if isinstance(module, nn.Linear)]


def apply_global_magnitude(model: PreTrainedModel, sparsity: float) -> None:
    """Zero the `sparsity` fraction of smallest-magnitude encoder weights, ranked globally.

    The pruning masks stay attached (`weight_orig` * `weight_mask`) so that a recovery
    fine-tune keeps pruned weights at zero; call `make_permanent` before saving.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    prune.global_unstructured(
        prunable_linears(model), pruning_method=prune.L1Unstructured, amount=sparsity
    )


def make_permanent(model: PreTrainedModel) -> None:
    """Fold every pruning mask into its weight, leaving plain parameters."""
    for module, name in prunable_linears(model):
        if prune.is_pruned(module):
            prune.remove(module, name)


def _effective_weight(module: nn.Module, name: str) -> Tensor:
    """The weight the next forward will use (masks may be newer than the cached attribute)."""
    if hasattr(module, f"{name}_mask"):
        return getattr(module, f"{name}_orig") * getattr(module, f"{name}_mask")
    return getattr(module, name)


def sparsity(model: PreTrainedModel) -> float:
    """Fraction of exactly-zero weights among the prunable encoder linears."""
    with torch.no_grad():
        weights = [_effective_weight(module, name) for module, name in prunable_linears(model)]
        zeros = sum(int((weight == 0).sum()) for weight in weights)
    return zeros / sum(weight.numel() for weight in weights)

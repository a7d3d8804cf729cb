"""Global unstructured L1-magnitude pruning of the encoder layers' linears, one-shot or gradual.

Masks are `torch.nn.utils.prune` reparametrisations (`weight = weight_orig * weight_mask`,
recomputed by a forward pre-hook), so pruned weights stay zero through a recovery fine-tune;
`make_permanent` folds them into plain parameters before saving. The word-embedding matrix can
join the global ranking: it holds over half of a MiniLM's weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune
from transformers import PreTrainedModel

from trimflow.models.families import encoder_layers


def prunable_linears(model: PreTrainedModel) -> list[tuple[nn.Module, str]]:
    """(module, "weight") for every nn.Linear in the encoder layers (by the model's family row);
    embeddings and task heads are excluded."""
    return [
        (module, "weight")
        for layer in encoder_layers(model)
        for module in layer.modules()
        if isinstance(module, nn.Linear)
    ]


def prunable_weights(
    model: PreTrainedModel, include_embeddings: bool = False
) -> list[tuple[nn.Module, str]]:
    """The encoder linears' weights, plus the word-embedding matrix if asked."""
    targets = prunable_linears(model)
    if include_embeddings:
        targets.append((model.get_input_embeddings(), "weight"))
    return targets


def _smallest(scores: Tensor, k: int) -> Tensor:
    """A boolean mask of exactly `k` smallest entries of a flat tensor (ties by position)."""
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = scores.kthvalue(k).values
    chosen = scores < threshold
    ties = (scores == threshold).nonzero().flatten()
    chosen[ties[: k - int(chosen.sum())]] = True
    return chosen


class MagnitudePruner:
    """Global L1 pruning whose target grows with progress.

    At progress p the globally smallest `p * sparsity` of the targeted weights are masked.
    Masked weights count as zero, so masks only grow; they are `weight_mask` buffers updated in
    place, hence saved with the model in checkpoints.
    """

    def __init__(
        self, model: PreTrainedModel, sparsity: float, include_embeddings: bool = False
    ) -> None:
        if not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
        self.sparsity = sparsity
        self.targets = prunable_weights(model, include_embeddings)
        for module, name in self.targets:
            if not hasattr(module, f"{name}_mask"):
                prune.identity(module, name)
        self.progress = 0.0

    @torch.no_grad()
    def set_progress(self, progress: float) -> None:
        """Mask the smallest `progress * sparsity` of all targeted weights (progress in [0, 1])."""
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress must be in [0, 1], got {progress}")
        masks = [getattr(module, f"{name}_mask") for module, name in self.targets]
        scores = torch.cat(
            [
                torch.where(mask.bool(), getattr(module, f"{name}_orig").abs(), -1.0).flatten()
                for (module, name), mask in zip(self.targets, masks, strict=True)
            ]
        )
        pruned = _smallest(scores, round(progress * self.sparsity * scores.numel()))
        drops = pruned.split([mask.numel() for mask in masks])
        for (module, name), mask, drop in zip(self.targets, masks, drops, strict=True):
            mask.masked_fill_(drop.view_as(mask), 0.0)
            setattr(module, name, getattr(module, f"{name}_orig") * mask)  # until the next forward
        self.progress = progress

    def finalize(self, model: PreTrainedModel) -> None:
        """Fold the masks into plain (sparse) weights."""
        make_permanent(model)

    def state_dict(self) -> dict[str, Any]:
        """The progress (the masks are buffers, saved with the model)."""
        return {"progress": self.progress}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from the saved progress."""
        self.set_progress(state["progress"])


def make_permanent(model: PreTrainedModel) -> None:
    """Fold every pruning mask (encoder linears and word embeddings) into its weight."""
    for module, name in prunable_weights(model, include_embeddings=True):
        if prune.is_pruned(module):
            prune.remove(module, name)


def _effective_weight(module: nn.Module, name: str) -> Tensor:
    """The weight the next forward will use (masks may be newer than the cached attribute)."""
    if hasattr(module, f"{name}_mask"):
        return getattr(module, f"{name}_orig") * getattr(module, f"{name}_mask")
    return getattr(module, name)


def sparsity(model: PreTrainedModel, include_embeddings: bool = False) -> float:
    """Fraction of exactly-zero weights among the prunable encoder linears (and embeddings)."""
    with torch.no_grad():
        weights = [
            _effective_weight(module, name)
            for module, name in prunable_weights(model, include_embeddings)
        ]
        zeros = sum(int((weight == 0).sum()) for weight in weights)
    return zeros / sum(weight.numel() for weight in weights)

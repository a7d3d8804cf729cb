"""Entity-level F1 for token classification as a torchmetrics metric (DDP-safe counts)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torchmetrics
from seqeval.metrics.sequence_labeling import get_entities
from torch import Tensor

from trimflow.data.token_labels import IGNORE_INDEX


class EntityF1(torchmetrics.Metric):
    """Micro entity-level F1 over labelled positions.

    Entities come from seqeval's default (non-strict) extraction, so scores match
    `seqeval.metrics.f1_score`; the counts are summed across processes.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    correct: Tensor
    predicted: Tensor
    gold: Tensor

    def __init__(self, label_names: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.label_names = tuple(label_names)
        for name in ("correct", "predicted", "gold"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Count entities in `[batch, seq]` id tensors; `target` is IGNORE_INDEX if unlabelled."""
        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ")
        for pred_row, target_row in zip(preds.tolist(), target.tolist(), strict=True):
            labelled = [
                (p, t) for p, t in zip(pred_row, target_row, strict=True) if t != IGNORE_INDEX
            ]
            predicted = self.entities([p for p, _ in labelled])
            gold = self.entities([t for _, t in labelled])
            self.correct += len(predicted & gold)
            self.predicted += len(predicted)
            self.gold += len(gold)

    def entities(self, tag_ids: Sequence[int]) -> set[tuple[str, int, int]]:
        """The (type, start, end) entities of one sequence of tag ids."""
        return set(get_entities([self.label_names[tag_id] for tag_id in tag_ids]))

    def compute(self) -> Tensor:
        """F1 = 2 * correct / (predicted + gold); 0.0 when there are no entities at all."""
        return 2 * self.correct.float() / (self.predicted + self.gold).clamp_min(1).float()

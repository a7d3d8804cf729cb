"""Gradual pruning during a recovery fine-tune (Zhu & Gupta, 2017).

The pruned share follows a cubic ramp over a window of the training steps: fast at first, while
plenty of redundant units remain, then slower as the model has less slack to recover. After the
window the model fine-tunes at the final mask. Pruners expose their target as a progress in
[0, 1] (the share of their final pruning), so one schedule drives every kind of pruner.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import lightning as L
from lightning.pytorch.callbacks import Callback
from transformers import PreTrainedModel


class Pruner(Protocol):
    """What `GradualPruning` drives: `StructuredPruner`, `MagnitudePruner`."""

    def set_progress(self, progress: float) -> None:
        """Apply the share `progress` in [0, 1] of the final pruning (masks only)."""

    def finalize(self, model: PreTrainedModel) -> None:
        """Make the current masks permanent and remove the masking machinery."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to mask the same units at the same progress."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned."""


def _check_window(start_fraction: float, end_fraction: float) -> None:
    if not 0.0 <= start_fraction <= end_fraction <= 1.0:
        raise ValueError(
            f"need 0 <= start_fraction <= end_fraction <= 1, got {start_fraction}, {end_fraction}"
        )


def cubic_schedule(
    step: int,
    total_steps: int,
    final: float,
    start_fraction: float = 0.0,
    end_fraction: float = 0.7,
) -> float:
    """Target at `step`: `final * (1 - (1 - t)^3)`, t the position of `step` in the window.

    The window spans `start_fraction` to `end_fraction` of `total_steps`: the target is 0 before
    it and `final` from its end on (an empty window is a one-shot step).
    """
    _check_window(start_fraction, end_fraction)
    start, end = start_fraction * total_steps, end_fraction * total_steps
    if step >= end:
        return final
    if step <= start:
        return 0.0
    return final * (1.0 - (1.0 - (step - start) / (end - start)) ** 3)


class GradualPruning(Callback):
    """Drives pruners along the cubic schedule, at the start of every training batch.

    The total comes from `trainer.estimated_stepping_batches` (optimizer steps). Progress is
    updated every `every_n_steps` steps (each magnitude update ranks every weight) and as soon
    as the window ends. The pruners' states go into checkpoints, so a resumed run continues
    with the same masks. Call each pruner's `finalize` after training.
    """

    def __init__(
        self,
        pruners: Sequence[Pruner],
        start_fraction: float = 0.0,
        end_fraction: float = 0.7,
        every_n_steps: int = 1,
    ) -> None:
        _check_window(start_fraction, end_fraction)
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}")
        self.pruners = list(pruners)
        self.start_fraction = start_fraction
        self.end_fraction = end_fraction
        self.every_n_steps = every_n_steps
        self.total_steps = 0
        self.progress = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Take the run's total optimizer steps, which the schedule spans."""
        total = trainer.estimated_stepping_batches
        if math.isinf(total):
            raise ValueError("gradual pruning needs a finite max_steps or max_epochs")
        self.total_steps = int(total)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Move the pruners along the schedule every `every_n_steps` steps, and at its end."""
        step = trainer.global_step
        progress = cubic_schedule(
            step, self.total_steps, 1.0, self.start_fraction, self.end_fraction
        )
        if progress != self.progress and (step % self.every_n_steps == 0 or progress == 1.0):
            self.set_progress(progress)

    def set_progress(self, progress: float) -> None:
        """Set every pruner's progress."""
        for pruner in self.pruners:
            pruner.set_progress(progress)
        self.progress = progress

    def state_dict(self) -> dict[str, Any]:
        """The progress and every pruner's state, for checkpoints."""
        return {"progress": self.progress, "pruners": [p.state_dict() for p in self.pruners]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the pruners and the progress from a checkpoint."""
        for pruner, state in zip(self.pruners, state_dict["pruners"], strict=True):
            pruner.load_state_dict(state)
        self.progress = state_dict["progress"]

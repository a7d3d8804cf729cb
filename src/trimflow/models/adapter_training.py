"""What training an adapter needs beyond the shared recipe: AdaLoRA's rank-budget schedule and
its orthogonality penalty."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from peft import PeftModel
from torch import Tensor

from trimflow.config.schema import AdaLoraAdapter

# The importance statistics of peft's RankAllocator, kept in checkpoints.
ALLOCATOR_STATE = ("ipt", "exp_avg_ipt", "exp_avg_unc")


def orthogonality_penalty(model: PeftModel) -> Tensor:
    """AdaLoRA's regulariser: the mean Frobenius distance of P·Pᵀ (and Qᵀ·Q) from the identity
    over the singular-vector matrices P = lora_A and Q = lora_B."""
    distances = []
    for name, matrix in model.named_parameters():
        if not matrix.requires_grad or not ("lora_A" in name or "lora_B" in name):
            continue
        gram = matrix @ matrix.T if "lora_A" in name else matrix.T @ matrix
        identity = torch.eye(*gram.shape, dtype=gram.dtype, device=gram.device)
        distances.append(torch.linalg.matrix_norm(gram - identity))
    return torch.stack(distances).mean()


class AdaLoraBudget(Callback):
    """Runs AdaLoRA's budget schedule: sets its step counts from the trainer's schedule, and
    after every optimizer step (gradients still present) updates the importance scores and
    masks the least important singular values. The allocator's statistics and the rank pattern
    are kept in checkpoints, so a resumed run allocates as an uninterrupted one would."""

    def __init__(self, model: PeftModel, spec: AdaLoraAdapter) -> None:
        self.model = model
        self.spec = spec
        self.pending: dict[str, Any] | None = None

    @property
    def _config(self):
        return self.model.peft_config[self.model.active_adapter]

    @property
    def _allocator(self):
        return self.model.base_model.rankallocator

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Scale `tinit`/`tfinal` to the run's optimizer steps; restore a checkpoint's state."""
        total = int(trainer.estimated_stepping_batches)
        self._config.total_step = total
        self._config.tinit = int(self.spec.tinit * total)
        self._config.tfinal = int(self.spec.tfinal * total)
        if self.pending is not None:
            for key in ALLOCATOR_STATE:
                setattr(self._allocator, key, self.pending[key])
            self._config.rank_pattern = self.pending["rank_pattern"]
            self.pending = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """After an optimizer step, allocate the rank budget for that step."""
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.model.base_model.update_and_allocate(trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        """The allocator's importance statistics and the rank pattern found so far."""
        state = {key: getattr(self._allocator, key) for key in ALLOCATOR_STATE}
        return {**state, "rank_pattern": self._config.rank_pattern}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Hold a checkpoint's state until training starts."""
        self.pending = state_dict


def enforce_final_budget(model: PeftModel) -> None:
    """Zero the singular values the final rank pattern drops (weights loaded back from a best
    checkpoint saved before the final allocation still hold them), so that the merged model
    and the saved adapter, cut to the pattern, compute the same."""
    config = model.peft_config[model.active_adapter]
    if config.rank_pattern:
        model.base_model.rankallocator.mask_using_rank_pattern(
            model.base_model.model, config.rank_pattern
        )

"""The one LightningModule every training stage reuses (finetune, pruning recovery)."""

from __future__ import annotations

import lightning as L
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from transformers import PreTrainedModel, get_linear_schedule_with_warmup

NO_DECAY = ("bias", "LayerNorm.weight", "LayerNorm.bias")


class SequenceClassifier(L.LightningModule):
    """Wraps an AutoModelForSequenceClassification: AdamW, linear warm-up and decay."""

    def __init__(
        self,
        model: PreTrainedModel,
        lr: float,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = model.train()  # from_pretrained returns eval mode: enable dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_ratio = warmup_ratio
        num_labels = model.config.num_labels
        self.val_accuracy = MulticlassAccuracy(num_labels, average="micro")
        self.val_macro_f1 = MulticlassF1Score(num_labels, average="macro")

    def forward(self, **batch: torch.Tensor):
        return self.model(**batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        output = self.model(**batch)
        predictions = output.logits.argmax(dim=-1)
        self.val_accuracy.update(predictions, batch["labels"])
        self.val_macro_f1.update(predictions, batch["labels"])
        size = batch["labels"].shape[0]
        self.log("val/loss", output.loss, batch_size=size, sync_dist=True)
        self.log("val/accuracy", self.val_accuracy, prog_bar=True, batch_size=size)
        self.log("val/macro_f1", self.val_macro_f1, batch_size=size)

    def configure_optimizers(self):
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        groups = [
            {
                "params": [p for n, p in named if not n.endswith(NO_DECAY)],
                "weight_decay": self.weight_decay,
            },
            {"params": [p for n, p in named if n.endswith(NO_DECAY)], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.lr)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = get_linear_schedule_with_warmup(
            optimizer, num_warmup_steps=int(self.warmup_ratio * total), num_training_steps=total
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

"""The one LightningModule every training stage reuses (finetune, pruning recovery, students)."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from transformers import PreTrainedModel, get_linear_schedule_with_warmup

from trimflow.config.schema import AdversarialConfig
from trimflow.data.token_labels import IGNORE_INDEX
from trimflow.models.adversarial import LossTerms, adversarial_terms
from trimflow.models.entity_metric import EntityF1
from trimflow.models.loading import is_token_classifier

NO_DECAY = ("bias", "LayerNorm.weight", "LayerNorm.bias")
# Metric logged on the progress bar, per head.
MAIN_METRIC = {False: "accuracy", True: "f1"}


def validation_metrics(model: PreTrainedModel) -> dict[str, Metric]:
    """`val/<name>` metrics of a model's head.

    Per text: accuracy and macro-F1. Per token (NER): micro entity F1 (seqeval's entity
    extraction) and the accuracy of labelled tokens.
    """
    num_labels = model.config.num_labels
    if is_token_classifier(model):
        labels = [model.config.id2label[i] for i in range(num_labels)]
        return {
            "f1": EntityF1(labels),
            "token_accuracy": MulticlassAccuracy(
                num_labels, average="micro", ignore_index=IGNORE_INDEX
            ),
        }
    return {
        "accuracy": MulticlassAccuracy(num_labels, average="micro"),
        "macro_f1": MulticlassF1Score(num_labels, average="macro"),
    }


def labelled_positions(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Logits [n, labels] and labels [n] of the scored positions.

    A sequence classifier scores every example; a token classifier only tokens whose label is
    not IGNORE_INDEX (padding, special tokens and, by default, later word pieces).
    """
    if logits.dim() == 2:
        return logits, labels
    keep = labels != IGNORE_INDEX
    return logits[keep], labels[keep]


def class_weights(counts: Tensor, balance: float) -> Tensor | None:
    """Loss weight of each class: its share of the training labels to the power -`balance`.

    0 weighs every label alike (None: plain cross-entropy), 0.5 is square-root balancing, 1
    makes every class weigh the same in total. Weights are scaled to average 1 over the training
    labels, so the loss keeps its scale; a class absent from training gets weight 1.
    """
    if balance == 0:
        return None
    counts = counts.double()
    present = counts > 0
    weights = torch.where(present, counts / counts.sum(), 1.0).pow(-balance)
    weights = weights * counts.sum() / (weights * counts).sum()
    return torch.where(present, weights, 1.0).float()


def cross_entropy(logits: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """Cross-entropy over the scored positions, each label weighted by `weights` if given."""
    scored, kept = labelled_positions(logits.float(), labels)
    return F.cross_entropy(scored, kept, weight=weights)


class ClassifierModule(L.LightningModule):
    """Wraps an AutoModelFor{Sequence,Token}Classification: AdamW, linear warm-up and decay.

    `class_weights` (see `class_weights`) weigh the training loss per label; validation loss
    stays unweighted. `regularizer`, if given, adds `regularizer_weight` times its value to the
    training loss (AdaLoRA's orthogonality penalty). `adversarial` (None: off) trains on
    perturbed embeddings too (models.adversarial), whatever loss a subclass's `loss_terms` has.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        lr: float,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.0,
        class_weights: Tensor | None = None,
        regularizer: Callable[[], Tensor] | None = None,
        regularizer_weight: float = 0.0,
        adversarial: AdversarialConfig | None = None,
    ) -> None:
        super().__init__()
        self.model = model.train()  # from_pretrained returns eval mode: enable dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_ratio = warmup_ratio
        self.register_buffer("class_weights", class_weights, persistent=False)
        self.regularizer = regularizer
        self.regularizer_weight = regularizer_weight
        self.adversarial = adversarial or AdversarialConfig()
        self.val_metrics = nn.ModuleDict(validation_metrics(model))
        self.main_metric = MAIN_METRIC[is_token_classifier(model)]

    def forward(self, **batch: torch.Tensor):
        """The wrapped model's output for a batch of model inputs."""
        return self.model(**batch)

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> LossTerms:
        """A training pass over `batch`: the (class-weighted) cross-entropy as `loss`."""
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        return lambda: {
            "loss": cross_entropy(self.model(**inputs).logits, batch["labels"], self.class_weights)
        }

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The loss of a batch (`loss_terms`, adversarial if configured), each term logged as
        train/<name>, plus the regularizer if any."""
        size = batch["labels"].shape[0]
        terms = adversarial_terms(self.model, self.adversarial, self.loss_terms(batch))
        for name, value in terms.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=size)
        loss = terms["loss"]
        if self.regularizer is None or not self.regularizer_weight:
            return loss
        penalty = self.regularizer()
        self.log("train/regularizer", penalty, batch_size=size)
        return loss + self.regularizer_weight * penalty

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Log val/loss and update the validation metrics with a batch."""
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        logits = self.model(**inputs).logits
        predictions = logits.argmax(dim=-1)
        size = batch["labels"].shape[0]
        # The task loss alone (a peft wrapper adds its regularisers to the model's own loss).
        self.log(
            "val/loss", cross_entropy(logits, batch["labels"]), batch_size=size, sync_dist=True
        )
        for name, metric in self.val_metrics.items():
            metric.update(predictions, batch["labels"])
            self.log(f"val/{name}", metric, prog_bar=name == self.main_metric, batch_size=size)

    def configure_optimizers(self):
        """AdamW (no decay on biases and LayerNorm) with linear warm-up and decay per step; its
        fused kernel on a GPU (one launch per step instead of several per tensor)."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        groups = [
            {
                "params": [p for n, p in named if not n.endswith(NO_DECAY)],
                "weight_decay": self.weight_decay,
            },
            {"params": [p for n, p in named if n.endswith(NO_DECAY)], "weight_decay": 0.0},
        ]
        fused = all(p.is_cuda for _, p in named)
        optimizer = torch.optim.AdamW(groups, lr=self.lr, fused=fused or None)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = get_linear_schedule_with_warmup(
            optimizer, num_warmup_steps=int(self.warmup_ratio * total), num_training_steps=total
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

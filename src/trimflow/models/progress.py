"""Training progress as plain log lines, where Lightning's bar is off or cannot draw."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import lightning as L
from lightning.pytorch.callbacks import Callback

from trimflow.utils.progress import PLAIN_EVERY_N_SECONDS, Pace


class PlainProgress(Callback):
    """Logs the plan when training starts; epoch, step, mean loss, rate and time left every
    `every_n_seconds`; the `monitor`ed metric after each validation; the step it ended at.

    Steps are optimizer steps. Reads the trainer's state only: what it trains is unchanged.
    """

    def __init__(
        self,
        log: logging.Logger,
        monitor: str | None = None,
        every_n_seconds: float = PLAIN_EVERY_N_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lines = log  # not `self.log`: Lightning sets that to the module's `log`
        self.monitor = monitor or "val/loss"
        self.every_n_seconds = every_n_seconds
        self.clock = clock
        self.pace: Pace | None = None
        self.loss_sum = 0.0
        self.batches = 0

    def _where(self, trainer: L.Trainer) -> str:
        return (
            f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} "
            f"step {trainer.global_step}/{trainer.estimated_stepping_batches}"
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log the plan: steps, epochs, device, precision, resume point."""
        self.pace = Pace(
            trainer.estimated_stepping_batches,
            self.every_n_seconds,
            trainer.global_step,
            self.clock,
        )
        resumed = f", resuming at step {trainer.global_step}" if trainer.global_step else ""
        self.lines.info(
            "training %s steps, max_epochs %d, on %s (%s)%s",
            trainer.estimated_stepping_batches,
            trainer.max_epochs,
            trainer.strategy.root_device,
            trainer.precision,
            resumed,
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Every `every_n_seconds`, log where training is and how fast it goes."""
        # Lightning hands over the loss divided by the accumulation; the sum stays on device.
        self.loss_sum += outputs["loss"].detach() * trainer.accumulate_grad_batches
        self.batches += 1
        if self.pace.due():
            loss = float(self.loss_sum) / self.batches
            self.loss_sum, self.batches = 0.0, 0
            self.lines.info(
                "%s loss %.3f, %s",
                self._where(trainer),
                loss,
                self.pace.status(trainer.global_step),
            )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log the monitored validation metric."""
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None:
            return
        self.lines.info("%s %s %.4f", self._where(trainer), self.monitor, float(value))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log the step training ended at and how long it took."""
        self.lines.info(
            "trained to step %d/%s in %s",
            trainer.global_step,
            trainer.estimated_stepping_batches,
            self.pace.elapsed(),
        )

"""Build Lightning Trainers from the `trainer` config and fit with resume and best-checkpoint."""

from __future__ import annotations

import csv
import logging
import random
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from trimflow.config.schema import TrainerConfig
from trimflow.evaluation.footprint import count_trainable
from trimflow.models.flops import device_peak_flops, non_embedding_counts, training_flops
from trimflow.models.parallel import end_other_processes, gathered, world
from trimflow.models.progress import PlainProgress
from trimflow.utils.device import enable_tf32, supports_bf16
from trimflow.utils.distributed import is_main_process
from trimflow.utils.interrupt import (
    StageInterrupted,
    deferred_signals,
    install_signal_handlers,
    received_signal,
)
from trimflow.utils.memory import PeakMemory
from trimflow.utils.progress import on_terminal

log = logging.getLogger(__name__)
LAST_CHECKPOINT = "last.ckpt"
BEST_CHECKPOINT = "best"


def trains_on_gpu(cfg: TrainerConfig) -> bool:
    """Whether the trainer will put the model on a CUDA device."""
    return cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def resolve_precision(cfg: TrainerConfig) -> str:
    """`trainer.precision`, or when it is null: bf16-mixed on GPUs that compute in bf16
    (Ampere and later), 16-mixed with a gradient scaler on older GPUs, 32-true on the CPU."""
    if cfg.precision:
        return cfg.precision
    if not trains_on_gpu(cfg):
        return "32-true"
    return "bf16-mixed" if supports_bf16() else "16-mixed"


class HistoryRecorder(Callback):
    """Keeps every logged train/val metric as (step, epoch, metric, value) rows.

    Its state is saved in checkpoints, so a resumed run keeps the curves it had.
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def _record(self, trainer: L.Trainer, prefix: str) -> None:
        for name, value in trainer.callback_metrics.items():
            if name.startswith(prefix):
                self.rows.append(
                    {
                        "step": trainer.global_step,
                        "epoch": trainer.current_epoch,
                        "metric": name,
                        "value": float(value),
                    }
                )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Record the train metrics every `log_every_n_steps` steps."""
        if trainer.global_step % trainer.log_every_n_steps == 0:
            self._record(trainer, "train/")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        """Record the validation metrics (not those of the sanity check)."""
        if not trainer.sanity_checking:
            self._record(trainer, "val/")

    def state_dict(self) -> dict[str, Any]:
        """The recorded rows, kept in checkpoints."""
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take back the rows of a checkpoint."""
        self.rows = list(state_dict["rows"])

    def write_csv(self, path: Path) -> None:
        """Write the rows as history.csv (step, epoch, metric, value)."""
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["step", "epoch", "metric", "value"])
            writer.writeheader()
            writer.writerows(self.rows)


class ExactResume(Callback):
    """Makes a resumed run train on what an uninterrupted one would have.

    Drives the position of the train loader's `SeededBatchSampler` (epoch, batches done) and
    keeps it in checkpoints, and saves the RNG states of every process in every checkpoint,
    restoring each process's at the first batch after a resume so that dropout draws the same
    masks. (The position is this callback's state, not the loader's: Lightning restores a
    stateful loader only if the loader was not set up before the checkpoint was read, and
    `estimated_stepping_batches` in `configure_optimizers` sets it up earlier.)
    """

    def __init__(self) -> None:
        self.sampler = None
        self.pending_position: dict[str, int] | None = None
        self.pending_rng: dict[str, Any] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Find the loader's sampler and move it to a resumed run's position."""
        sampler = getattr(trainer.train_dataloader, "batch_sampler", None)
        self.sampler = sampler if hasattr(sampler, "batch_done") else None
        if self.sampler is not None and self.pending_position is not None:
            self.sampler.load_state_dict(self.pending_position)
        self.pending_position = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Pick the epoch's batch order."""
        if self.sampler is not None:
            self.sampler.set_epoch(trainer.current_epoch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """Restore the RNG states of a resumed run at its first batch."""
        if self.pending_rng is not None:
            torch.set_rng_state(self.pending_rng["torch"])
            if "cuda" in self.pending_rng:
                torch.cuda.set_rng_state_all(self.pending_rng["cuda"])
            random.setstate(self.pending_rng["python"])
            self.pending_rng = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Count the batch as done."""
        if self.sampler is not None:
            self.sampler.batch_done()

    def state_dict(self) -> dict[str, Any]:
        """The sampler's position, kept in checkpoints."""
        return {"sampler": self.sampler.state_dict()} if self.sampler is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Hold a checkpoint's sampler position until training starts."""
        self.pending_position = state_dict.get("sampler")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        """Add every process's RNG states to the checkpoint."""
        # Every process builds the checkpoint (rank 0 writes it): gather their states.
        states = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["rng_states"] = gathered(states)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        """Hold this process's RNG states until the first resumed batch."""
        states = checkpoint.get("rng_states", [])
        rank, size = world()
        if len(states) != size:
            log.warning(
                "the checkpoint was saved by %d processes, this run has %d: the resumed"
                " run draws other dropout masks than an uninterrupted one",
                len(states),
                size,
            )
            return
        self.pending_rng = states[rank]


class StopOnSignal(Callback):
    """On SIGTERM/SIGINT, checkpoint at the next optimizer step and raise `StageInterrupted`.

    Takes the signals over from Lightning, whose own SIGTERM handling ends `fit` as if it
    had finished (a SystemExit with status 0) without a checkpoint. In data-parallel training
    the processes decide together at each optimizer step (a signal to any one stops them all
    at the same step), so that they all take part in saving the checkpoint.
    """

    def __init__(self, last_checkpoint: Path) -> None:
        self.last_checkpoint = last_checkpoint

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Take SIGTERM/SIGINT over from Lightning's handlers."""
        # Lightning put its handlers in place just before; it restores the previous ones
        # at teardown.
        install_signal_handlers()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """At an optimizer-step boundary, stop if a process was signalled."""
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.stop_if_signalled(trainer)

    def stop_if_signalled(self, trainer: L.Trainer) -> None:
        """If any process received a signal, save the training state as the last checkpoint
        and raise (collective in data-parallel training: every process must call it)."""
        signalled = received_signal() is not None
        if trainer.world_size > 1:
            signalled = trainer.strategy.reduce_boolean_decision(signalled, all=False)
        if not signalled:
            return
        trainer.save_checkpoint(self.last_checkpoint)
        signum = received_signal() or signal.SIGTERM  # a process another one's signal stopped
        raise StageInterrupted(signum, f" at step {trainer.global_step} (checkpoint saved)")


class TrainingPace(Callback):
    """Wall time of the training loop (set-up excluded: model, data and, in data-parallel
    training, process start), the samples and real tokens every process trained on in it, the
    model FLOPs they took (`models.flops`), the module's trainable and total parameters, and
    the loop's peak memory (see `PeakMemory`).

    In data-parallel training the peak is the largest of the processes' peaks (each process
    holds a copy of the model), so it reads as the memory one device or process needs; the MFU
    divides by the peak of every process's device together. Each epoch logs `train/tokens_per_s`
    and `train/mfu` so far.
    """

    def __init__(self) -> None:
        self.started = 0.0
        self.samples = self.tokens = self.flops = 0
        self.seconds = 0.0
        self.total_samples = self.total_tokens = self.total_flops = 0
        self.trainable_params = 0
        self.total_params = 0
        self.peak_mem_mb = 0.0
        self.start_mem_mb = 0.0  # held when the loop starts: libraries, data, model
        self.peak_flops = 0.0
        self.peak_source = ""
        self.world_size = 1
        self.memory: PeakMemory | None = None
        self.shape: tuple[int, int, int, int] = (0, 0, 0, 0)  # N, N_t, layers, width

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Count the parameters, look up the device's peak, reset the memory peak and start
        the clock."""
        self.trainable_params, self.total_params = count_trainable(pl_module)
        config = pl_module.model.config
        self.shape = (
            *non_embedding_counts(pl_module),
            config.num_hidden_layers,
            config.hidden_size,
        )
        self.peak_flops, self.peak_source = device_peak_flops(pl_module.device.type)
        self.memory = PeakMemory(pl_module.device)
        self.memory.reset()
        self.start_mem_mb = self.memory.current_mb()
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Count the batch's samples, real tokens and model FLOPs."""
        lengths = batch["attention_mask"].sum(dim=-1).tolist()
        self.samples += len(lengths)
        self.tokens += sum(lengths)
        self.flops += training_flops(lengths, *self.shape)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log the tokens/s and MFU of every process so far (train/tokens_per_s, train/mfu)."""
        self._add_up(trainer)
        # Straight to the logger: timings are no learning curve (history.csv, which a resumed
        # run must reproduce, keeps the callback metrics).
        if trainer.logger is not None:
            trainer.logger.log_metrics(
                {"train/tokens_per_s": self.tokens_per_s, "train/mfu": self.mfu},
                step=trainer.global_step,
            )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Stop the clock, add up every process's counts and take the largest memory peak."""
        self._add_up(trainer)
        peaks = gathered(self.memory.peak_mb())
        self.peak_mem_mb = max(peaks)
        if is_main_process():
            log.info(
                "%.0f tokens/s, model-FLOPs utilisation %.1f%% of %.2f TFLOP/s (%s)",
                self.tokens_per_s,
                100 * self.mfu,
                self.peak_flops * self.world_size / 1e12,
                self.peak_source,
            )

    def _add_up(self, trainer: L.Trainer) -> None:
        """Time so far, and every process's samples, tokens and FLOPs (collective)."""
        self.seconds = time.perf_counter() - self.started
        counts = gathered((self.samples, self.tokens, self.flops))
        self.total_samples, self.total_tokens, self.total_flops = map(
            sum, zip(*counts, strict=True)
        )
        self.world_size = len(counts)

    @property
    def samples_per_s(self) -> float:
        """Samples of every process per second of the training loop."""
        return self.total_samples / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Real (unpadded) tokens of every process per second of the training loop."""
        return self.total_tokens / self.seconds if self.seconds else 0.0

    @property
    def mfu(self) -> float:
        """Model FLOPs per second over the peak of every process's device."""
        peak = self.peak_flops * self.world_size
        return self.total_flops / self.seconds / peak if self.seconds and peak else 0.0


@dataclass
class FitResult:
    """What a training run did, for the stage's summary file."""

    global_step: int
    epochs: int
    resumed_from_step: int | None
    best_score: float | None
    history: HistoryRecorder
    pace: TrainingPace
    # The module's adversarial-training settings (models.adversarial): a step's extra passes.
    adversarial: dict[str, Any]


def fit_resumable(
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    trainer_cfg: TrainerConfig,
    work_dir: Path,
    *,
    max_epochs: int,
    max_steps: int = -1,
    limit_train_batches: int | float = 1.0,
    accumulate_grad_batches: int = 1,
    gradient_clip_val: float | None = None,
    monitor: str | None = None,
    patience: int = 0,
    checkpoint_every_n_steps: int = 50,
    logger: Logger | bool = False,
    callbacks: Sequence[Callback] = (),
) -> FitResult:
    """Fit `module`, resuming from `work_dir/last.ckpt` if an earlier run was interrupted.

    With `monitor`, early stopping watches it and the best checkpoint's weights are loaded
    back into the module at the end. The caller removes `work_dir` once the result is saved.
    In data-parallel training only rank 0 returns (see `end_other_processes`).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    last = work_dir / LAST_CHECKPOINT
    mode = "min" if monitor and monitor.endswith("loss") else "max"
    history = HistoryRecorder()
    pace = TrainingPace()
    stop_on_signal = StopOnSignal(last)
    all_callbacks: list[Callback] = [
        ExactResume(),
        *callbacks,
        history,
        pace,
        stop_on_signal,
        ModelCheckpoint(
            dirpath=work_dir,
            save_last=True,
            save_top_k=0,
            every_n_train_steps=checkpoint_every_n_steps,
        ),
    ]
    show_bar = trainer_cfg.enable_progress_bar and on_terminal()
    if not show_bar and is_main_process():  # a log file, CI or a job's output: plain lines
        all_callbacks.append(PlainProgress(log, monitor))
    best = None
    if monitor:
        best = ModelCheckpoint(
            dirpath=work_dir,
            filename=BEST_CHECKPOINT,
            monitor=monitor,
            mode=mode,
            save_top_k=1,
            enable_version_counter=False,
        )
        all_callbacks += [
            best,
            EarlyStopping(
                monitor=monitor, mode=mode, patience=patience, check_on_train_epoch_end=False
            ),
        ]
    trainer = L.Trainer(
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        strategy=trainer_cfg.strategy,
        num_nodes=trainer_cfg.num_nodes,
        precision=resolve_precision(trainer_cfg),
        deterministic=trainer_cfg.deterministic,
        log_every_n_steps=trainer_cfg.log_every_n_steps,
        enable_progress_bar=show_bar,
        enable_model_summary=False,
        max_epochs=max_epochs,
        max_steps=max_steps,
        limit_train_batches=limit_train_batches,
        use_distributed_sampler=False,  # the data module shards batches itself
        callbacks=all_callbacks,
        logger=logger,
        accumulate_grad_batches=accumulate_grad_batches,
        gradient_clip_val=gradient_clip_val,
        default_root_dir=work_dir,
        num_sanity_val_steps=0,
    )
    if trains_on_gpu(trainer_cfg):
        enable_tf32()
    if trainer_cfg.compile:
        module.model.compile()  # in place: state-dict keys and checkpoints stay as they are
    resumed_from = None
    if last.exists():
        resumed_from = int(torch.load(last, map_location="cpu", weights_only=False)["global_step"])
        if is_main_process():
            log.warning("Resuming from %s (step %d)", last, resumed_from)
    with deferred_signals():
        try:
            trainer.fit(
                module, datamodule=datamodule, ckpt_path=str(last) if last.exists() else None
            )
        except SIGTERMException as stopped:  # Lightning's handler, before ours took over
            raise StageInterrupted(signal.SIGTERM, " before training started") from stopped
        stop_on_signal.stop_if_signalled(trainer)  # a signal after the last training batch
    if trainer.world_size > 1:
        end_other_processes(trainer, module)
    best_score = None
    if best is not None and best.best_model_path:
        state = torch.load(best.best_model_path, map_location="cpu", weights_only=False)
        module.load_state_dict(state["state_dict"])
        best_score = float(best.best_model_score)
    return FitResult(
        trainer.global_step,
        trainer.current_epoch,
        resumed_from,
        best_score,
        history,
        pace,
        module.adversarial.model_dump(),
    )

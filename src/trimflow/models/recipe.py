"""The training recipe finetune, pruning recovery and distillation share.

The data module, the LightningModule's optimizer settings, the fit with the shared trainer
settings, MLflow logging and the files written next to a trained model.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L

from trimflow.config.schema import TrimflowConfig
from trimflow.data.datamodule import TokenizedDataModule
from trimflow.layout import HISTORY_FILE, TRAINING_FILE, Layout
from trimflow.models.adversarial import adversarial_settings
from trimflow.models.module import ClassifierModule, class_weights
from trimflow.models.training import FitResult, fit_resumable, trains_on_gpu
from trimflow.tracking.runs import Tracker
from trimflow.utils.atomic import write_json


def build_datamodule(cfg: TrimflowConfig, layout: Layout) -> TokenizedDataModule:
    """The data module over data/tokenized/ with the finetune batch settings."""
    on_gpu = trains_on_gpu(cfg.trainer)
    return TokenizedDataModule(
        layout.tokenized_splits,
        layout.tokenizer_dir,
        batch_size=cfg.finetune.batch_size,
        eval_batch_size=cfg.finetune.eval_batch_size,
        group_by_length=cfg.finetune.group_by_length,
        num_workers=cfg.trainer.num_workers,
        seed=cfg.seed,
        pad_to_multiple_of=8 if on_gpu else None,  # tensor cores work on multiples of 8
        pin_memory=on_gpu,
    )


def mlflow_logger(tracker: Tracker, active_run) -> L.pytorch.loggers.Logger | bool:
    """A Lightning logger writing into the stage's MLflow run (or none)."""
    if active_run is None:
        return False
    from lightning.pytorch.loggers import MLFlowLogger

    return MLFlowLogger(
        tracking_uri=tracker.uri,
        run_id=active_run.info.run_id,
        experiment_name=tracker.cfg.tracking.experiment,
    )


def write_training_outputs(out, result: FitResult, extra: dict) -> None:
    """The history CSV and a JSON summary of how training went and what it took."""
    result.history.write_csv(out / HISTORY_FILE)
    steps_run = result.global_step - (result.resumed_from_step or 0)
    write_json(
        out / TRAINING_FILE,
        {
            "global_step": result.global_step,
            "epochs": result.epochs,
            "resumed_from_step": result.resumed_from_step,
            "best_score": result.best_score,
            # This run's training loop (a resumed run's only), samples of every process.
            "train_s": round(result.pace.seconds, 3),
            "train_s_per_step": round(result.pace.seconds / max(steps_run, 1), 4),
            "train_samples_per_s": round(result.pace.samples_per_s, 2),
            "trainable_params": result.pace.trainable_params,
            "total_params": result.pace.total_params,
            # The largest process's peak: allocated CUDA memory, or RSS on the CPU.
            "peak_train_mem_mb": round(result.pace.peak_mem_mb, 1),
            # Rank 0's memory when the loop started (on the CPU: libraries, data and model).
            "start_train_mem_mb": round(result.pace.start_mem_mb, 1),
            # Real tokens of every process per second, and model FLOPs utilisation (flops.py:
            # a clean pass's FLOPs, so adversarial training's extra passes lower it).
            "train_tokens_per_s": round(result.pace.tokens_per_s, 1),
            "train_mfu": round(result.pace.mfu, 5),
            "adversarial": result.adversarial,
            **extra,
        },
    )


def classifier_module(
    cfg: TrimflowConfig, model, lr: float, datamodule: TokenizedDataModule
) -> ClassifierModule:
    """The LightningModule around `model` with the shared optimizer and loss settings."""
    return ClassifierModule(model, lr=lr, **shared_module_settings(cfg, model, datamodule))


def shared_module_settings(cfg: TrimflowConfig, model, datamodule: TokenizedDataModule) -> dict:
    """The module settings every training stage takes from `finetune`: weight decay, warm-up,
    the class weights of the loss (`finetune.class_balance`) and adversarial training."""
    balance = cfg.finetune.class_balance
    return {
        "weight_decay": cfg.finetune.weight_decay,
        "warmup_ratio": cfg.finetune.warmup_ratio,
        # Labels are counted only when they are used (NER counts every token).
        "class_weights": (
            class_weights(datamodule.train_label_counts(model.config.num_labels), balance)
            if balance
            else None
        ),
        "adversarial": adversarial_settings(cfg),
    }


def train_module(
    cfg: TrimflowConfig,
    module: L.LightningModule,
    datamodule: TokenizedDataModule,
    work_dir: Path,
    logger,
    **schedule,
) -> FitResult:
    """Fit `module` with the shared trainer settings; `schedule` sets length and callbacks."""
    return fit_resumable(
        module,
        datamodule,
        cfg.trainer,
        work_dir,
        accumulate_grad_batches=cfg.finetune.accumulate_grad_batches,
        gradient_clip_val=cfg.finetune.gradient_clip_val,
        patience=cfg.finetune.early_stopping_patience,
        checkpoint_every_n_steps=cfg.finetune.checkpoint_every_n_steps,
        logger=logger,
        **schedule,
    )

"""finetune: tokenized data + base model -> models/finetuned/ (save_pretrained format)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import lightning as L

from trimflow.config.schema import TrimflowConfig
from trimflow.data.datamodule import TokenizedDataModule
from trimflow.layout import Layout, stage_keys
from trimflow.models.loading import (
    load_base_classifier,
    load_tokenizer,
    read_label_map,
    save_model_dir,
)
from trimflow.models.module import ClassifierModule
from trimflow.models.training import FitResult, fit_resumable, resolve_precision
from trimflow.tracking.runs import Tracker
from trimflow.utils.atomic import atomic_dir, write_json

log = logging.getLogger(__name__)
HISTORY_FILE = "history.csv"
SUMMARY_FILE = "training.json"


def build_datamodule(cfg: TrimflowConfig, layout: Layout) -> TokenizedDataModule:
    """The data module over data/tokenized/ with the finetune batch settings."""
    on_gpu = resolve_precision(cfg.trainer) != "32-true"
    return TokenizedDataModule(
        layout.tokenized_splits,
        layout.tokenizer_dir,
        batch_size=cfg.finetune.batch_size,
        eval_batch_size=cfg.finetune.eval_batch_size,
        group_by_length=cfg.finetune.group_by_length,
        num_workers=cfg.trainer.num_workers,
        seed=cfg.seed,
        pad_to_multiple_of=8 if on_gpu else None,
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
    """The history CSV and a JSON summary of how training went."""
    result.history.write_csv(out / HISTORY_FILE)
    write_json(
        out / SUMMARY_FILE,
        {
            "global_step": result.global_step,
            "epochs": result.epochs,
            "resumed_from_step": result.resumed_from_step,
            "best_score": result.best_score,
            **extra,
        },
    )


def classifier_module(cfg: TrimflowConfig, model, lr: float) -> ClassifierModule:
    """The LightningModule around `model` with the shared optimizer settings."""
    return ClassifierModule(
        model, lr=lr, weight_decay=cfg.finetune.weight_decay, warmup_ratio=cfg.finetune.warmup_ratio
    )


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


def run(cfg: TrimflowConfig, layout: Layout) -> None:
    L.seed_everything(cfg.seed, workers=True)
    label_map = read_label_map(layout.tokenized)
    model = load_base_classifier(cfg.model.name, label_map["labels"], cfg.task.type)
    tokenizer = load_tokenizer(str(layout.tokenizer_dir))
    work_dir = layout.work / f"finetune-{stage_keys(cfg)['finetune']}"
    tracker = Tracker(cfg)
    with tracker.stage_run("finetune", label_map["dataset_digest"]) as active:
        result = train_module(
            cfg,
            classifier_module(cfg, model, cfg.finetune.lr),
            build_datamodule(cfg, layout),
            work_dir,
            mlflow_logger(tracker, active),
            monitor=cfg.finetune.monitor,
            max_epochs=cfg.finetune.max_epochs,
            max_steps=cfg.finetune.max_steps,
        )
        with atomic_dir(layout.finetuned) as out:
            save_model_dir(model, tokenizer, label_map, out)
            write_training_outputs(out, result, {"monitor": cfg.finetune.monitor})
    shutil.rmtree(work_dir, ignore_errors=True)
    log.info(
        "finetuned %d steps; best %s = %s",
        result.global_step,
        cfg.finetune.monitor,
        result.best_score,
    )

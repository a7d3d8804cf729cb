"""finetune: tokenized data + base model -> models/finetuned/ (save_pretrained format)."""

from __future__ import annotations

import logging

import lightning as L

from trimflow.config.schema import TrimflowConfig
from trimflow.layout import Layout, keyed_work_dir, read_label_map
from trimflow.models.loading import load_base_classifier, load_tokenizer, save_model_dir
from trimflow.models.recipe import (
    build_datamodule,
    classifier_module,
    mlflow_logger,
    train_module,
    write_training_outputs,
)
from trimflow.tracking.runs import Tracker
from trimflow.utils.atomic import atomic_dir

log = logging.getLogger(__name__)


def run(cfg: TrimflowConfig, layout: Layout) -> None:
    """Fine-tune the base model on the tokenized data (resuming from the checkpoint an
    interrupted run left) and save it with its training curves to models/finetuned/."""
    L.seed_everything(cfg.seed, workers=True)
    label_map = read_label_map(layout.tokenized)
    model = load_base_classifier(cfg.model.name, label_map["labels"], cfg.task.type)
    tokenizer = load_tokenizer(str(layout.tokenizer_dir))
    tracker = Tracker(cfg)
    datamodule = build_datamodule(cfg, layout)
    with (
        keyed_work_dir(cfg, layout, "finetune") as work_dir,
        tracker.stage_run("finetune", label_map["dataset_digest"]) as active,
    ):
        result = train_module(
            cfg,
            classifier_module(cfg, model, cfg.finetune.lr, datamodule),
            datamodule,
            work_dir,
            mlflow_logger(tracker, active),
            monitor=cfg.finetune.monitor,
            max_epochs=cfg.finetune.max_epochs,
            max_steps=cfg.finetune.max_steps,
        )
        with atomic_dir(layout.finetuned) as out:
            save_model_dir(model, tokenizer, label_map, out)
            write_training_outputs(out, result, {"monitor": cfg.finetune.monitor})
    log.info(
        "finetuned %d steps; best %s = %s",
        result.global_step,
        cfg.finetune.monitor,
        result.best_score,
    )

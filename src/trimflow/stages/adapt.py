"""adapt: parameter-efficient fine-tuning of the base model, one variant per `adapt.variants`
entry (LoRA, AdaLoRA, IA3, prefix tuning, BitFit, bottleneck adapters), beside finetune: the
same data, recipe, resume and tracking, a fraction of the trainable weights."""

from __future__ import annotations

import logging

import lightning as L

from trimflow.config.schema import AdaLoraAdapter, TrimflowConfig
from trimflow.evaluation.footprint import count_trainable
from trimflow.layout import Layout, keyed_work_dir, read_label_map
from trimflow.models.adapter_training import (
    AdaLoraBudget,
    enforce_final_budget,
    orthogonality_penalty,
)
from trimflow.models.adapters import adapt_model, save_adapted
from trimflow.models.loading import load_base_classifier, load_tokenizer
from trimflow.models.module import ClassifierModule
from trimflow.models.recipe import (
    build_datamodule,
    mlflow_logger,
    shared_module_settings,
    train_module,
    write_training_outputs,
)
from trimflow.stages import selected_variants
from trimflow.tracking.runs import Tracker
from trimflow.utils.atomic import atomic_dir

log = logging.getLogger(__name__)


def run(cfg: TrimflowConfig, layout: Layout, variant: str | None = None) -> None:
    """Train one adapted variant per selected `adapt.variants` entry (see `_adapt_variant`)."""
    for name in selected_variants(cfg.adapt.variants, variant, "adapt.variants"):
        _adapt_variant(cfg, layout, name)


def _adapt_variant(cfg: TrimflowConfig, layout: Layout, name: str) -> None:
    """Wrap the base model per `adapt.variants.<name>` (null targets: the defaults of its
    family), train it, save the adapter and, where the method merges, the merged model."""
    L.seed_everything(cfg.seed, workers=True)
    spec = cfg.adapt.variants[name]
    label_map = read_label_map(layout.tokenized)
    base = load_base_classifier(cfg.model.name, label_map["labels"], cfg.task.type)
    tokenizer = load_tokenizer(str(layout.tokenizer_dir))
    model = adapt_model(base, spec, f"adapt.variants.{name}")
    trainable, total = count_trainable(model)
    log.info("%s (%s): %d of %d weights trainable", name, spec.method, trainable, total)
    datamodule = build_datamodule(cfg, layout)
    adalora = isinstance(spec, AdaLoraAdapter)
    module = ClassifierModule(
        model,
        lr=spec.lr or cfg.adapt.lr,
        **shared_module_settings(cfg, base, datamodule),
        regularizer=(lambda: orthogonality_penalty(model)) if adalora else None,
        regularizer_weight=spec.orth_reg_weight if adalora else 0.0,
    )
    tracker = Tracker(cfg)
    with (
        keyed_work_dir(cfg, layout, "adapt", name) as work_dir,
        tracker.stage_run("adapt", label_map["dataset_digest"], builds=name) as active,
    ):
        result = train_module(
            cfg,
            module,
            datamodule,
            work_dir,
            mlflow_logger(tracker, active),
            callbacks=[AdaLoraBudget(model, spec)] if adalora else [],
            monitor=cfg.finetune.monitor,
            max_epochs=spec.max_epochs or cfg.adapt.max_epochs,
        )
        if adalora:
            enforce_final_budget(model)
        with atomic_dir(layout.model_dir(name)) as out:
            save_adapted(model.eval(), spec, cfg.model.name, tokenizer, label_map, out)
            write_training_outputs(
                out, result, {"monitor": cfg.finetune.monitor, "method": spec.method}
            )
    log.info("adapted %s: best %s = %s", name, cfg.finetune.monitor, result.best_score)

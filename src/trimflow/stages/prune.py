"""prune: remove the least important attention heads, magnitude-prune, recover, save."""

from __future__ import annotations

import logging
import shutil

import lightning as L

from trimflow.compress.heads import head_importance, load_pruned, prune_heads, select_heads_to_prune
from trimflow.compress.magnitude import apply_global_magnitude, make_permanent, sparsity
from trimflow.config.schema import TrimflowConfig
from trimflow.evaluation.footprint import count_parameters
from trimflow.layout import Layout, stage_keys
from trimflow.models.loading import load_tokenizer, read_label_map, save_model_dir
from trimflow.stages.finetune import (
    build_datamodule,
    mlflow_logger,
    train_classifier,
    write_training_outputs,
)
from trimflow.tracking.runs import Tracker
from trimflow.utils.atomic import atomic_dir, write_json

log = logging.getLogger(__name__)
PRUNING_FILE = "pruning.json"


def run(cfg: TrimflowConfig, layout: Layout) -> None:
    L.seed_everything(cfg.seed, workers=True)
    label_map = read_label_map(layout.finetuned)
    model = load_pruned(layout.finetuned)
    tokenizer = load_tokenizer(str(layout.finetuned))
    params_before, _ = count_parameters(model)
    datamodule = build_datamodule(cfg, layout)
    datamodule.setup()

    importance = head_importance(
        model, datamodule.train_dataloader(), max_batches=cfg.prune.importance_batches
    )
    heads = select_heads_to_prune(importance, cfg.prune.heads_fraction)
    prune_heads(model, heads)
    apply_global_magnitude(model, cfg.prune.sparsity)
    log.info(
        "removed %d attention heads; magnitude sparsity %.3f",
        sum(len(h) for h in heads.values()),
        sparsity(model),
    )

    tracker = Tracker(cfg)
    work_dir = layout.work / f"prune-{stage_keys(cfg)['prune']}"
    recovery = cfg.prune.recovery
    with tracker.stage_run("prune", label_map["dataset_digest"]) as active:
        result = None
        if recovery.enabled:
            result = train_classifier(
                cfg,
                model,
                datamodule,
                work_dir,
                mlflow_logger(tracker, active),
                recovery.lr,
                max_epochs=recovery.max_epochs,
                limit_train_batches=recovery.limit_train_batches,
            )
        make_permanent(model)
        params_after, nonzero_after = count_parameters(model)
        summary = {
            "heads_removed": {str(layer): h for layer, h in heads.items()},
            "head_importance": importance.tolist(),
            "magnitude_sparsity": round(sparsity(model), 4),
            "params_before": params_before,
            "params_after": params_after,
            "nonzero_params_after": nonzero_after,
        }
        with atomic_dir(layout.pruned) as out:
            save_model_dir(model.eval(), tokenizer, label_map, out)
            write_json(out / PRUNING_FILE, summary)
            if result is not None:
                write_training_outputs(out, result, {"monitor": cfg.finetune.monitor})
        if active is not None:
            import mlflow

            mlflow.log_metrics(
                {
                    "prune/heads_removed": sum(len(h) for h in heads.values()),
                    "prune/magnitude_sparsity": summary["magnitude_sparsity"],
                    "model/params": params_after,
                    "model/nonzero_params": nonzero_after,
                }
            )
    shutil.rmtree(work_dir, ignore_errors=True)

"""prune: one pruned variant per `prune.variants` entry, pruned gradually during recovery."""

from __future__ import annotations

import logging

import lightning as L
from transformers import AutoConfig

from trimflow.compress.magnitude import MagnitudePruner, sparsity
from trimflow.compress.schedule import GradualPruning
from trimflow.compress.structured import StructuredPruner, unit_importance
from trimflow.compress.variants import save_sparse_variant
from trimflow.config.schema import MagnitudePruning, TrimflowConfig
from trimflow.evaluation.footprint import count_parameters
from trimflow.layout import Layout, keyed_work_dir, read_label_map
from trimflow.models.families import family_of, intermediate_size
from trimflow.models.loading import load_classifier, load_tokenizer, save_model_dir
from trimflow.models.recipe import (
    build_datamodule,
    classifier_module,
    mlflow_logger,
    train_module,
    write_training_outputs,
)
from trimflow.stages import selected_variants
from trimflow.tracking.runs import PRUNE_PREFIX, Tracker
from trimflow.utils.atomic import atomic_dir, write_json

log = logging.getLogger(__name__)
PRUNING_FILE = "pruning.json"


def run(cfg: TrimflowConfig, layout: Layout, variant: str | None = None) -> None:
    """Prune each selected `prune.variants` entry's source, the fine-tuned model or a distilled
    student (see `_prune_variant`).

    A model family without a row in the family table stops here, before any data or training.
    """
    names = selected_variants(cfg.prune.variants, variant, "prune.variants")
    family_of(AutoConfig.from_pretrained(layout.finetuned), "prune")
    for name in names:
        _prune_variant(cfg, layout, name)


def _make_pruner(cfg: TrimflowConfig, model, spec, datamodule):
    """The pruner of `spec`; structured pruning scores heads and neurons on training data."""
    if isinstance(spec, MagnitudePruning):
        return MagnitudePruner(model, spec.sparsity, include_embeddings=spec.include_embeddings)
    heads, neurons = unit_importance(
        model, datamodule.train_dataloader(), max_batches=cfg.prune.importance_batches
    )
    return StructuredPruner(model, heads, neurons, spec.heads_fraction, spec.ffn_fraction)


def _prune_variant(cfg: TrimflowConfig, layout: Layout, name: str) -> None:
    """Prune `prune.variants.<name>`'s source per its spec and save it as models/<name>."""
    L.seed_everything(cfg.seed, workers=True)
    spec, recovery = cfg.prune.variants[name], cfg.prune.recovery
    source = layout.model_dir(spec.source)
    label_map = read_label_map(source)
    model = load_classifier(source)
    tokenizer = load_tokenizer(str(source))
    params_before, _ = count_parameters(model)
    datamodule = build_datamodule(cfg, layout)
    datamodule.setup()
    pruner = _make_pruner(cfg, model, spec, datamodule)

    tracker = Tracker(cfg)
    with (
        keyed_work_dir(cfg, layout, "prune", name) as work_dir,
        tracker.stage_run("prune", label_map["dataset_digest"], builds=name) as active,
    ):
        result = None
        if recovery.enabled:
            result = train_module(
                cfg,
                classifier_module(cfg, model, recovery.lr, datamodule),
                datamodule,
                work_dir,
                mlflow_logger(tracker, active),
                callbacks=[
                    GradualPruning(
                        [pruner],
                        end_fraction=recovery.pruning_end,
                        every_n_steps=recovery.prune_every_n_steps,
                    )
                ],
                max_epochs=recovery.max_epochs,
                limit_train_batches=recovery.limit_train_batches,
            )
        pruner.set_progress(1.0)  # already there unless recovery is off or too short to ramp
        pruner.finalize(model)
        model.eval()
        summary = _pruning_summary(model, spec, params_before)
        with atomic_dir(layout.model_dir(name)) as out:
            if isinstance(spec, MagnitudePruning):
                save_sparse_variant(model, tokenizer, label_map, out)
            else:
                save_model_dir(model, tokenizer, label_map, out)
            write_json(out / PRUNING_FILE, summary)
            if result is not None:
                write_training_outputs(out, result, {"pruning_end": recovery.pruning_end})
        tracker.log_metrics(summary, PRUNE_PREFIX)
    log.info("pruned %s: %s", name, summary)


def _pruning_summary(model, spec, params_before: int) -> dict[str, float]:
    """What pruning removed: parameters, heads, FFN neurons and zeroed weights."""
    config = model.config
    params_after, nonzero_after = count_parameters(model)
    pruned_heads = getattr(config, "pruned_heads", None) or {}  # unset unless heads were pruned
    heads_removed = sum(len(heads) for heads in pruned_heads.values())
    ffn_sizes = getattr(config, "intermediate_sizes", None) or []
    return {
        "params_before": params_before,
        "params_after": params_after,
        "nonzero_params_after": nonzero_after,
        "heads_removed": heads_removed,
        "ffn_neurons_removed": sum(intermediate_size(config) - size for size in ffn_sizes),
        "encoder_linear_sparsity": round(sparsity(model), 4),
    }

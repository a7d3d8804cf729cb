"""distill: the fine-tuned model teaches a smaller student (one per `distill.students` entry)."""

from __future__ import annotations

import logging

import lightning as L

from trimflow.config.schema import TrimflowConfig
from trimflow.evaluation.footprint import count_parameters
from trimflow.layout import Layout, keyed_work_dir, read_label_map
from trimflow.models.distillation import (
    DistillationClassifier,
    student_from_pretrained,
    student_from_teacher,
    teacher_layers,
)
from trimflow.models.loading import load_classifier, load_tokenizer, save_model_dir
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
# The MLflow artifact recording what the student kept: the resolved teacher layers or its model.
STUDENT_FILE = "student.json"


def run(cfg: TrimflowConfig, layout: Layout, variant: str | None = None) -> None:
    """Train one student per selected `distill.students` entry (see `_distill_student`)."""
    for name in selected_variants(cfg.distill.students, variant, "distill.students"):
        _distill_student(cfg, layout, name)


def _distill_student(cfg: TrimflowConfig, layout: Layout, name: str) -> None:
    """Train student `name` on soft and hard labels; save it like any fp32 variant."""
    L.seed_everything(cfg.seed, workers=True)
    settings, spec = cfg.distill, cfg.distill.students[name]
    label_map = read_label_map(layout.finetuned)
    teacher = load_classifier(layout.finetuned)
    tokenizer = load_tokenizer(str(layout.finetuned))
    if spec.model is None:
        layers = teacher_layers(spec, teacher.config, f"distill.students.{name}")
        log.info("student %s keeps teacher layers %s", name, layers)
        student = student_from_teacher(teacher, layers)
    else:
        layers = None
        student = student_from_pretrained(spec.model, label_map["labels"], tokenizer, cfg.task.type)
    datamodule = build_datamodule(cfg, layout)
    module = DistillationClassifier(
        student,
        lr=settings.lr,
        **shared_module_settings(cfg, student, datamodule),
        teacher=teacher,
        temperature=settings.temperature,
        alpha=settings.alpha,
        hidden_weight=settings.hidden_weight,
    )
    tracker = Tracker(cfg)
    with (
        keyed_work_dir(cfg, layout, "distill", name) as work_dir,
        tracker.stage_run("distill", label_map["dataset_digest"], builds=name) as active,
    ):
        result = train_module(
            cfg,
            module,
            datamodule,
            work_dir,
            mlflow_logger(tracker, active),
            monitor=cfg.finetune.monitor,
            max_epochs=settings.max_epochs,
            limit_train_batches=settings.limit_train_batches,
        )
        params, _ = count_parameters(student)
        summary = {
            "teacher_layers": layers,
            "student_model": spec.model,
            "params": params,
            "teacher_params": count_parameters(teacher)[0],
        }
        with atomic_dir(layout.model_dir(name)) as out:
            save_model_dir(student.eval(), tokenizer, label_map, out)
            write_training_outputs(out, result, {"monitor": cfg.finetune.monitor, **summary})
        tracker.log_dict(summary, STUDENT_FILE)
    log.info("distilled %s: %d parameters, best %s", name, params, result.best_score)

"""Typed schema of the composed config: unknown keys, wrong types and bad ranges fail early."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Fraction = Field(ge=0.0, lt=1.0)


class Section(BaseModel):
    """A config section: no unknown keys, values checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatasetConfig(Section):
    name: str
    source: Literal["files", "hf"]
    format: Literal["tab", "csv", "jsonl", "parquet"] | None = None
    subset: str | None = None
    train: str
    test: str
    validation: str | None = None
    text_column: str
    label_column: str
    validation_fraction: float = Field(gt=0.0, lt=1.0)
    max_train_samples: int | None = Field(default=None, gt=0)
    max_test_samples: int | None = Field(default=None, gt=0)


class ModelConfig(Section):
    name: str
    max_length: int = Field(gt=8, le=8192)


class TaskConfig(Section):
    type: Literal["classification"]


class FinetuneConfig(Section):
    lr: float = Field(gt=0.0, lt=1.0)
    weight_decay: float = Field(ge=0.0)
    warmup_ratio: float = Fraction
    batch_size: int = Field(gt=0)
    eval_batch_size: int = Field(gt=0)
    accumulate_grad_batches: int = Field(ge=1)
    gradient_clip_val: float | None = Field(default=None, gt=0.0)
    max_epochs: int = Field(ge=1)
    max_steps: int = Field(ge=-1)
    group_by_length: bool
    monitor: Literal["val/accuracy", "val/macro_f1", "val/loss"]
    early_stopping_patience: int = Field(ge=0)
    checkpoint_every_n_steps: int = Field(gt=0)


class RecoveryConfig(Section):
    enabled: bool
    lr: float = Field(gt=0.0, lt=1.0)
    max_epochs: int = Field(ge=1)
    limit_train_batches: int | float = Field(gt=0)


class PruneConfig(Section):
    sparsity: float = Fraction
    heads_fraction: float = Fraction
    importance_batches: int = Field(gt=0)
    recovery: RecoveryConfig


class QuantizeConfig(Section):
    scheme: Literal["dynamic_int8"]
    sources: list[Literal["finetuned", "pruned"]] = Field(min_length=1)


class LatencyConfig(Section):
    samples: int = Field(gt=0)
    warmup: int = Field(ge=0)
    repeats: int = Field(gt=0)


class ThroughputConfig(Section):
    batch_size: int = Field(gt=0)
    warmup: int = Field(ge=0)
    repeats: int = Field(gt=0)


class EvaluateConfig(Section):
    # Only CPU evaluation is implemented: dynamic int8 kernels are CPU-only.
    device: Literal["cpu"]
    num_threads: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    rounds: int = Field(ge=1)
    latency: LatencyConfig
    throughput: ThroughputConfig


class ReportConfig(Section):
    baseline: str
    title: str


class TrainerConfig(Section):
    accelerator: str
    devices: int | str
    strategy: str
    num_nodes: int = Field(ge=1)
    precision: Literal["32-true", "32", "bf16-mixed", "16-mixed", "bf16-true"] | None = None
    num_workers: int = Field(ge=0)
    deterministic: bool
    log_every_n_steps: int = Field(gt=0)
    enable_progress_bar: bool


class TrackingConfig(Section):
    enabled: bool
    uri: str
    experiment: str


class TrimflowConfig(Section):
    """The whole composed config (conf/config.yaml and its groups)."""

    seed: int = Field(ge=0)
    dataset: DatasetConfig
    model: ModelConfig
    task: TaskConfig
    finetune: FinetuneConfig
    prune: PruneConfig
    quantize: QuantizeConfig
    evaluate: EvaluateConfig
    report: ReportConfig
    trainer: TrainerConfig
    tracking: TrackingConfig

    @model_validator(mode="after")
    def _baseline_is_a_variant(self) -> TrimflowConfig:
        if self.report.baseline not in VARIANTS:
            raise ValueError(f"report.baseline: '{self.report.baseline}' is not one of {VARIANTS}")
        return self


VARIANTS = ("finetuned", "pruned", "quantized", "pruned_quantized")

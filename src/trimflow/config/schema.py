"""Typed schema of the composed config: unknown keys, wrong types and bad ranges fail early."""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from trimflow.config.schemes import QUANTIZE_SCHEMES

Fraction = Field(ge=0.0, lt=1.0)
# Variant names become directory names and DVC stage keys (prune@<name>).
VariantName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*$")]
# A masking pattern's name is also its replacement: `<name>`.
MaskName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*$")]


class Section(BaseModel):
    """A config section: no unknown keys, values checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatasetConfig(Section):
    name: str
    source: Literal["files", "hf"]
    format: Literal["tab", "csv", "jsonl", "parquet", "conll"] | None = None
    subset: str | None = None
    train: str
    # No test file: a test split of `test_fraction` is cut from train with the seed.
    test: str | None = None
    validation: str | None = None
    # Classification: the text and label columns. NER: the token-list and tag-list columns.
    text_column: str
    label_column: str
    validation_fraction: float = Field(gt=0.0, lt=1.0)
    test_fraction: float = Field(gt=0.0, lt=1.0)
    max_train_samples: int | None = Field(default=None, gt=0)
    max_test_samples: int | None = Field(default=None, gt=0)


# Which tokens of a text longer than `model.max_length` the model reads.
Truncation = Literal["head", "tail", "head_tail"]
# One typo per text, three, one word dropped, upper case (evaluation/perturbations.py).
Perturbation = Literal["typo1", "typo3", "word_drop", "case"]


class ModelConfig(Section):
    name: str
    max_length: int = Field(gt=8, le=8192)
    # The tokens kept of a longer text (its special tokens always are): `head` the first
    # max_length, `tail` the last, `head_tail` a quarter of the budget from the head and the rest
    # from the tail (Sun et al., 2019, "How to fine-tune BERT for text classification?": 128 +
    # 382 of 510). Recorded in the label map of data/tokenized and of every model directory, so
    # the served model reads what training read. NER: head only. Absent (older params): head.
    truncation: Truncation = "head"


class ClassificationTask(Section):
    """One label per text."""

    type: Literal["classification"]
    # The test metric variants are ranked on, and the validation metrics training may monitor.
    metric: ClassVar[str] = "accuracy"
    monitors: ClassVar[tuple[str, ...]] = ("val/accuracy", "val/macro_f1", "val/loss")
    # The test quality figures evaluate writes per variant, and those guarded by default.
    quality_metrics: ClassVar[tuple[str, ...]] = ("accuracy", "macro_f1")
    default_guards: ClassVar[tuple[str, ...]] = ("accuracy", "macro_f1")


class NerTask(Section):
    """Named-entity recognition: one IOB2 tag per word."""

    type: Literal["ner"]
    # Label every word piece (B-X's later pieces as I-X), not only a word's first piece.
    label_all_tokens: bool
    # Rewrite an I-X that starts an entity as B-X instead of stopping with an error.
    repair_iob: bool
    # seqeval entity extraction: "default" (conlleval) or "strict" (IOB2 only).
    seqeval_mode: Literal["default", "strict"]
    metric: ClassVar[str] = "f1"
    monitors: ClassVar[tuple[str, ...]] = ("val/f1", "val/token_accuracy", "val/loss")
    # macro_f1: the mean of the per-type entity F1s.
    quality_metrics: ClassVar[tuple[str, ...]] = (
        "f1",
        "precision",
        "recall",
        "macro_f1",
        "token_accuracy",
    )
    default_guards: ClassVar[tuple[str, ...]] = ("f1", "macro_f1")


TaskConfig = Annotated[ClassificationTask | NerTask, Field(discriminator="type")]


class AdversarialConfig(Section):
    """Embedding-space adversarial training (models.adversarial) in every training stage.

    Each step also trains on the word-embedding output shifted by at most `epsilon` (L2 per
    example) along the loss gradient: FGM (Miyato et al., 2017) one step of size `epsilon`, PGD
    (Madry et al., 2018; FreeLB, Zhu et al., 2020) `steps` steps of size `alpha` projected onto
    the epsilon ball (Madry: alpha ~ 2.5 epsilon / steps). The loss trained on is
    (1 - weight) * clean + weight * adversarial. `none`: plain training.
    """

    method: Literal["none", "fgm", "pgd"] = "none"
    epsilon: float = Field(default=1.0, gt=0.0)
    steps: int | None = Field(default=None, ge=1)
    alpha: float | None = Field(default=None, gt=0.0)
    weight: float = Field(default=0.5, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _steps_are_pgds(self) -> AdversarialConfig:
        if self.method == "pgd" and (self.steps is None or self.alpha is None):
            raise ValueError("method pgd needs steps and alpha (its step count and size)")
        if self.method == "fgm" and (self.steps is not None or self.alpha is not None):
            raise ValueError("steps and alpha are pgd's: fgm takes one step of size epsilon")
        return self


class FinetuneConfig(Section):
    lr: float = Field(gt=0.0, lt=1.0)
    weight_decay: float = Field(ge=0.0)
    warmup_ratio: float = Fraction
    # Loss weight per class = (its share of training labels) ** -class_balance (0: plain CE).
    class_balance: float = Field(ge=0.0, le=1.0)
    batch_size: int = Field(gt=0)
    eval_batch_size: int = Field(gt=0)
    accumulate_grad_batches: int = Field(ge=1)
    gradient_clip_val: float | None = Field(default=None, gt=0.0)
    max_epochs: int = Field(ge=1)
    max_steps: int = Field(ge=-1)
    group_by_length: bool
    monitor: Literal["val/accuracy", "val/macro_f1", "val/f1", "val/token_accuracy", "val/loss"]
    early_stopping_patience: int = Field(ge=0)
    checkpoint_every_n_steps: int = Field(gt=0)
    # Absent (older params): off.
    adversarial: AdversarialConfig = Field(default_factory=AdversarialConfig)


class RecoveryConfig(Section):
    enabled: bool
    lr: float = Field(gt=0.0, lt=1.0)
    max_epochs: int = Field(ge=1)
    # Training batches per recovery epoch: a fraction of the epoch or a count.
    limit_train_batches: int | float = Field(gt=0)
    # Sparsity ramps 0 -> target over this fraction of the recovery steps (cubic schedule).
    pruning_end: float = Field(gt=0.0, le=1.0)
    # Masks are recomputed every this many steps (global magnitude ranking costs ~1 s on CPU).
    prune_every_n_steps: int = Field(ge=1)


class PruneSource(Section):
    """What every pruned variant sets: the variant it prunes, the fine-tuned model or a
    distilled student (compound compression: a smaller student made narrower)."""

    source: str


class StructuredPruning(PruneSource):
    """Physically remove attention heads and FFN neurons, least important first."""

    method: Literal["structured"]
    heads_fraction: float = Fraction
    ffn_fraction: float = Fraction


class MagnitudePruning(PruneSource):
    """Zero the smallest weights (global L1); stored dense, compressed on disk."""

    method: Literal["magnitude"]
    sparsity: float = Fraction
    include_embeddings: bool = False


PruneVariant = Annotated[StructuredPruning | MagnitudePruning, Field(discriminator="method")]


class PruneConfig(Section):
    importance_batches: int = Field(gt=0)
    recovery: RecoveryConfig
    variants: dict[VariantName, PruneVariant]


class StudentConfig(Section):
    """A student: layers of the teacher kept, or a smaller pretrained `model`.

    The kept layers are explicit teacher indices (`layers`), or a count (`num_layers`) or share
    of the teacher's depth (`layer_fraction`, rounded, at least 1) spread evenly from layer 0
    (models.distillation.teacher_layers), so one config fits teachers of any depth.
    """

    KINDS: ClassVar[tuple[str, ...]] = ("layers", "num_layers", "layer_fraction", "model")

    layers: list[int] | None = Field(default=None, min_length=1)
    num_layers: int | None = Field(default=None, gt=0)
    layer_fraction: float | None = Field(default=None, gt=0.0, lt=1.0)
    model: str | None = None

    def kind(self) -> str:
        """The one key of KINDS that is set."""
        return next(key for key in self.KINDS if getattr(self, key) is not None)

    @model_validator(mode="after")
    def _one_initialisation(self) -> StudentConfig:
        chosen = [key for key in self.KINDS if getattr(self, key) is not None]
        if len(chosen) != 1:
            raise ValueError(
                f"set exactly one of {', '.join(self.KINDS)}, got {chosen or 'none'} (on the "
                "command line, replace the default: ~distill.students.<name>.layer_fraction "
                "+distill.students.<name>.num_layers=3)"
            )
        return self


class DistillConfig(Section):
    temperature: float = Field(gt=0.0)
    alpha: float = Field(ge=0.0, le=1.0)
    # Weight of the layer-wise hidden-state term (0: logits only).
    hidden_weight: float = Field(ge=0.0)
    lr: float = Field(gt=0.0, lt=1.0)
    max_epochs: int = Field(ge=1)
    limit_train_batches: int | float = Field(gt=0)
    students: dict[VariantName, StudentConfig]


class AdapterSpec(Section):
    """What every adapted variant may set: its own learning rate and epochs (None: `adapt.lr`,
    `adapt.max_epochs`)."""

    lr: float | None = Field(default=None, gt=0.0, lt=1.0)
    max_epochs: int | None = Field(default=None, ge=1)


# Module names peft matches as suffixes at dot boundaries; None: the family's defaults
# (models.families), resolved when the model is loaded.
TargetModules = list[str] | None


class LoraAdapter(AdapterSpec):
    """LoRA (Hu et al., 2021): a trained low-rank update B·A beside each target linear layer."""

    method: Literal["lora"]
    r: int = Field(gt=0)
    alpha: float = Field(gt=0.0)
    dropout: float = Fraction
    target_modules: TargetModules = Field(default=None, min_length=1)


class AdaLoraAdapter(AdapterSpec):
    """AdaLoRA (Zhang et al., 2023): SVD-form LoRA whose rank budget shrinks from `init_r` to
    `target_r` per layer on average, by importance, between the `tinit` and `1 - tfinal`
    fractions of training, re-allocated every `delta_t` steps."""

    method: Literal["adalora"]
    init_r: int = Field(gt=0)
    target_r: int = Field(gt=0)
    alpha: float = Field(gt=0.0)
    dropout: float = Fraction
    target_modules: TargetModules = Field(default=None, min_length=1)
    tinit: float = Fraction
    tfinal: float = Fraction
    delta_t: int = Field(ge=1)
    orth_reg_weight: float = Field(ge=0.0)

    @model_validator(mode="after")
    def _budget_shrinks(self) -> AdaLoraAdapter:
        if self.target_r > self.init_r:
            raise ValueError("target_r must not exceed init_r")
        if self.tinit + self.tfinal >= 1:
            raise ValueError("tinit + tfinal must leave steps to allocate the budget in (< 1)")
        return self


class Ia3Adapter(AdapterSpec):
    """IA3 (Liu et al., 2022): trained vectors rescale the target layers' activations (the
    inputs of `feedforward_modules`, the outputs of the others). A null `feedforward_modules`
    is the family's default ones among the targets."""

    method: Literal["ia3"]
    target_modules: TargetModules = Field(default=None, min_length=1)
    feedforward_modules: TargetModules = None

    @model_validator(mode="after")
    def _feedforward_are_targets(self) -> Ia3Adapter:
        if self.target_modules is not None and self.feedforward_modules is not None:
            extra = [m for m in self.feedforward_modules if m not in self.target_modules]
            if extra:
                raise ValueError(f"feedforward_modules {extra} are not in target_modules")
        return self


class PrefixAdapter(AdapterSpec):
    """Prefix tuning (Li & Liang, 2021): trained key/value vectors of `num_virtual_tokens`
    virtual tokens in every layer. Cannot be merged into the weights."""

    method: Literal["prefix"]
    num_virtual_tokens: int = Field(gt=0)


class BitFitAdapter(AdapterSpec):
    """BitFit (Ben Zaken et al., 2021): only biases, LayerNorms and the task head train."""

    method: Literal["bitfit"]


class BottleneckAdapter(AdapterSpec):
    """Bottleneck adapters (Houlsby et al., 2019): after the attention and the FFN output
    projections of every layer, x + up(activation(down(x))) through `size` units. Cannot be
    merged into the weights (the activation is non-linear)."""

    method: Literal["bottleneck"]
    size: int = Field(gt=0)
    activation: Literal["gelu", "relu"]


AdaptVariant = Annotated[
    LoraAdapter | AdaLoraAdapter | Ia3Adapter | PrefixAdapter | BitFitAdapter | BottleneckAdapter,
    Field(discriminator="method"),
]
# Methods whose trained weights fold into a plain model of the base architecture.
MERGEABLE_METHODS = ("lora", "adalora", "ia3", "bitfit")


class AdaptConfig(Section):
    """Parameter-efficient variants, trained from the base model on the tokenized data with
    the finetune recipe (batch size, warm-up, class balance, monitor, checkpoints)."""

    lr: float = Field(gt=0.0, lt=1.0)
    max_epochs: int = Field(ge=1)
    variants: dict[VariantName, AdaptVariant]


class QuantizeVariant(Section):
    source: str
    scheme: Literal[tuple(QUANTIZE_SCHEMES)]


class QuantizeConfig(Section):
    # Validation batches that calibrate static int8 activation ranges.
    calibration_batches: int = Field(gt=0)
    variants: dict[VariantName, QuantizeVariant]


class LatencyConfig(Section):
    samples: int = Field(gt=0)
    warmup: int = Field(ge=0)
    repeats: int = Field(gt=0)


class ThroughputConfig(Section):
    # None: 32 on the CPU, 64 on a GPU (evaluation.inputs.throughput_batch_size).
    batch_size: int | None = Field(default=None, gt=0)
    warmup: int = Field(ge=0)
    repeats: int = Field(gt=0)


# Beyond-accuracy figures no guard can take (see TrimflowConfig.guardable_metrics).
NOT_GUARDABLE = (
    "forgotten",
    "flip_accuracy",
    "temperature",
    "nll",
    "nll_calibrated",
    "slice_gap_change",
    "explain_ms",
)


class CalibrationConfig(Section):
    """ECE, NLL, Brier score and temperature scaling (evaluation/calibration.py)."""

    # Equal-width bins of the top-label confidence over [0, 1] for ECE and the reliability
    # diagram (Guo et al. 2017 use 15).
    bins: int = Field(ge=2, le=100)
    # Fit a temperature per variant on the validation split; the report registers it with the
    # model and `trimflow serve` / `trimflow predict` divide the logits by it.
    temperature_scaling: bool


class RobustnessConfig(Section):
    """Accuracy under seeded perturbations of a sample of test texts
    (evaluation/perturbations.py)."""

    # Kinds of evaluation.perturbations.PERTURBATIONS; empty: no robustness figures.
    perturbations: list[Perturbation]
    # Test texts perturbed (a seeded sample; all of them when the split is smaller).
    sample: int = Field(gt=0)
    seed: int


class SlicesConfig(Section):
    """Quality per slice of the test split with Fairlearn's MetricFrame
    (evaluation/slices.py): by gold class, length in word pieces, truncated or not, and
    extra columns of the dataset."""

    # Bucket edges in word pieces: [64, 128, 256] makes <64, 64-127, 128-255, >=256.
    length_edges: list[int] = Field(min_length=1)
    # Extra dataset columns to slice by; None: every column the dataset carries besides text
    # and label.
    columns: list[str] | None = None
    # Slices with fewer test examples are listed but left out of the worst slice and the gap.
    min_size: int = Field(ge=1)


class ExplanationsConfig(Section):
    """Word attributions (feature ablation) of every variant on a seeded sample of test texts,
    compared with the baseline's (explain/agreement.py)."""

    # Test texts explained per variant; 0: no attribution agreement.
    sample: int = Field(ge=0)
    # Tokens each explained text keeps (model.truncation chooses them): feature ablation takes
    # a forward pass per word, so its cost grows with the square of the length.
    max_length: int = Field(gt=8)
    # Words compared by the top-k overlap.
    top_k: int = Field(gt=0)
    seed: int


class EvaluateConfig(Section):
    # auto: CUDA when torch sees a GPU. Torch dynamic int8 variants run on the CPU whatever
    # the device (their kernels are CPU-only), and so do ONNX variants without onnxruntime-gpu.
    device: Literal["auto", "cpu", "cuda"]
    num_threads: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    rounds: int = Field(ge=1)
    latency: LatencyConfig
    throughput: ThroughputConfig
    # Score each merged adapter's base model + adapter too and compare it with the merged
    # weights (merge_max_abs_diff, merge_agreement): a check of the merge, at the cost of
    # scoring those variants twice.
    merge_check: bool
    calibration: CalibrationConfig
    robustness: RobustnessConfig
    slices: SlicesConfig
    explanations: ExplanationsConfig

    @field_validator("device")
    @classmethod
    def _device_exists(cls, device: str) -> str:
        from trimflow.utils.device import resolve_device  # torch: only here, not at import

        resolve_device(device)
        return device


class ReportConfig(Section):
    baseline: str
    # The recommended variant is the best on `objective` among those losing at most this many
    # points of each guarded quality metric against the baseline.
    max_drop_pts: float = Field(ge=0.0)
    # The guarded metrics; None: the task's default_guards.
    guard_metrics: list[str] | None = Field(default=None, min_length=1)
    # What the recommendation minimises: batch-1 p50 latency, training time or peak training
    # memory (see evaluation.recommend.OBJECTIVE_FIELDS).
    objective: Literal["latency", "train_time", "train_memory"]
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
    # torch.compile the model before training (worth it on a GPU for long runs: compiling
    # takes tens of seconds; bench/gpu_check.py measures both).
    compile: bool = False

    def data_parallel(self) -> bool:
        """Whether training asks for several processes (devices > 1 or several nodes)."""
        return self.num_nodes > 1 or self.devices not in (1, "1", "auto")


class TrackingConfig(Section):
    enabled: bool
    uri: str
    experiment: str
    register_model: bool = True  # report stage: log + register the recommended variant


class SearchConfig(Section):
    """What the pipeline entry point returns to a sweeper (read by no DVC stage)."""

    objective: Literal["validation", "latency_budget"]
    latency_budget_ms: float | None = Field(default=None, gt=0.0)
    last_stage: Literal["finetune", "report"]

    @model_validator(mode="after")
    def _objective_is_computable(self) -> SearchConfig:
        if self.objective == "latency_budget" and self.latency_budget_ms is None:
            raise ValueError("search.latency_budget_ms must be set for objective latency_budget")
        if self.objective == "latency_budget" and self.last_stage != "report":
            raise ValueError("search.last_stage must be 'report' for objective latency_budget")
        return self


class PredictionLogConfig(Section):
    """`trimflow serve`'s prediction log: one JSON line per text answered (README: "Prediction
    log and drift monitoring")."""

    # Appended to; None: no log.
    path: str | None
    # Log each text too, masked; off by default.
    raw_text: bool
    # name -> regular expression, applied in this order; each match becomes `<name>`. A null
    # pattern masks nothing.
    mask: dict[MaskName, str | None]

    @field_validator("mask")
    @classmethod
    def _patterns_compile(cls, mask: dict[str, str | None]) -> dict[str, str | None]:
        for name, pattern in mask.items():
            if pattern is None:
                continue
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"{name}: not a regular expression: {error}") from None
        return mask


class ServeConfig(Section):
    """`trimflow serve`: the HTTP service of a variant or a registered model (read by no stage)."""

    host: str
    port: int = Field(gt=0, lt=65536)
    # Micro-batching: a forward pass takes up to `max_batch` texts of concurrent requests, and
    # starts at the latest `max_wait_ms` after its oldest request arrived.
    max_batch: int = Field(gt=0)
    max_wait_ms: float = Field(ge=0.0)
    max_body_bytes: int = Field(gt=0)
    # Requests per second per token (bursts of one second's worth); None: no limit.
    rate_limit: float | None = Field(default=None, gt=0.0)
    # The bearer token: the lines of `token_file` (one token each) if set, else $`token_env`.
    token_env: str = Field(min_length=1)
    token_file: str | None = None
    # On SIGTERM: how long in-flight requests may take to finish before they are cancelled.
    shutdown_timeout_s: float = Field(gt=0.0)
    prediction_log: PredictionLogConfig


class MonitorConfig(Section):
    """`trimflow monitor`: drift of logged traffic from evaluate's reference profile (read by
    no stage). A feature drifts when its PSI exceeds `psi_threshold` and its two-sample test's
    p-value is below `p_value` (monitoring/drift.py says why both)."""

    psi_threshold: float = Field(gt=0.0)
    p_value: float = Field(gt=0.0, lt=1.0)
    # Quantile bins of the reference for a numeric feature's PSI.
    bins: int = Field(ge=2, le=100)
    # Fewer logged texts give no verdict (exit 2).
    min_texts: int = Field(ge=1)


class TrimflowConfig(Section):
    """The whole composed config (conf/config.yaml and its groups)."""

    seed: int = Field(ge=0)
    dataset: DatasetConfig
    model: ModelConfig
    task: TaskConfig
    finetune: FinetuneConfig
    adapt: AdaptConfig
    prune: PruneConfig
    distill: DistillConfig
    quantize: QuantizeConfig
    evaluate: EvaluateConfig
    report: ReportConfig
    trainer: TrainerConfig
    tracking: TrackingConfig
    search: SearchConfig
    serve: ServeConfig
    monitor: MonitorConfig

    def variant_kinds(self) -> dict[str, str]:
        """Every variant the pipeline builds -> the stage that builds it, in build and report
        order: a variant after the one it is built from."""
        kinds = {FINETUNED: "finetune"}
        for stage, names in (
            ("adapt", self.adapt.variants),
            ("distill", self.distill.students),
            ("prune", self.prune.variants),
            ("quantize", self.quantize.variants),
        ):
            for name in names:
                if name in kinds:
                    raise ValueError(f"{stage}: variant name '{name}' is already used")
                kinds[name] = stage
        return kinds

    def guard_metrics(self) -> list[str]:
        """The metrics the recommendation keeps within `report.max_drop_pts`."""
        return list(self.report.guard_metrics or self.task.default_guards)

    def beyond_metrics(self) -> list[str]:
        """The beyond-accuracy numbers evaluate writes per variant with this config
        (evaluation/beyond_accuracy.py): loyalty to the baseline; for classification also
        calibration, accuracy under each perturbation, slices and attribution agreement."""
        fields = ["label_loyalty", "flip_rate", "forgotten"]
        if self.task.type == "ner":
            return fields
        ev = self.evaluate
        fields += ["probability_loyalty", "flip_accuracy", "ece", "nll", "brier"]
        if ev.calibration.temperature_scaling:
            fields += ["temperature", "ece_calibrated", "nll_calibrated", "brier_calibrated"]
        if ev.robustness.perturbations:
            fields.append("sample_accuracy")  # clean, on the texts that are perturbed
        for kind in ev.robustness.perturbations:
            fields += [f"accuracy_{kind}", f"invariance_failure_{kind}"]
        fields += ["worst_slice_accuracy", "slice_gap", "slice_gap_change"]
        if ev.explanations.sample:
            fields += ["attribution_topk_overlap", "attribution_rank_correlation", "explain_ms"]
        return fields

    def guardable_metrics(self) -> list[str]:
        """What `report.guard_metrics` may name: the task's quality metrics and the
        beyond-accuracy figures that are shares of the test texts (not counts, times, the
        temperature, NLL or changes already taken against the baseline)."""
        shares = [m for m in self.beyond_metrics() if m not in NOT_GUARDABLE]
        return [*self.task.quality_metrics, *shares]

    @model_validator(mode="after")
    def _variants_are_consistent(self) -> TrimflowConfig:
        kinds = self.variant_kinds()
        prunable = [FINETUNED, *self.distill.students]
        for name, variant in self.prune.variants.items():
            if variant.source not in prunable:
                raise ValueError(
                    f"prune.variants.{name}.source: '{variant.source}' is neither the fine-tuned "
                    f"model nor a distilled student ({', '.join(prunable)})"
                )
        unquantized = [name for name, kind in kinds.items() if kind != "quantize"]
        for name, variant in self.quantize.variants.items():
            if variant.source not in unquantized:
                raise ValueError(
                    f"quantize.variants.{name}.source: '{variant.source}' is not an "
                    f"unquantized variant ({', '.join(unquantized)})"
                )
            adapted = self.adapt.variants.get(variant.source)
            if adapted is not None and adapted.method not in MERGEABLE_METHODS:
                raise ValueError(
                    f"quantize.variants.{name}.source: '{variant.source}' is {adapted.method}-"
                    "tuned; its adapter cannot be merged into the weights, so it cannot be "
                    f"quantized (quantize a {'/'.join(MERGEABLE_METHODS)} variant)"
                )
        if self.finetune.monitor not in self.task.monitors:
            raise ValueError(
                f"finetune.monitor: '{self.finetune.monitor}' is not logged for task "
                f"'{self.task.type}' (choose from {', '.join(self.task.monitors)})"
            )
        if self.report.baseline not in kinds:
            raise ValueError(
                f"report.baseline: '{self.report.baseline}' is not one of {list(kinds)}"
            )
        guardable = self.guardable_metrics()
        unknown = [m for m in self.guard_metrics() if m not in guardable]
        if unknown:
            raise ValueError(
                f"report.guard_metrics: {', '.join(unknown)} not measured for task "
                f"'{self.task.type}' with this evaluate config (choose from "
                f"{', '.join(guardable)})"
            )
        return self

    @model_validator(mode="after")
    def _truncation_fits_the_task(self) -> TrimflowConfig:
        if self.task.type == "ner" and self.model.truncation != "head":
            raise ValueError(
                f"model.truncation: '{self.model.truncation}' is for classification; NER keeps "
                "the head of each sentence (its labels are aligned to the words kept): set "
                "model.truncation=head"
            )
        return self


FINETUNED = "finetuned"

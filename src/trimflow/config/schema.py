"""Typed schema of the composed config: unknown keys, wrong types and bad ranges fail early.

Every field carries a description: `python -m trimflow.reference --write` renders them, with
each key's type, default and range, into docs/reference/configuration.md.
"""

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

# Variant names become directory names and DVC stage keys (prune@<name>).
VariantName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*$")]
# A masking pattern's name is also its replacement: `<name>`.
MaskName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*$")]


class Section(BaseModel):
    """A config section: no unknown keys, values checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatasetConfig(Section):
    """The data set prepare reads: the embedded R8 (`dataset=r8`), local files
    (`dataset=files`), a Hugging Face data set (`dataset=hf`) or WNUT-16 for NER."""

    name: str = Field(
        description="A name for the data set; with `source: hf` the `datasets.load_dataset` "
        "id (a hub id or a local script or folder)."
    )
    source: Literal["files", "hf"] = Field(
        description="`files`: local (or `package://`) csv, jsonl, parquet, Orange tab or CoNLL "
        "files; `hf`: `datasets.load_dataset`."
    )
    format: Literal["tab", "csv", "jsonl", "parquet", "conll"] | None = Field(
        default=None,
        description="The files' format; null: taken from each file's suffix. `conll`: one token "
        "and its tag a line, sentences split by blank lines (NER).",
    )
    subset: str | None = Field(
        default=None, description="`source: hf`: the data set's configuration (subset) name."
    )
    train: str = Field(
        description="The training file (a path or `package://dist/path` URI), or the split name "
        "with `source: hf`."
    )
    test: str | None = Field(
        default=None,
        description="The test file or split; null: a test split of `test_fraction` is cut from "
        "train with the seed.",
    )
    validation: str | None = Field(
        default=None,
        description="The validation file or split; null: a stratified, seeded split of "
        "`validation_fraction` is cut from train.",
    )
    text_column: str = Field(
        description="Classification: the column of texts. NER: the column of token lists."
    )
    label_column: str = Field(
        description="Classification: the column of labels. NER: the column of tag lists (class "
        "ids are turned into tag names)."
    )
    validation_fraction: float = Field(
        gt=0.0,
        lt=1.0,
        description="Share of train cut off as the validation split when none is given.",
    )
    test_fraction: float = Field(
        gt=0.0, lt=1.0, description="Share of train cut off as the test split when none is given."
    )
    max_train_samples: int | None = Field(
        default=None, gt=0, description="Keep at most this many training examples; null: all."
    )
    max_test_samples: int | None = Field(
        default=None, gt=0, description="Keep at most this many test examples; null: all."
    )


# Which tokens of a text longer than `model.max_length` the model reads.
Truncation = Literal["head", "tail", "head_tail"]
# One typo per text, three, one word dropped, upper case (evaluation/perturbations.py).
Perturbation = Literal["typo1", "typo3", "word_drop", "case"]


class ModelConfig(Section):
    """The encoder every variant starts from and how its inputs are cut (`model=` picks a
    family preset)."""

    name: str = Field(
        description="The base encoder: a hub id, a local `save_pretrained` folder or a "
        "`package://dist/path` URI (how the embedded default is found)."
    )
    max_length: int = Field(
        gt=8, le=8192, description="Tokens per text, special tokens included; longer texts are cut."
    )
    # Absent (older params): head.
    truncation: Truncation = Field(
        default="head",
        description="The tokens kept of a longer text (its special tokens always are): `head` "
        "the first `max_length`, `tail` the last, `head_tail` a quarter of the budget from the "
        "head and the rest from the tail (Sun et al., 2019). Recorded in the label map of "
        "data/tokenized and of every model folder, so the served model reads what training read. "
        "NER: `head` only.",
    )


class ClassificationTask(Section):
    """One label per text."""

    type: Literal["classification"] = Field(
        description="`classification` (one label per text) or `ner` (one IOB2 tag per word)."
    )
    # The test metric variants are ranked on, and the validation metrics training may monitor.
    metric: ClassVar[str] = "accuracy"
    monitors: ClassVar[tuple[str, ...]] = ("val/accuracy", "val/macro_f1", "val/loss")
    # The test quality figures evaluate writes per variant, and those guarded by default.
    quality_metrics: ClassVar[tuple[str, ...]] = ("accuracy", "macro_f1")
    default_guards: ClassVar[tuple[str, ...]] = ("accuracy", "macro_f1")


class NerTask(Section):
    """Named-entity recognition: one IOB2 tag per word."""

    type: Literal["ner"] = Field(
        description="`classification` (one label per text) or `ner` (one IOB2 tag per word)."
    )
    label_all_tokens: bool = Field(
        description="Label every word piece (a `B-X` word's later pieces as `I-X`), not only "
        "a word's first piece."
    )
    repair_iob: bool = Field(
        description="Rewrite an `I-X` that starts an entity as `B-X` (counted in the data "
        "card) instead of stopping with an error."
    )
    seqeval_mode: Literal["default", "strict"] = Field(
        description="seqeval's entity extraction: `default` (conlleval) or `strict` (IOB2 only)."
    )
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

    method: Literal["none", "fgm", "pgd"] = Field(
        default="none",
        description="`none`: plain training; `fgm`: one step of size `epsilon`; `pgd`: `steps` "
        "projected steps of size `alpha`.",
    )
    epsilon: float = Field(
        default=1.0, gt=0.0, description="Largest L2 norm of each example's word-embedding shift."
    )
    steps: int | None = Field(
        default=None, ge=1, description="PGD's step count (pgd only; required by it)."
    )
    alpha: float | None = Field(
        default=None, gt=0.0, description="PGD's step size (pgd only; required by it)."
    )
    weight: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Share of the adversarial loss: (1 - weight) * clean + weight * adversarial.",
    )

    @model_validator(mode="after")
    def _steps_are_pgds(self) -> AdversarialConfig:
        if self.method == "pgd" and (self.steps is None or self.alpha is None):
            raise ValueError("method pgd needs steps and alpha (its step count and size)")
        if self.method == "fgm" and (self.steps is not None or self.alpha is not None):
            raise ValueError("steps and alpha are pgd's: fgm takes one step of size epsilon")
        return self


class FinetuneConfig(Section):
    """The full fine-tune of the base model (the finetune stage) and the training recipe the
    adapt stage shares (batch size, warm-up, class balance, monitor, checkpoints)."""

    lr: float = Field(gt=0.0, lt=1.0, description="AdamW's peak learning rate.")
    weight_decay: float = Field(
        ge=0.0, description="AdamW's weight decay (none on biases and LayerNorms)."
    )
    warmup_ratio: float = Field(
        ge=0.0, lt=1.0, description="Share of the steps with a linear warm-up, then linear decay."
    )
    class_balance: float = Field(
        ge=0.0,
        le=1.0,
        description="Every training stage's loss weighs a class by (its share of training "
        "labels) ** -class_balance, scaled to mean 1: 0 plain cross-entropy, 0.5 square-root "
        "balancing, 1 every class alike.",
    )
    batch_size: int = Field(
        gt=0, description="Training batch size per process (global: x devices x nodes)."
    )
    eval_batch_size: int = Field(gt=0, description="Validation batch size.")
    accumulate_grad_batches: int = Field(
        ge=1, description="Batches whose gradients are summed per optimizer step."
    )
    gradient_clip_val: float | None = Field(
        default=None, gt=0.0, description="Clip the gradient norm to this; null: no clipping."
    )
    max_epochs: int = Field(ge=1, description="Training epochs at most.")
    max_steps: int = Field(ge=-1, description="Optimizer steps at most; -1: no limit.")
    group_by_length: bool = Field(
        description="Batch texts of similar length together (less padding), seeded."
    )
    monitor: Literal["val/accuracy", "val/macro_f1", "val/f1", "val/token_accuracy", "val/loss"] = (
        Field(
            description="The validation metric for early stopping and the best checkpoint; one "
            "the task logs."
        )
    )
    early_stopping_patience: int = Field(
        ge=0, description="Validations without improvement before training stops."
    )
    checkpoint_every_n_steps: int = Field(
        gt=0,
        description="Steps between checkpoints in .trimflow/work/: a killed stage resumes from "
        "the last one.",
    )
    # Absent (older params): off.
    adversarial: AdversarialConfig = Field(
        default_factory=AdversarialConfig,
        description="Embedding-space adversarial training (FGM, PGD) in every training stage.",
    )


class RecoveryConfig(Section):
    """The fine-tune during which pruning ramps in (gradual pruning) and the model recovers."""

    enabled: bool = Field(description="Train during and after pruning (off: prune in one shot).")
    lr: float = Field(gt=0.0, lt=1.0, description="The recovery's learning rate.")
    max_epochs: int = Field(ge=1, description="Recovery epochs.")
    limit_train_batches: int | float = Field(
        gt=0, description="Training batches per recovery epoch: a fraction of the epoch or a count."
    )
    pruning_end: float = Field(
        gt=0.0,
        le=1.0,
        description="Sparsity ramps from 0 to the target over this share of the recovery "
        "steps (cubic schedule, Zhu & Gupta 2017).",
    )
    prune_every_n_steps: int = Field(
        ge=1,
        description="Masks are recomputed every this many steps (a global ranking costs about "
        "1 s on a CPU).",
    )


class PruneSource(Section):
    """What every pruned variant sets: the variant it prunes, the fine-tuned model or a
    distilled student (compound compression: a smaller student made narrower)."""

    source: str = Field(
        description="The variant pruned: `finetuned` or a distilled student (DVC builds it first)."
    )


class StructuredPruning(PruneSource):
    """Physically remove attention heads and FFN neurons, least important first."""

    method: Literal["structured"] = Field(
        description="`structured`: remove heads and FFN neurons; `magnitude`: zero the "
        "smallest weights."
    )
    heads_fraction: float = Field(
        ge=0.0,
        lt=1.0,
        description="Share of attention heads removed (global ranking, at least one kept per "
        "layer).",
    )
    ffn_fraction: float = Field(
        ge=0.0,
        lt=1.0,
        description="Share of FFN intermediate neurons removed (at least one kept per layer).",
    )


class MagnitudePruning(PruneSource):
    """Zero the smallest weights (global L1); stored dense, compressed on disk."""

    method: Literal["magnitude"] = Field(
        description="`structured`: remove heads and FFN neurons; `magnitude`: zero the "
        "smallest weights."
    )
    sparsity: float = Field(
        ge=0.0, lt=1.0, description="Share of the encoder's Linear weights set to zero."
    )
    include_embeddings: bool = Field(default=False, description="Prune the word embeddings too.")


PruneVariant = Annotated[StructuredPruning | MagnitudePruning, Field(discriminator="method")]


class PruneConfig(Section):
    """Pruned variants: each entry of `variants` is a DVC stage `prune@<name>`."""

    importance_batches: int = Field(
        gt=0, description="Training batches that score every head's and neuron's importance."
    )
    recovery: RecoveryConfig = Field(description="The recovery fine-tune.")
    variants: dict[VariantName, PruneVariant] = Field(
        description="name -> pruned variant, built into models/<name>."
    )


class StudentConfig(Section):
    """A student: layers of the teacher kept, or a smaller pretrained `model`.

    The kept layers are explicit teacher indices (`layers`), or a count (`num_layers`) or share
    of the teacher's depth (`layer_fraction`, rounded, at least 1) spread evenly from layer 0
    (models.distillation.teacher_layers), so one config fits teachers of any depth.
    """

    KINDS: ClassVar[tuple[str, ...]] = ("layers", "num_layers", "layer_fraction", "model")

    layers: list[int] | None = Field(
        default=None,
        min_length=1,
        description="Teacher layer indices the student keeps, in its order (set one of "
        "layers, num_layers, layer_fraction, model).",
    )
    num_layers: int | None = Field(
        default=None, gt=0, description="Keep this many teacher layers, spread evenly from layer 0."
    )
    layer_fraction: float | None = Field(
        default=None,
        gt=0.0,
        lt=1.0,
        description="Keep this share of the teacher's depth (rounded, at least 1), spread "
        "evenly: 0.5 keeps layers 0, 2, 4 of 6.",
    )
    model: str | None = Field(
        default=None,
        description="A smaller pretrained encoder with the teacher's tokenizer, instead of "
        "teacher layers.",
    )

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
    """Knowledge distillation from the fine-tuned model (Hinton et al., 2015): the loss is
    alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE + hidden_weight * hidden."""

    temperature: float = Field(gt=0.0, description="Softmax temperature T of the KL term.")
    alpha: float = Field(
        ge=0.0, le=1.0, description="Weight of the KL term against the cross-entropy."
    )
    hidden_weight: float = Field(
        ge=0.0,
        description="Weight of the layer-wise hidden-state term (Patient KD): student layer j "
        "against the teacher layer ending the j-th equal span of its depth; 0: logits only.",
    )
    lr: float = Field(gt=0.0, lt=1.0, description="The student's learning rate.")
    max_epochs: int = Field(ge=1, description="Distillation epochs.")
    limit_train_batches: int | float = Field(
        gt=0, description="Training batches per epoch: a fraction of the epoch or a count."
    )
    students: dict[VariantName, StudentConfig] = Field(
        description="name -> student, a DVC stage `distill@<name>` building models/<name>."
    )


class AdapterSpec(Section):
    """What every adapted variant may set: its own learning rate and epochs (None: `adapt.lr`,
    `adapt.max_epochs`)."""

    lr: float | None = Field(
        default=None, gt=0.0, lt=1.0, description="This variant's learning rate; null: `adapt.lr`."
    )
    max_epochs: int | None = Field(
        default=None, ge=1, description="This variant's epochs; null: `adapt.max_epochs`."
    )


# Module names peft matches as suffixes at dot boundaries; None: the family's defaults
# (models.families), resolved when the model is loaded.
TargetModules = list[str] | None
TARGETS = (
    "Module names adapted (suffixes at dot boundaries); null: the model family's defaults "
    "(models/families.py)."
)


class LoraAdapter(AdapterSpec):
    """LoRA (Hu et al., 2021): a trained low-rank update B·A beside each target linear layer."""

    method: Literal["lora"] = Field(
        description="The method: lora, adalora, ia3, prefix, bitfit or bottleneck."
    )
    r: int = Field(gt=0, description="Rank of the update.")
    alpha: float = Field(gt=0.0, description="Scaling of the update (alpha / r).")
    dropout: float = Field(ge=0.0, lt=1.0, description="Dropout on the adapter's input.")
    target_modules: TargetModules = Field(default=None, min_length=1, description=TARGETS)


class AdaLoraAdapter(AdapterSpec):
    """AdaLoRA (Zhang et al., 2023): SVD-form LoRA whose rank budget shrinks from `init_r` to
    `target_r` per layer on average, by importance, between the `tinit` and `1 - tfinal`
    fractions of training, re-allocated every `delta_t` steps."""

    method: Literal["adalora"] = Field(
        description="The method: lora, adalora, ia3, prefix, bitfit or bottleneck."
    )
    init_r: int = Field(gt=0, description="Starting rank per layer.")
    target_r: int = Field(gt=0, description="Average rank per layer at the end (at most init_r).")
    alpha: float = Field(gt=0.0, description="Scaling of the update.")
    dropout: float = Field(ge=0.0, lt=1.0, description="Dropout on the adapter's input.")
    target_modules: TargetModules = Field(default=None, min_length=1, description=TARGETS)
    tinit: float = Field(
        ge=0.0, lt=1.0, description="Share of training before the budget starts to shrink."
    )
    tfinal: float = Field(
        ge=0.0, lt=1.0, description="Share of training at the end with the budget fixed."
    )
    delta_t: int = Field(ge=1, description="Steps between re-allocations of the rank budget.")
    orth_reg_weight: float = Field(ge=0.0, description="Weight of the orthogonality penalty.")

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

    method: Literal["ia3"] = Field(
        description="The method: lora, adalora, ia3, prefix, bitfit or bottleneck."
    )
    target_modules: TargetModules = Field(default=None, min_length=1, description=TARGETS)
    feedforward_modules: TargetModules = Field(
        default=None,
        description="Targets whose input (not output) is rescaled; must be among "
        "`target_modules`; null: the family's defaults.",
    )

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

    method: Literal["prefix"] = Field(
        description="The method: lora, adalora, ia3, prefix, bitfit or bottleneck."
    )
    num_virtual_tokens: int = Field(gt=0, description="Virtual tokens per layer.")


class BitFitAdapter(AdapterSpec):
    """BitFit (Ben Zaken et al., 2021): only biases, LayerNorms and the task head train."""

    method: Literal["bitfit"] = Field(
        description="The method: lora, adalora, ia3, prefix, bitfit or bottleneck."
    )


class BottleneckAdapter(AdapterSpec):
    """Bottleneck adapters (Houlsby et al., 2019): after the attention and the FFN output
    projections of every layer, x + up(activation(down(x))) through `size` units. Cannot be
    merged into the weights (the activation is non-linear)."""

    method: Literal["bottleneck"] = Field(
        description="The method: lora, adalora, ia3, prefix, bitfit or bottleneck."
    )
    size: int = Field(gt=0, description="Units of the bottleneck.")
    activation: Literal["gelu", "relu"] = Field(description="The non-linearity.")


AdaptVariant = Annotated[
    LoraAdapter | AdaLoraAdapter | Ia3Adapter | PrefixAdapter | BitFitAdapter | BottleneckAdapter,
    Field(discriminator="method"),
]
# Methods whose trained weights fold into a plain model of the base architecture.
MERGEABLE_METHODS = ("lora", "adalora", "ia3", "bitfit")


class AdaptConfig(Section):
    """Parameter-efficient variants, trained from the base model on the tokenized data with
    the finetune recipe (batch size, warm-up, class balance, monitor, checkpoints)."""

    lr: float = Field(gt=0.0, lt=1.0, description="Learning rate of every adapted variant.")
    max_epochs: int = Field(ge=1, description="Epochs of every adapted variant.")
    variants: dict[VariantName, AdaptVariant] = Field(
        description="name -> adapted variant, a DVC stage `adapt@<name>` building models/<name>."
    )


class QuantizeVariant(Section):
    """A quantized (or converted) form of another variant."""

    source: str = Field(
        description="The variant converted: any unquantized one (finetuned, a prune, distill or "
        "mergeable adapt entry)."
    )
    scheme: Literal[tuple(QUANTIZE_SCHEMES)] = Field(
        description="How: torch (`dynamic_int8`, `dynamic_int8_embeddings`, `bf16`, `fp16`), "
        "ONNX Runtime (`onnx_fp32`, `onnx_dynamic_int8`, `onnx_static_int8`) or OpenVINO "
        "(`openvino_fp32`, `openvino_int8`)."
    )


class QuantizeConfig(Section):
    """Quantized variants: each entry of `variants` is a DVC stage `quantize@<name>`."""

    calibration_batches: int = Field(
        gt=0,
        description="Validation batches that calibrate static int8 activation ranges "
        "(`onnx_static_int8`, `openvino_int8`).",
    )
    variants: dict[VariantName, QuantizeVariant] = Field(
        description="name -> quantized variant, built into models/<name>."
    )


class LatencyConfig(Section):
    """Batch-1 latency: each variant timed on the same texts."""

    samples: int = Field(gt=0, description="Test texts timed one at a time.")
    warmup: int = Field(ge=0, description="Untimed forward passes first.")
    repeats: int = Field(gt=0, description="Timed forward passes per round.")


class ThroughputConfig(Section):
    """Batch throughput: texts per second over pre-tokenized batches."""

    batch_size: int | None = Field(
        default=None,
        gt=0,
        description="Texts per batch; null: 32 on the CPU, 64 on a GPU "
        "(evaluation.inputs.throughput_batch_size).",
    )
    warmup: int = Field(ge=0, description="Untimed batches first.")
    repeats: int = Field(gt=0, description="Timed passes per round.")


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

    bins: int = Field(
        ge=2,
        le=100,
        description="Equal-width bins of the top-label confidence for ECE and the reliability "
        "diagram (Guo et al. 2017 use 15).",
    )
    temperature_scaling: bool = Field(
        description="Fit a temperature per variant on the validation split; the report registers "
        "it with the model and `trimflow serve` / `trimflow predict` divide the logits by it."
    )


class RobustnessConfig(Section):
    """Accuracy under seeded perturbations of a sample of test texts
    (evaluation/perturbations.py)."""

    perturbations: list[Perturbation] = Field(
        description="Perturbations applied: `typo1`, `typo3` (keyboard typos), `word_drop`, "
        "`case` (upper case); empty: no robustness figures."
    )
    sample: int = Field(
        gt=0, description="Test texts perturbed (a seeded sample; all when the split is smaller)."
    )
    seed: int = Field(description="Seed of the sample and the perturbations.")


class SlicesConfig(Section):
    """Quality per slice of the test split with Fairlearn's MetricFrame
    (evaluation/slices.py): by gold class, length in word pieces, truncated or not, and
    extra columns of the dataset."""

    length_edges: list[int] = Field(
        min_length=1,
        description="Length bucket edges in word pieces: [64, 128, 256] makes <64, 64-127, "
        "128-255, >=256.",
    )
    columns: list[str] | None = Field(
        default=None,
        description="Extra dataset columns to slice by; null: every column besides text and label.",
    )
    min_size: int = Field(
        ge=1,
        description="Slices with fewer test examples are listed but left out of the worst slice "
        "and the gap.",
    )


class ExplanationsConfig(Section):
    """Word attributions (feature ablation) of every variant on a seeded sample of test texts,
    compared with the baseline's (explain/agreement.py)."""

    sample: int = Field(
        ge=0, description="Test texts explained per variant; 0: no attribution agreement."
    )
    max_length: int = Field(
        gt=8,
        description="Tokens each explained text keeps: ablation takes a forward pass per word, "
        "so its cost grows with the square of the length.",
    )
    top_k: int = Field(gt=0, description="Words compared by the top-k overlap.")
    seed: int = Field(description="Seed of the sample.")


class EvaluateConfig(Section):
    """The evaluate stage: quality, timing, footprint and what compression changes, for every
    variant on the same inputs."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        description="`auto`: CUDA when torch sees a GPU. Torch dynamic int8 variants run on the "
        "CPU whatever the device, and so do ONNX variants without onnxruntime-gpu."
    )
    num_threads: int = Field(
        gt=0, description="torch, ONNX Runtime and OpenVINO threads for scoring and timing."
    )
    batch_size: int = Field(gt=0, description="Batch size for scoring the test split.")
    rounds: int = Field(
        ge=1,
        description="Latency and throughput are timed in this many interleaved round-robin "
        "rounds over all variants.",
    )
    latency: LatencyConfig = Field(description="Batch-1 latency timing.")
    throughput: ThroughputConfig = Field(description="Batch throughput timing.")
    merge_check: bool = Field(
        description="Score each merged adapter's base model + adapter too and compare it with "
        "the merged weights (merge_max_abs_diff, merge_agreement): those variants are scored "
        "twice."
    )
    calibration: CalibrationConfig = Field(description="Calibration and temperature scaling.")
    robustness: RobustnessConfig = Field(description="Accuracy under perturbations.")
    slices: SlicesConfig = Field(description="Quality per slice.")
    explanations: ExplanationsConfig = Field(description="Attribution agreement.")

    @field_validator("device")
    @classmethod
    def _device_exists(cls, device: str) -> str:
        from trimflow.utils.device import resolve_device  # torch: only here, not at import

        resolve_device(device)
        return device


class ReportConfig(Section):
    """The recommendation (made by evaluate) and the report."""

    baseline: str = Field(
        description="The variant every other is compared with (ratios, drops, loyalty)."
    )
    max_drop_pts: float = Field(
        ge=0.0,
        description="A variant qualifies when it loses at most this many points of each guarded "
        "metric against the baseline.",
    )
    guard_metrics: list[str] | None = Field(
        default=None,
        min_length=1,
        description="The guarded metrics, e.g. [accuracy]; null: the task's defaults (accuracy "
        "and macro_f1; NER: f1 and macro_f1). Beyond-accuracy shares may be named too.",
    )
    objective: Literal["latency", "train_time", "train_memory"] = Field(
        description="What the recommendation minimises among the qualifying variants: batch-1 "
        "p50 latency, training seconds or peak training memory (see "
        "evaluation.recommend.OBJECTIVE_FIELDS)."
    )
    title: str = Field(description="The report's title.")


class TrainerConfig(Section):
    """Lightning Trainer settings shared by every stage that trains."""

    accelerator: str = Field(description="Lightning's accelerator: `auto`, `cpu`, `gpu`, ...")
    devices: int | str = Field(
        description="Processes (devices) per node; more than 1 trains data-parallel."
    )
    strategy: str = Field(description="Lightning's strategy: `auto`, `ddp`, `fsdp`, ...")
    num_nodes: int = Field(ge=1, description="Machines taking part in data-parallel training.")
    precision: Literal["32-true", "32", "bf16-mixed", "16-mixed", "bf16-true"] | None = Field(
        default=None,
        description="null: `bf16-mixed` on GPUs that compute in bf16, `16-mixed` on older ones, "
        "`32-true` on the CPU.",
    )
    num_workers: int = Field(ge=0, description="Data loader processes (0: in the main process).")
    deterministic: bool = Field(description="Deterministic kernels: same seed, same weights.")
    log_every_n_steps: int = Field(gt=0, description="Steps between logged training metrics.")
    enable_progress_bar: bool = Field(
        description="Lightning's progress bar on a terminal (plain progress lines otherwise)."
    )
    compile: bool = Field(
        default=False,
        description="torch.compile the model before training (worth it on a GPU for long runs: "
        "compiling takes tens of seconds).",
    )

    def data_parallel(self) -> bool:
        """Whether training asks for several processes (devices > 1 or several nodes)."""
        return self.num_nodes > 1 or self.devices not in (1, "1", "auto")


class TrackingConfig(Section):
    """MLflow tracking (read by no DVC stage's params)."""

    enabled: bool = Field(description="Log runs to MLflow.")
    uri: str = Field(description="The tracking URI; `MLFLOW_TRACKING_URI` overrides it.")
    experiment: str = Field(description="The MLflow experiment.")
    register_model: bool = Field(
        default=True,
        description="Report stage: log the recommended variant as a pyfunc model and register it "
        "as `trimflow-<task>` (the `champion` alias moves only to a better one).",
    )


class SearchConfig(Section):
    """What the pipeline entry point returns to a sweeper (read by no DVC stage)."""

    objective: Literal["validation", "latency_budget"] = Field(
        description="`validation`: the fine-tuned model's best validation score; "
        "`latency_budget`: the best test score among variants within `latency_budget_ms`."
    )
    latency_budget_ms: float | None = Field(
        default=None,
        gt=0.0,
        description="Batch-1 p50 budget in ms (required by `latency_budget`).",
    )
    last_stage: Literal["finetune", "report"] = Field(
        description="The last stage each run or sweep point goes to."
    )

    @model_validator(mode="after")
    def _objective_is_computable(self) -> SearchConfig:
        if self.objective == "latency_budget" and self.latency_budget_ms is None:
            raise ValueError("search.latency_budget_ms must be set for objective latency_budget")
        if self.objective == "latency_budget" and self.last_stage != "report":
            raise ValueError("search.last_stage must be 'report' for objective latency_budget")
        return self


class PredictionLogConfig(Section):
    """`trimflow serve`'s prediction log: one JSON line per text answered (docs: how-to
    "Monitor drift")."""

    path: str | None = Field(
        description="The log file, appended to (its folder is created); null: no log."
    )
    raw_text: bool = Field(description="Log each text too, masked; off by default.")
    mask: dict[MaskName, str | None] = Field(
        description="name -> regular expression, applied in this order; each match becomes "
        "`<name>`. A null pattern masks nothing."
    )

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

    host: str = Field(
        description="Where it listens: 127.0.0.1 this machine only, 0.0.0.0 every interface "
        "(put TLS in front)."
    )
    port: int = Field(gt=0, lt=65536, description="The port.")
    max_batch: int = Field(
        gt=0, description="Micro-batching: the most texts of concurrent requests in one forward."
    )
    max_wait_ms: float = Field(
        ge=0.0, description="A batch starts at the latest this long after its oldest request."
    )
    max_body_bytes: int = Field(gt=0, description="Larger request bodies are refused (413).")
    rate_limit: float | None = Field(
        default=None,
        gt=0.0,
        description="Requests per second per token (bursts of one second's worth); null: no limit.",
    )
    token_env: str = Field(
        min_length=1, description="The environment variable holding the bearer token."
    )
    token_file: str | None = Field(
        default=None,
        description="A file of tokens, one a line (one per client); when set it wins over "
        "`token_env`.",
    )
    shutdown_timeout_s: float = Field(
        gt=0.0, description="On SIGTERM: how long in-flight requests may take to finish."
    )
    prediction_log: PredictionLogConfig = Field(description="The opt-in prediction log.")


class MonitorConfig(Section):
    """`trimflow monitor`: drift of logged traffic from evaluate's reference profile (read by
    no stage). A feature drifts when its PSI exceeds `psi_threshold` and its two-sample test's
    p-value is below `p_value` (monitoring/drift.py says why both)."""

    psi_threshold: float = Field(
        gt=0.0, description="PSI above which a shift matters (0.1 slight, 0.2 significant)."
    )
    p_value: float = Field(
        gt=0.0, lt=1.0, description="Test p-value below which a difference is not sampling noise."
    )
    bins: int = Field(
        ge=2, le=100, description="Quantile bins of the reference for a numeric feature's PSI."
    )
    min_texts: int = Field(ge=1, description="Fewer logged texts give no verdict (exit 2).")


class TrimflowConfig(Section):
    """The whole composed config (conf/config.yaml and its groups)."""

    seed: int = Field(ge=0, description="Seed of splits, sampling, initialisation and training.")
    dataset: DatasetConfig = Field(description="The data set.")
    model: ModelConfig = Field(description="The base encoder.")
    task: TaskConfig = Field(description="Classification or NER.")
    finetune: FinetuneConfig = Field(description="The full fine-tune.")
    adapt: AdaptConfig = Field(description="Parameter-efficient variants.")
    prune: PruneConfig = Field(description="Pruned variants.")
    distill: DistillConfig = Field(description="Distilled students.")
    quantize: QuantizeConfig = Field(description="Quantized variants.")
    evaluate: EvaluateConfig = Field(description="The evaluate stage.")
    report: ReportConfig = Field(description="The recommendation and the report.")
    trainer: TrainerConfig = Field(description="Lightning Trainer settings.")
    tracking: TrackingConfig = Field(description="MLflow tracking.")
    search: SearchConfig = Field(description="What a sweep optimises.")
    serve: ServeConfig = Field(description="`trimflow serve`.")
    monitor: MonitorConfig = Field(description="`trimflow monitor`.")

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
        (evaluation/beyond_accuracy.py): loyalty to the baseline, calibration, robustness
        (accuracy under each perturbation; NER: entity F1) and slices; for classification also
        the flip set's accuracy and attribution agreement."""
        ner, ev = self.task.type == "ner", self.evaluate
        fields = ["label_loyalty", "flip_rate", "forgotten", "probability_loyalty"]
        fields += [] if ner else ["flip_accuracy"]
        fields += ["ece", "nll", "brier"]
        if ev.calibration.temperature_scaling:
            fields += ["temperature", "ece_calibrated", "nll_calibrated", "brier_calibrated"]
        score = "f1" if ner else "accuracy"
        if ev.robustness.perturbations:
            fields.append(f"sample_{score}")  # clean, on the texts that are perturbed
        for kind in ev.robustness.perturbations:
            fields += [f"{score}_{kind}", f"invariance_failure_{kind}"]
        fields += ["worst_slice_accuracy", "slice_gap", "slice_gap_change"]
        if ev.explanations.sample and not ner:
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

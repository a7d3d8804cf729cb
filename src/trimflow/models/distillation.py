"""Knowledge distillation (Hinton et al., 2015): students, the KD loss and its LightningModule.

A student is either a shallower copy of the teacher (`student_from_teacher`, layers picked from
the teacher's encoder by `teacher_layers`, for every family of models.families) or a smaller
pretrained encoder sharing the teacher's vocabulary (`student_from_pretrained`).
`DistillationClassifier` trains it on a mix of the teacher's softened predictions and the
labels, optionally also matching the teacher's hidden states layer by layer (Sun et al., 2019,
"Patient KD"; here every token's state, not only [CLS]); the teacher is frozen and kept out of
the module tree, so optimizer, checkpoints and `state_dict` hold the student only.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from trimflow.compress.pruned import is_structurally_pruned
from trimflow.config.loading import ConfigError
from trimflow.config.schema import AdversarialConfig, StudentConfig
from trimflow.models.adversarial import LossTerms
from trimflow.models.families import EncoderFamily, family_of, submodule
from trimflow.models.loading import load_base_classifier, load_tokenizer
from trimflow.models.module import ClassifierModule, cross_entropy, labelled_positions


def spread_layers(count: int, depth: int) -> list[int]:
    """`count` of a `depth`-layer teacher's layers spread evenly from layer 0: round(i * depth /
    count) (6 of 12: every other layer, as DistilBERT kept of BERT-base)."""
    return [round(i * depth / count) for i in range(count)]


def teacher_layers(spec: StudentConfig, config: PreTrainedConfig, key: str) -> list[int]:
    """The teacher layers a layer-dropping student keeps: `spec.layers`, or `spec.num_layers`
    or `spec.layer_fraction` of the teacher's depth (rounded, at least 1) spread evenly.

    The teacher's family must be in the table (a ConfigError naming model.name); layers that do
    not fit the teacher raise a ConfigError naming `key.<spec's field>`.
    """
    family = family_of(config, "distill")
    depth = config.num_hidden_layers
    if spec.layers is not None:
        layers = list(spec.layers)
    else:
        count = spec.num_layers or max(1, round(spec.layer_fraction * depth))
        layers = spread_layers(count, depth)
    try:
        _check_layers(layers, depth, family)
    except ValueError as error:
        raise ConfigError(f"{key}.{spec.kind()}: {error}") from None
    return layers


def _check_layers(layers: Sequence[int], depth: int, family: EncoderFamily) -> None:
    """Layers must be a non-empty, in-range, duplicate-free strict subset of the teacher's
    `depth`, starting with layer 0 where the family's first layer differs from the others."""
    if not layers:
        raise ValueError("layers must name at least one teacher layer, got []")
    for layer in layers:
        if not 0 <= layer < depth:
            raise ValueError(f"layer {layer} out of range: the teacher has {depth}")
    if len(layers) >= depth:
        raise ValueError(f"a student needs fewer layers than the teacher's {depth}, got {layers}")
    duplicates = sorted(layer for layer, count in Counter(layers).items() if count > 1)
    if duplicates:
        raise ValueError(f"layers must be unique, got {duplicates} more than once")
    if family.first_layer_distinct and layers[0] != 0:
        raise ValueError(
            f"{family.name}'s layer 0 differs from the others (no attention LayerNorm): a "
            f"student must keep it as its first layer, got {layers}"
        )


def _layer_prefix(model: PreTrainedModel, family: EncoderFamily) -> str:
    """The state-dict prefix of the model's encoder layers (`bert.encoder.layer.`)."""
    layers = submodule(model.base_model, family.layers)
    return next(f"{name}." for name, module in model.named_modules() if module is layers)


def _teacher_key(key: str, prefix: str, layers: Sequence[int]) -> str:
    """The teacher state-dict key a student key is copied from (layer j <- layers[j])."""
    if not key.startswith(prefix):
        return key
    index, rest = key[len(prefix) :].split(".", 1)
    return f"{prefix}{layers[int(index)]}.{rest}"


def _copied_state(
    student: PreTrainedModel, teacher: PreTrainedModel, layers: Sequence[int], prefix: str
) -> dict[str, Tensor]:
    """The student's state dict filled from the teacher, shapes checked."""
    source = teacher.state_dict()
    state = {}
    for key, target in student.state_dict().items():
        origin = _teacher_key(key, prefix, layers)
        if origin not in source:
            raise ValueError(f"the teacher has no '{origin}' (remove pruning masks first)")
        if source[origin].shape != target.shape:
            raise ValueError(
                f"teacher '{origin}' has shape {tuple(source[origin].shape)}, the config implies"
                f" {tuple(target.shape)}: the teacher's layers must all match its config"
            )
        state[key] = source[origin]
    return state


def student_from_teacher(teacher: PreTrainedModel, layers: Sequence[int]) -> PreTrainedModel:
    """A shallower model of the teacher's class and config, keeping the encoder `layers`.

    Embeddings, the chosen layers (in the given order), pooler and classification head are
    copied from the teacher; the family's per-layer config lists (ModernBERT's `layer_types`)
    keep the chosen layers' entries. The teacher must be unpruned and of a family in the table
    (a ConfigError otherwise); the student is in eval mode.
    """
    family = family_of(teacher.config, "distill")
    if is_structurally_pruned(teacher.config):
        raise ValueError(
            "the teacher is structurally pruned (heads or FFN widths): use an unpruned one"
        )
    layers = list(layers)
    _check_layers(layers, teacher.config.num_hidden_layers, family)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)  # DistilBERT's n_layers, through its attribute_map
    for key in family.per_layer_config:
        setattr(config, key, [getattr(config, key)[layer] for layer in layers])
    student = type(teacher)(config)
    prefix = _layer_prefix(teacher, family)
    student.load_state_dict(_copied_state(student, teacher, layers, prefix))
    return student.eval()


def student_from_pretrained(
    name_or_path: str,
    labels: list[str],
    teacher_tokenizer: PreTrainedTokenizerBase,
    task: str = "classification",
) -> PreTrainedModel:
    """A pretrained encoder with a fresh `task` head for `labels`, if it reads the teacher's
    tokens."""
    if load_tokenizer(name_or_path).get_vocab() != teacher_tokenizer.get_vocab():
        raise ValueError(
            f"student model {name_or_path} has a different tokenizer vocabulary from the"
            " teacher's: it could not read the tokenized data"
        )
    return load_base_classifier(name_or_path, labels, task)


def _check_weights(temperature: float, alpha: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def distillation_terms(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    temperature: float,
    class_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(T^2 * KL(teacher_T || student_T) per scored position, cross-entropy with the labels).

    A position is an example, or a labelled token of a token classifier ([batch, seq, labels]
    logits; IGNORE_INDEX labels are left out of both terms). Logits are compared in float32; no
    gradient reaches the teacher's logits. `class_weights` weigh the cross-entropy only.
    """
    student, _ = labelled_positions(student_logits.float(), labels)
    teacher, _ = labelled_positions(teacher_logits.detach().float(), labels)
    kd = F.kl_div(
        F.log_softmax(student / temperature, dim=-1),
        F.log_softmax(teacher / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return temperature**2 * kd, cross_entropy(student_logits, labels, class_weights)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    temperature: float,
    alpha: float,
) -> Tensor:
    """alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE."""
    _check_weights(temperature, alpha)
    kd, ce = distillation_terms(student_logits, teacher_logits, labels, temperature)
    return alpha * kd + (1 - alpha) * ce


def hidden_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """The teacher layer whose output each student layer learns to reproduce.

    Student layer j ends the j-th of `student_layers` equal spans of the teacher's depth
    (3 of 6: teacher layers 1, 3, 5), so the last layers always correspond.
    """
    return [round((j + 1) * teacher_layers / student_layers) - 1 for j in range(student_layers)]


def hidden_state_loss(
    student_states: Sequence[Tensor], teacher_states: Sequence[Tensor], attention_mask: Tensor
) -> Tensor:
    """Mean squared distance of L2-normalised token states over the mapped layer pairs.

    `*_states` are the encoder layer outputs, one per layer (`hidden_states[1:]` of every family:
    embeddings excluded; ModernBERT's last after its final norm); padding tokens are left out.
    Each pair contributes at most 4 per token, so the term stays on the scale of the KD loss.
    """
    layers = hidden_layer_map(len(student_states), len(teacher_states))
    keep = attention_mask.bool()
    distances = [
        (
            F.normalize(student.float()[keep], dim=-1)
            - F.normalize(teacher_states[layer].detach().float()[keep], dim=-1)
        )
        .pow(2)
        .sum(-1)
        .mean()
        for student, layer in zip(student_states, layers, strict=True)
    ]
    return torch.stack(distances).mean()


class DistillationClassifier(ClassifierModule):
    """ClassifierModule training its model (the student) against a frozen teacher.

    The teacher is held outside the module tree: it is not optimized, not saved in
    checkpoints, not moved by Lightning (done in `on_fit_start`) and stays in eval mode.
    With `adversarial`, the student reads perturbed embeddings, the teacher the clean ones.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        lr: float,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.0,
        *,
        teacher: PreTrainedModel,
        temperature: float,
        alpha: float,
        hidden_weight: float = 0.0,
        class_weights: Tensor | None = None,
        adversarial: AdversarialConfig | None = None,
    ) -> None:
        super().__init__(
            model, lr, weight_decay, warmup_ratio, class_weights, adversarial=adversarial
        )
        _check_weights(temperature, alpha)
        if hidden_weight < 0:
            raise ValueError(f"hidden_weight must be >= 0, got {hidden_weight}")
        if hidden_weight and teacher.config.hidden_size != model.config.hidden_size:
            raise ValueError(
                f"hidden-state distillation needs the student's hidden size"
                f" ({model.config.hidden_size}) to equal the teacher's"
                f" ({teacher.config.hidden_size})"
            )
        if teacher is model:
            raise ValueError("the teacher and the student must be different models")
        if teacher.config.id2label != model.config.id2label:
            raise ValueError(
                f"teacher labels {teacher.config.id2label} differ from the student's"
                f" {model.config.id2label}"
            )
        self._teacher = (teacher.requires_grad_(False).eval(),)
        self.temperature = temperature
        self.alpha = alpha
        self.hidden_weight = hidden_weight

    @property
    def teacher(self) -> PreTrainedModel:
        """The frozen teacher (deliberately not a registered submodule)."""
        return self._teacher[0]

    def on_fit_start(self) -> None:
        """Put the teacher on the student's device and dtype, in eval mode."""
        self.teacher.to(device=self.device, dtype=self.dtype).eval()

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> LossTerms:
        """A student pass over `batch` against the teacher's (run once, here): the KD and
        cross-entropy (and hidden-state) terms and their mix as `loss`."""
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        states = {"output_hidden_states": True} if self.hidden_weight else {}
        with torch.no_grad():
            teacher = self.teacher(**inputs, **states)

        def student_terms() -> dict[str, Tensor]:
            student = self.model(**inputs, **states)
            kd, ce = distillation_terms(
                student.logits,
                teacher.logits,
                batch["labels"],
                self.temperature,
                self.class_weights,
            )
            terms = {"loss": self.alpha * kd + (1 - self.alpha) * ce, "kd_loss": kd, "ce_loss": ce}
            if self.hidden_weight:
                hidden = hidden_state_loss(
                    student.hidden_states[1:], teacher.hidden_states[1:], inputs["attention_mask"]
                )
                terms["loss"] = terms["loss"] + self.hidden_weight * hidden
                terms["hidden_loss"] = hidden
            return terms

        return student_terms

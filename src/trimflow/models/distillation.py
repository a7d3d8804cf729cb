"""Knowledge distillation (Hinton et al., 2015): students, the KD loss and its LightningModule.

A student is either a shallower copy of the teacher (`student_from_teacher`, layers picked from
the teacher's encoder) or a smaller pretrained encoder sharing the teacher's vocabulary
(`student_from_pretrained`). `DistillationClassifier` trains it on a mix of the teacher's
softened predictions and the labels, optionally also matching the teacher's hidden states
layer by layer (Sun et al., 2019, "Patient KD"; here every token's state, not only [CLS]); the
teacher is frozen and kept out of the module tree, so optimizer, checkpoints and `state_dict`
hold the student only.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trimflow.compress.pruned import is_structurally_pruned
from trimflow.models.loading import load_base_classifier, load_tokenizer
from trimflow.models.module import ClassifierModule, cross_entropy, labelled_positions


def _layer_list(model: PreTrainedModel) -> str:
    """Qualified name of the encoder's ModuleList of `num_hidden_layers` layers."""
    count = model.config.num_hidden_layers
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == count
    ]
    if len(names) != 1:
        raise ValueError(f"cannot locate the {count} encoder layers of {type(model).__name__}")
    return names[0]


def _check_layers(layers: Sequence[int], teacher_layers: int) -> None:
    """Layers must be a non-empty, duplicate-free, in-range strict subset of the teacher's."""
    if not layers:
        raise ValueError("layers must name at least one teacher layer, got []")
    for layer in layers:
        if not 0 <= layer < teacher_layers:
            raise ValueError(f"layer {layer} out of range: the teacher has {teacher_layers}")
    duplicates = sorted(layer for layer, count in Counter(layers).items() if count > 1)
    if duplicates:
        raise ValueError(f"layers must be unique, got {duplicates} more than once")
    if len(layers) >= teacher_layers:
        raise ValueError(
            f"a student needs fewer layers than the teacher's {teacher_layers}, got {list(layers)}"
        )


def _teacher_key(key: str, prefix: str, layers: Sequence[int]) -> str:
    """The teacher state-dict key a student key is copied from (layer j <- layers[j])."""
    if not key.startswith(prefix):
        return key
    index, rest = key[len(prefix) :].split(".", 1)
    return f"{prefix}{layers[int(index)]}.{rest}"


def _copied_state(
    student: PreTrainedModel, teacher: PreTrainedModel, layers: Sequence[int]
) -> dict[str, Tensor]:
    """The student's state dict filled from the teacher, shapes checked."""
    prefix = f"{_layer_list(teacher)}."
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
    copied from the teacher. The teacher must be unpruned; the student is in eval mode.
    """
    if is_structurally_pruned(teacher.config):
        raise ValueError(
            "the teacher is structurally pruned (heads or FFN widths): use an unpruned one"
        )
    _check_layers(layers, teacher.config.num_hidden_layers)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    student = type(teacher)(config)
    student.load_state_dict(_copied_state(student, teacher, layers))
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

    `*_states` are the encoder layer outputs (embeddings excluded); padding tokens are left out.
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
    ) -> None:
        super().__init__(model, lr, weight_decay, warmup_ratio, class_weights)
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

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """KD + cross-entropy (+ hidden-state) loss of a batch, each term logged."""
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        states = {"output_hidden_states": True} if self.hidden_weight else {}
        student = self.model(**inputs, **states)
        with torch.no_grad():
            teacher = self.teacher(**inputs, **states)
        kd, ce = distillation_terms(
            student.logits, teacher.logits, batch["labels"], self.temperature, self.class_weights
        )
        loss = self.alpha * kd + (1 - self.alpha) * ce
        size = batch["labels"].shape[0]
        if self.hidden_weight:
            hidden = hidden_state_loss(
                student.hidden_states[1:], teacher.hidden_states[1:], inputs["attention_mask"]
            )
            loss = loss + self.hidden_weight * hidden
            self.log("train/hidden_loss", hidden, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/kd_loss", kd, batch_size=size)
        self.log("train/ce_loss", ce, batch_size=size)
        return loss

"""Knowledge distillation: students copied from the teacher, the KD loss and its training."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_LABELS, build_tiny_bert, quiet_trainer
from pydantic import ValidationError
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    BertTokenizerFast,
)

from trimflow.compress.structured import prune_heads
from trimflow.config.schema import StudentConfig, TrainerConfig
from trimflow.models.distillation import (
    DistillationClassifier,
    distillation_loss,
    hidden_layer_map,
    hidden_state_loss,
    student_from_pretrained,
    student_from_teacher,
)
from trimflow.models.training import LAST_CHECKPOINT, fit_resumable


def deep_teacher(num_layers: int = 4) -> BertForSequenceClassification:
    """A tiny BERT classifier with `num_layers` encoder layers."""
    config = build_tiny_bert().config
    config.num_hidden_layers = num_layers
    torch.manual_seed(1)
    return BertForSequenceClassification(BertConfig.from_dict(config.to_dict())).eval()


def same_weights(left: torch.nn.Module, right: torch.nn.Module) -> bool:
    left_state, right_state = left.state_dict(), right.state_dict()
    return left_state.keys() == right_state.keys() and all(
        torch.equal(left_state[key], right_state[key]) for key in left_state
    )


def random_batches(count: int = 4, size: int = 4, length: int = 12, seed: int = 0) -> list[dict]:
    """Dict batches of random token ids with labels."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(1000, 2000, (size, length), generator=generator),
            "attention_mask": torch.ones(size, length, dtype=torch.long),
            "labels": torch.randint(0, len(TINY_LABELS), (size,), generator=generator),
        }
        for _ in range(count)
    ]


def fit(module: L.LightningModule, batches: list[dict], steps: int) -> None:
    quiet_trainer(max_steps=steps).fit(
        module, train_dataloaders=DataLoader(batches, batch_size=None)
    )


def kl_to_teacher(student, teacher, batches: list[dict]) -> float:
    """Mean KL(teacher || student) of the predicted label distributions, in eval mode."""
    student.eval()
    with torch.no_grad():
        total = 0.0
        for batch in batches:
            inputs = {key: value for key, value in batch.items() if key != "labels"}
            total += F.kl_div(
                F.log_softmax(student(**inputs).logits, dim=-1),
                F.log_softmax(teacher(**inputs).logits, dim=-1),
                reduction="batchmean",
                log_target=True,
            ).item()
    return total / len(batches)


def module_for(
    student, teacher, alpha: float = 0.5, lr: float = 1e-3, hidden_weight: float = 0.0
) -> DistillationClassifier:
    return DistillationClassifier(
        student, lr=lr, teacher=teacher, temperature=2.0, alpha=alpha, hidden_weight=hidden_weight
    )


def hidden_distance(student, teacher, batches: list[dict]) -> float:
    """Mean hidden-state term between student and teacher, in eval mode."""
    student.eval()
    with torch.no_grad():
        return sum(
            hidden_state_loss(
                student(**inputs, output_hidden_states=True).hidden_states[1:],
                teacher(**inputs, output_hidden_states=True).hidden_states[1:],
                inputs["attention_mask"],
            ).item()
            for inputs in ({k: v for k, v in b.items() if k != "labels"} for b in batches)
        ) / len(batches)


# --- students copied from the teacher ---------------------------------------------------------


@pytest.mark.parametrize(
    "spec", [{}, {"layers": [0], "layer_fraction": 0.5}, {"num_layers": 2, "model": "x"}]
)
def test_a_student_sets_exactly_one_kind(spec):
    with pytest.raises(ValidationError, match="exactly one of layers, num_layers, layer_fraction"):
        StudentConfig(**spec)


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ({"layer_fraction": 1.0}, "layer_fraction"),
        ({"layer_fraction": 0.0}, "layer_fraction"),
        ({"num_layers": 0}, "num_layers"),
        ({"layers": []}, "layers"),
    ],
)
def test_empty_or_whole_depth_students_are_refused_by_the_schema(spec, key):
    with pytest.raises(ValidationError, match=key):
        StudentConfig(**spec)


def test_student_copies_embeddings_chosen_layer_and_head(tiny_bert, tiny_batches):
    student = student_from_teacher(tiny_bert, [1])
    assert type(student) is type(tiny_bert)
    assert student.config.num_hidden_layers == 1 and len(student.bert.encoder.layer) == 1
    assert same_weights(student.bert.encoder.layer[0], tiny_bert.bert.encoder.layer[1])
    for part in ("embeddings", "pooler"):
        assert same_weights(getattr(student.bert, part), getattr(tiny_bert.bert, part))
    assert same_weights(student.classifier, tiny_bert.classifier)
    assert student.config.id2label == tiny_bert.config.id2label
    assert torch.isfinite(student(**tiny_batches[0]).logits).all()


@pytest.mark.parametrize("layers", [[0, 2], [3, 1]])
def test_student_keeps_the_chosen_layers_in_order(layers):
    teacher = deep_teacher(4)
    student = student_from_teacher(teacher, layers)
    assert len(student.bert.encoder.layer) == len(layers)
    for position, layer in enumerate(layers):
        assert same_weights(student.bert.encoder.layer[position], teacher.bert.encoder.layer[layer])


@pytest.mark.parametrize(
    ("layers", "named"),
    [
        ([], r"\[\]"),
        ([0, 5], "layer 5"),
        ([-1], "layer -1"),
        ([1, 1], r"\[1\]"),
        ([0, 1, 2, 3], r"\[0, 1, 2, 3\]"),
    ],
)
def test_bad_layer_lists_are_refused_by_value(layers, named):
    with pytest.raises(ValueError, match=named):
        student_from_teacher(deep_teacher(4), layers)


def test_pruned_or_uneven_teacher_is_refused(tiny_bert):
    tiny_bert.config.intermediate_sizes = [32, 64]
    with pytest.raises(ValueError, match="structurally pruned"):
        student_from_teacher(tiny_bert, [1])
    del tiny_bert.config.intermediate_sizes
    prune_heads(tiny_bert, {0: [1]})
    with pytest.raises(ValueError, match="structurally pruned"):
        student_from_teacher(tiny_bert, [0])
    del tiny_bert.config.pruned_heads
    with pytest.raises(ValueError, match="shape"):
        student_from_teacher(tiny_bert, [0])


def test_saved_student_reloads_with_identical_logits(tiny_bert, tiny_batches, tmp_path):
    student = student_from_teacher(tiny_bert, [0])
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 1
    with torch.no_grad():
        assert torch.equal(student(**tiny_batches[0]).logits, reloaded(**tiny_batches[0]).logits)


# --- students from a smaller pretrained encoder -----------------------------------------------


def test_pretrained_student_with_the_teacher_vocabulary(tiny_encoder_dir, packaged_tokenizer):
    student = student_from_pretrained(str(tiny_encoder_dir), TINY_LABELS, packaged_tokenizer)
    assert student.config.num_labels == 3 and student.config.id2label[2] == "gamma"


def test_pretrained_student_with_another_vocabulary_is_refused(tmp_path, packaged_tokenizer):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "oil", "wheat"]))
    model_dir = tmp_path / "other-vocab"
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(model_dir)
    config = build_tiny_bert().config
    config.vocab_size = 7
    BertModel(config).save_pretrained(model_dir)
    with pytest.raises(ValueError, match=r"other-vocab has a different tokenizer vocabulary"):
        student_from_pretrained(str(model_dir), TINY_LABELS, packaged_tokenizer)


# --- the loss -----------------------------------------------------------------------------------


@pytest.fixture
def logits():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(6, 3, generator=generator)
    teacher = torch.randn(6, 3, generator=generator) * 3
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    return student, teacher, labels


def test_alpha_zero_is_cross_entropy(logits):
    student, teacher, labels = logits
    loss = distillation_loss(student, teacher, labels, temperature=3.0, alpha=0.0)
    assert torch.allclose(loss, F.cross_entropy(student, labels))


def test_alpha_one_is_scaled_kl_of_softened_distributions(logits):
    student, teacher, labels = logits
    temperature = 2.5
    p_teacher = torch.softmax(teacher / temperature, dim=-1)
    log_p_student = torch.log_softmax(student / temperature, dim=-1)
    kl = (p_teacher * (p_teacher.log() - log_p_student)).sum(dim=-1).mean()
    loss = distillation_loss(student, teacher, labels, temperature=temperature, alpha=1.0)
    assert torch.allclose(loss, temperature**2 * kl)


def test_kd_term_vanishes_when_student_matches_teacher(logits):
    _, teacher, labels = logits
    loss = distillation_loss(teacher.clone(), teacher, labels, temperature=2.0, alpha=1.0)
    assert loss.abs().item() < 1e-6


def test_gradient_reaches_the_student_only(logits):
    student, teacher, labels = (tensor.clone() for tensor in logits)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    distillation_loss(student, teacher, labels, temperature=2.0, alpha=0.5).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


@pytest.mark.parametrize(
    ("temperature", "alpha"), [(0.0, 0.5), (-1.0, 0.5), (1.0, 1.5), (1.0, -0.1)]
)
def test_bad_temperature_or_alpha_is_refused(logits, temperature, alpha):
    with pytest.raises(ValueError, match=str(temperature if temperature <= 0 else alpha)):
        distillation_loss(*logits, temperature=temperature, alpha=alpha)


# --- the LightningModule ------------------------------------------------------------------------


def test_training_moves_the_student_and_leaves_the_teacher_alone(tiny_bert):
    teacher_before = copy.deepcopy(tiny_bert.state_dict())
    student = student_from_teacher(tiny_bert, [0])
    student_before = copy.deepcopy(student.state_dict())
    module = module_for(student, tiny_bert)
    tiny_bert.train()  # even a teacher switched back to train mode runs in eval mode
    fit(module, random_batches(), steps=4)
    assert all(
        torch.equal(value, teacher_before[key]) for key, value in tiny_bert.state_dict().items()
    )
    assert not all(
        torch.equal(value, student_before[key]) for key, value in student.state_dict().items()
    )
    assert not tiny_bert.training
    assert all(not parameter.requires_grad for parameter in tiny_bert.parameters())
    assert set(module.state_dict()) == {f"model.{key}" for key in student.state_dict()}
    optimized = {id(p) for group in module.optimizers().param_groups for p in group["params"]}
    assert optimized.isdisjoint(id(parameter) for parameter in tiny_bert.parameters())


def test_teacher_with_other_labels_is_refused(tiny_bert):
    with pytest.raises(ValueError, match="teacher labels"):
        module_for(build_tiny_bert(num_labels=2), tiny_bert)


def test_kd_pulls_the_student_towards_the_teacher():
    teacher = build_tiny_bert(seed=0)
    with torch.no_grad():
        teacher.classifier.weight.mul_(100)  # confident, input-dependent teacher predictions
    student = build_tiny_bert(seed=1)
    batches = random_batches(count=2, seed=1)
    before = kl_to_teacher(student, teacher, batches)
    fit(module_for(student, teacher, alpha=1.0, lr=2e-3), batches, steps=30)
    assert kl_to_teacher(student, teacher, batches) < 0.5 * before


def test_checkpoints_hold_the_student_and_resume(tiny_bert, tmp_path):
    class Batches(L.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(random_batches(), batch_size=None)

    trainer_cfg = TrainerConfig(
        accelerator="cpu",
        devices=1,
        strategy="auto",
        num_nodes=1,
        num_workers=0,
        deterministic=False,
        log_every_n_steps=1,
        enable_progress_bar=False,
    )
    student = student_from_teacher(tiny_bert, [1])
    result = fit_resumable(
        module_for(student, tiny_bert),
        Batches(),
        trainer_cfg,
        tmp_path,
        max_epochs=1,
        checkpoint_every_n_steps=2,
    )
    assert result.global_step == 4
    state = torch.load(tmp_path / LAST_CHECKPOINT, map_location="cpu", weights_only=False)
    assert set(state["state_dict"]) == {f"model.{key}" for key in student.state_dict()}
    assert {row["metric"] for row in result.history.rows} >= {
        "train/loss",
        "train/kd_loss",
        "train/ce_loss",
    }
    resumed = fit_resumable(
        module_for(student_from_teacher(tiny_bert, [1]), tiny_bert),
        Batches(),
        trainer_cfg,
        tmp_path,
        max_epochs=2,
        checkpoint_every_n_steps=2,
    )
    assert resumed.resumed_from_step == 4 and resumed.global_step == 8


# --- hidden-state distillation ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("student_layers", "teacher_layers", "expected"),
    [(3, 6, [1, 3, 5]), (2, 6, [2, 5]), (1, 4, [3]), (4, 4, [0, 1, 2, 3]), (2, 3, [1, 2])],
)
def test_each_student_layer_matches_the_end_of_its_span(student_layers, teacher_layers, expected):
    assert hidden_layer_map(student_layers, teacher_layers) == expected


def test_hidden_term_is_zero_on_equal_states_and_ignores_padding():
    generator = torch.Generator().manual_seed(0)
    states = [torch.randn(2, 5, 8, generator=generator) for _ in range(4)]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    mapped = [states[1], states[3]]
    assert hidden_state_loss(mapped, states, mask).item() == pytest.approx(0.0, abs=1e-6)
    # Scaling a state does not matter (normalised); changing a padded position does not either.
    changed = [mapped[0] * 3.0, mapped[1].clone()]
    changed[1][0, 4] = 100.0
    assert hidden_state_loss(changed, states, mask).item() == pytest.approx(0.0, abs=1e-6)
    changed[1][0, 2] = -changed[1][0, 2]  # a real token pointing the opposite way: distance 4
    expected = 4.0 / 8 / 2  # one of 8 kept tokens in one of the 2 layer pairs
    assert hidden_state_loss(changed, states, mask).item() == pytest.approx(expected, rel=1e-5)


def test_hidden_term_pulls_the_student_states_towards_the_teacher():
    teacher = deep_teacher(4)
    batches = random_batches(count=2, seed=2)
    distances = {}
    for weight in (0.0, 10.0):
        student = build_tiny_bert(seed=1)  # 2 layers, unrelated weights
        module = module_for(student, teacher, alpha=1.0, lr=2e-3, hidden_weight=weight)
        fit(module, batches, steps=30)
        distances[weight] = hidden_distance(student, teacher, batches)
    assert distances[10.0] < 0.5 * distances[0.0]
    assert "train/hidden_loss" in module.trainer.logged_metrics


def test_hidden_term_needs_equal_hidden_sizes(tiny_bert):
    config = build_tiny_bert().config.to_dict() | {"hidden_size": 64, "intermediate_size": 64}
    narrow = BertForSequenceClassification(BertConfig.from_dict(config))
    with pytest.raises(ValueError, match="hidden size"):
        module_for(narrow, tiny_bert, hidden_weight=1.0)
    with pytest.raises(ValueError, match="hidden_weight"):
        module_for(student_from_teacher(deep_teacher(4), [0]), deep_teacher(4), hidden_weight=-1)

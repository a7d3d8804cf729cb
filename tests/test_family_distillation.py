"""Layer-dropping distillation for every encoder family, on tiny random models (families.py)."""

from __future__ import annotations

import pytest
import torch
import yaml
from families import FAMILIES, batches_for, build_outside_table, build_tiny, tiny_tokenizer
from helpers import ROOT
from transformers import BertConfig

from trimflow.config.loading import ConfigError
from trimflow.config.schema import StudentConfig
from trimflow.layout import dvc_layout
from trimflow.models.distillation import (
    DistillationClassifier,
    student_from_teacher,
    teacher_layers,
)
from trimflow.models.families import encoder_layers
from trimflow.models.loading import save_model_dir
from trimflow.stages import distill

KEY = "distill.students.s"
# The student conf/distill/default.yaml declares.
DEFAULT_STUDENT = StudentConfig(
    **yaml.safe_load((ROOT / "conf/distill/default.yaml").read_text())["students"]["distilled"]
)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def tokenizer(family):
    return tiny_tokenizer(family)


@pytest.fixture(scope="module")
def teacher(family, tokenizer):
    """A 4-layer classifier of the family."""
    return build_tiny(family, tokenizer=tokenizer, layers=4)


@pytest.fixture(scope="module")
def batch(tokenizer) -> dict[str, torch.Tensor]:
    return batches_for(tokenizer, count=1)[0]


def inputs_of(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in batch.items() if key != "labels"}


def test_default_student_keeps_half_the_teacher_and_reloads_to_the_same_logits(
    teacher, batch, tmp_path
):
    layers = teacher_layers(DEFAULT_STUDENT, teacher.config, KEY)
    assert layers == [0, 2]
    student = student_from_teacher(teacher, layers)
    assert type(student) is type(teacher)
    assert student.config.num_hidden_layers == 2 and len(encoder_layers(student)) == 2
    with torch.no_grad():
        logits = student(**inputs_of(batch)).logits
    assert torch.isfinite(logits).all()
    student.save_pretrained(tmp_path)
    reloaded = type(teacher).from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 2
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs_of(batch)).logits, logits)


def test_a_prefix_student_computes_the_teachers_first_layers(teacher, batch):
    """Copied layers behave as in the teacher: the states before the student's last layer (its
    embeddings and first layers) equal the teacher's."""
    student = student_from_teacher(teacher, [0, 1, 2])
    with torch.no_grad():
        mine = student(**inputs_of(batch), output_hidden_states=True).hidden_states
        theirs = teacher(**inputs_of(batch), output_hidden_states=True).hidden_states
    for own, reference in zip(mine[:-1], theirs, strict=False):
        torch.testing.assert_close(own, reference)


def test_a_training_step_with_the_hidden_term(teacher, batch):
    student = student_from_teacher(teacher, [0, 3]).train()
    for model, depth in ((student, 2), (teacher, 4)):
        with torch.no_grad():
            states = model(**inputs_of(batch), output_hidden_states=True).hidden_states[1:]
        assert len(states) == depth
        assert all(state.shape == (*batch["input_ids"].shape, 32) for state in states)
    losses = {}
    for weight in (0.0, 1.0):
        module = DistillationClassifier(
            student, lr=1e-3, teacher=teacher, temperature=2.0, alpha=0.5, hidden_weight=weight
        )
        torch.manual_seed(0)  # the same dropout for both
        losses[weight] = module.training_step(batch, 0)
    assert torch.isfinite(losses[1.0]) and losses[1.0] > losses[0.0]
    losses[1.0].backward()
    gradients = [parameter.grad for parameter in student.parameters()]
    assert all(torch.isfinite(gradient).all() for gradient in gradients if gradient is not None)
    assert sum(gradient.abs().sum() for gradient in gradients if gradient is not None) > 0
    assert all(parameter.grad is None for parameter in teacher.parameters())


@pytest.mark.parametrize(
    ("depth", "expected"),
    [(6, [0, 2, 4]), (4, [0, 2]), (12, list(range(0, 12, 2))), (24, list(range(0, 24, 2)))],
)
def test_the_default_student_is_every_other_layer_of_any_depth(depth, expected):
    assert teacher_layers(DEFAULT_STUDENT, BertConfig(num_hidden_layers=depth), KEY) == expected


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (dict(num_layers=3), [0, 4, 8]),
        (dict(num_layers=1), [0]),
        (dict(layer_fraction=0.25), [0, 4, 8]),
        (dict(layer_fraction=0.01), [0]),
        (dict(layers=[11, 0]), [11, 0]),
    ],
)
def test_counts_and_fractions_spread_evenly_from_layer_0(spec, expected):
    config = BertConfig(num_hidden_layers=12)
    assert teacher_layers(StudentConfig(**spec), config, KEY) == expected


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        (dict(layers=[0, 5]), "layers: layer 5 out of range: the teacher has 4"),
        (dict(layers=[1, 1]), r"layers: layers must be unique, got \[1\]"),
        (dict(num_layers=4), "num_layers: a student needs fewer layers than the teacher's 4"),
        (dict(layer_fraction=0.9), r"layer_fraction: .* fewer layers .* \[0, 1, 2, 3\]"),
    ],
)
def test_layers_that_do_not_fit_the_teacher_name_the_key(spec, named):
    with pytest.raises(ConfigError, match=f"{KEY}.{named}"):
        teacher_layers(StudentConfig(**spec), BertConfig(num_hidden_layers=4), KEY)


def test_modernbert_students_reindex_layer_types_and_keep_layer_0(tmp_path):
    teacher = build_tiny("modernbert", layers=4)
    assert teacher.config.layer_types == ["full_attention", "sliding_attention"] * 2
    student = student_from_teacher(teacher, [0, 3, 2])
    expected = ["full_attention", "sliding_attention", "full_attention"]
    assert student.config.layer_types == expected
    assert [layer.attention_type for layer in student.model.layers] == expected
    student.save_pretrained(tmp_path)
    assert type(student).from_pretrained(tmp_path).config.layer_types == expected
    with pytest.raises(ConfigError, match=rf"{KEY}.layers: .*layer 0 .*got \[1, 2\]"):
        teacher_layers(StudentConfig(layers=[1, 2]), teacher.config, KEY)
    with pytest.raises(ValueError, match="first layer"):
        student_from_teacher(teacher, [2, 0])


def test_an_unsupported_family_is_named():
    albert = build_outside_table()
    for build in (
        lambda: teacher_layers(DEFAULT_STUDENT, albert.config, KEY),
        lambda: student_from_teacher(albert, [0]),
    ):
        with pytest.raises(ConfigError, match=r"model_type 'albert' \(supported: bert, "):
            build()


@pytest.mark.parametrize(
    ("teacher_family", "overrides", "named"),
    [
        ("albert", [], "distill does not support model_type 'albert'"),
        (
            "bert",
            [
                "~distill.students.distilled.layer_fraction",
                "+distill.students.distilled.layers=[0,5]",
            ],
            "distill.students.distilled.layers: layer 5 out of range",
        ),
    ],
)
def test_the_stage_refuses_before_any_work(tmp_path, tiny_config, teacher_family, overrides, named):
    layout = dvc_layout(tmp_path)
    tokenizer = tiny_tokenizer("bert")
    teacher = build_outside_table() if teacher_family == "albert" else build_tiny("bert", layers=2)
    labels = {"labels": list(teacher.config.label2id), "dataset_digest": "d"}
    save_model_dir(teacher, tokenizer, labels, layout.finetuned)
    with pytest.raises(ConfigError, match=named):
        distill.run(tiny_config(*overrides), layout)
    assert not layout.work.exists() and not layout.model_dir("distilled").exists()

"""Embedding-space adversarial training (FGM, PGD) on tiny models of every family."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from families import FAMILIES, batches_for, build_tiny, tiny_tokenizer
from helpers import build_tiny_bert, build_tiny_tagger, quiet_trainer
from test_training import prepared_layout
from torch.utils.data import DataLoader

from trimflow.config.loading import ConfigError, compose_config
from trimflow.config.schema import AdversarialConfig
from trimflow.data.token_labels import IGNORE_INDEX
from trimflow.models.adversarial import (
    EmbeddingShift,
    adversarial_settings,
    adversarial_terms,
    perturbation,
)
from trimflow.models.distillation import DistillationClassifier, student_from_teacher
from trimflow.models.module import ClassifierModule
from trimflow.stages import finetune

FGM = AdversarialConfig(method="fgm", epsilon=0.5)
PGD = AdversarialConfig(method="pgd", epsilon=0.5, steps=3, alpha=0.3)


def shift_of(model, settings: AdversarialConfig, batch) -> torch.Tensor:
    """The perturbation `settings` give `model`'s embedding output on `batch`, without dropout."""
    loss_of = ClassifierModule(model, lr=1e-3).loss_terms(batch)
    model.eval()
    with EmbeddingShift(model) as shift:
        return perturbation(shift, settings, loss_of()["loss"], loss_of)


def example_norms(delta: torch.Tensor) -> torch.Tensor:
    return delta.flatten(1).norm(dim=1)


def test_the_adversarial_loss_exceeds_the_clean_loss_and_changes_the_training_loss(
    labelled_batches,
):
    model = build_tiny_bert()
    batch = labelled_batches[0]
    loss_of = ClassifierModule(model, lr=1e-3).loss_terms(batch)
    terms = adversarial_terms(model.eval(), FGM, loss_of)  # passes differ by the shift alone
    assert terms["adversarial_loss"] > terms["clean_loss"]
    mean = (terms["clean_loss"] + terms["adversarial_loss"]) / 2
    torch.testing.assert_close(terms["loss"], mean)
    losses = []
    for settings in (None, FGM):
        torch.manual_seed(0)  # the same dropout masks in the clean pass
        module = ClassifierModule(model.train(), lr=1e-3, adversarial=settings)
        losses.append(module.training_step(batch, 0))
    assert losses[1] != losses[0]
    losses[1].backward()
    assert model.classifier.weight.grad.abs().sum() > 0


def test_fgm_shifts_every_example_by_epsilon_and_pgd_stays_within_it(labelled_batches):
    model = build_tiny_bert()
    batch = labelled_batches[0]
    fgm, pgd = (shift_of(model, settings, batch) for settings in (FGM, PGD))
    assert fgm.shape == (*batch["input_ids"].shape, model.config.hidden_size)
    torch.testing.assert_close(example_norms(fgm), torch.full((4,), FGM.epsilon))
    assert (example_norms(pgd) <= PGD.epsilon + 1e-6).all() and not torch.equal(pgd, fgm)
    one_step = AdversarialConfig(method="pgd", epsilon=0.5, steps=1, alpha=0.5)
    torch.testing.assert_close(shift_of(model, one_step, batch), fgm)


def test_frozen_embeddings_are_perturbed_too(labelled_batches):
    """Adapters freeze the embeddings; the shift's gradient does not need theirs."""
    model = build_tiny_bert()
    model.get_input_embeddings().requires_grad_(False)
    delta = shift_of(model, FGM, labelled_batches[0])
    torch.testing.assert_close(example_norms(delta), torch.full((4,), FGM.epsilon))


def test_token_classification_shifts_sentences_with_scored_tokens_only(packaged_tokenizer):
    model = build_tiny_tagger()
    encoded = packaged_tokenizer(
        ["oil prices rose in london", "wheat fell"], padding=True, return_tensors="pt"
    )
    labels = torch.full_like(encoded["input_ids"], IGNORE_INDEX)
    labels[0, 1:4] = torch.tensor([0, 1, 2])  # the second sentence has no scored token
    batch = {**encoded, "labels": labels}
    norms = example_norms(shift_of(model, PGD, batch))
    assert norms[0] == pytest.approx(PGD.epsilon, rel=1e-5) and norms[1] == 0


def test_the_hook_is_gone_after_the_step(labelled_batches):
    model = build_tiny_bert()
    batch = labelled_batches[0]
    ClassifierModule(model, lr=1e-3, adversarial=PGD).training_step(batch, 0)
    assert not model.get_input_embeddings()._forward_hooks


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("task", ["classification", "ner"])
def test_a_training_step_on_every_family(family, task):
    tokenizer = tiny_tokenizer(family)
    model = build_tiny(family, tokenizer=tokenizer, task=task).train()
    batches = batches_for(tokenizer, count=1)
    if task == "ner":  # tag every token but the first, as IOB2 labels 0, 1, 2
        ids = batches[0]["input_ids"]
        tags = torch.arange(ids.numel()).view_as(ids) % 3
        batches[0]["labels"] = tags.masked_fill(batches[0]["attention_mask"] == 0, IGNORE_INDEX)
        batches[0]["labels"][:, 0] = IGNORE_INDEX
    before = [parameter.detach().clone() for parameter in model.parameters()]
    module = ClassifierModule(model, lr=1e-2, adversarial=PGD)
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(module, DataLoader(batches, batch_size=None))
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert metrics["train/adversarial_loss"] != metrics["train/clean_loss"]
    changed = [not torch.equal(b, a) for b, a in zip(before, model.parameters(), strict=True)]
    assert sum(changed) > len(changed) // 2


def test_a_student_reads_perturbed_embeddings_and_the_teacher_clean_ones(labelled_batches):
    teacher = build_tiny_bert()
    student = student_from_teacher(teacher, [1])
    module = DistillationClassifier(
        student, lr=1e-3, teacher=teacher, temperature=2.0, alpha=0.5, adversarial=FGM
    )
    loss_of = module.loss_terms(labelled_batches[0])
    terms = adversarial_terms(student.eval(), FGM, loss_of)
    assert {"kd_loss", "ce_loss", "clean_loss", "adversarial_loss"} <= terms.keys()
    assert terms["adversarial_loss"] > terms["clean_loss"]
    terms["loss"].backward()
    assert student.classifier.weight.grad is not None
    assert all(parameter.grad is None for parameter in teacher.parameters())


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["finetune.adversarial.method=fgm", "finetune.adversarial.epsilon=0"], "epsilon"),
        (["finetune.adversarial.method=pgd", "finetune.adversarial.epsilon=-1"], "epsilon"),
        (["finetune.adversarial.method=fgm", "finetune.adversarial.steps=3"], "steps"),
        (["finetune.adversarial.method=pgd", "finetune.adversarial.steps=3"], "alpha"),
        (["finetune.adversarial.weight=1.5"], "weight"),
    ],
)
def test_a_bad_setting_names_its_key(overrides, named):
    with pytest.raises(ConfigError, match=r"finetune\.adversarial(.|\n)*" + named):
        compose_config(overrides)


def test_the_stage_records_the_settings_and_both_losses(tiny_config, tmp_path):
    cfg = tiny_config("finetune.adversarial.method=fgm", "finetune.adversarial.weight=0.3")
    layout = prepared_layout(cfg, tmp_path)
    finetune.run(cfg, layout)
    summary = json.loads((layout.finetuned / "training.json").read_text())
    assert summary["adversarial"] == {
        "method": "fgm",
        "epsilon": 1.0,
        "steps": None,
        "alpha": None,
        "weight": 0.3,
    }
    assert summary["train_s_per_step"] > 0
    history = pd.read_csv(layout.finetuned / "history.csv")
    assert {"train/clean_loss", "train/adversarial_loss"} <= set(history["metric"])


def test_compiled_training_is_refused(tiny_config):
    cfg = tiny_config("finetune.adversarial.method=fgm", "trainer.compile=true")
    with pytest.raises(ConfigError, match=r"finetune\.adversarial\.method.*trainer\.compile"):
        adversarial_settings(cfg)

"""Token classifiers (NER) through every model-side component, as sequence classifiers go.

A tiny BertForTokenClassification is trained, distilled, pruned (structured and magnitude),
quantized (torch and ONNX Runtime), saved, reloaded and scored on word-piece batches built by
`tokenize_words` and padded by `DataCollatorForTokenClassification`.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import build_tiny_bert, quiet_trainer
from seqeval.metrics import f1_score
from torch import Tensor, nn
from torch.utils.data import DataLoader
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertForTokenClassification,
    DataCollatorForTokenClassification,
)

from trimflow.compress.magnitude import MagnitudePruner, make_permanent, sparsity
from trimflow.compress.onnx import OnnxClassifier
from trimflow.compress.quantize import quantize_model, save_quantized, scheme_of
from trimflow.compress.sparse import SPARSE_FILE
from trimflow.compress.structured import StructuredPruner, unit_importance
from trimflow.compress.variants import load_variant, save_onnx_variant, save_sparse_variant
from trimflow.data.token_labels import IGNORE_INDEX, tokenize_words
from trimflow.evaluation.inference import model_inputs, predict_token_logits
from trimflow.evaluation.scoring import EntityScorer
from trimflow.models.distillation import (
    DistillationClassifier,
    distillation_terms,
    student_from_teacher,
)
from trimflow.models.loading import (
    auto_model_class,
    is_token_classifier,
    load_classifier,
    save_model_dir,
)
from trimflow.models.module import ClassifierModule, labelled_positions, validation_metrics

TAGS = ["O", "B-loc", "I-loc", "B-per", "I-per"]
LABEL_MAP = {"labels": TAGS, "dataset": "hand-written", "digest": "none"}
MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask", "labels")
# Word lists with IOB2 tags; several words split into word pieces ("schwarz ##ene ##gger").
SENTENCES = [
    (["Angela", "Merkel", "visited", "Paris"], ["B-per", "I-per", "O", "B-loc"]),
    (
        ["Schwarzenegger", "met", "Merkel", "in", "Kuala", "Lumpur", "yesterday"],
        ["B-per", "O", "B-per", "O", "B-loc", "I-loc", "O"],
    ),
    (["Wolfsburg"], ["B-loc"]),
    (["Paris", "and", "Wolfsburg"], ["B-loc", "O", "B-loc"]),
]


# --- helpers -----------------------------------------------------------------------------------


def build_tiny_token_bert(seed: int = 0) -> BertForTokenClassification:
    """The conftest tiny BERT config (hidden 32, 2 layers, 4 heads) with a 5-tag token head."""
    config = build_tiny_bert().config
    config.num_labels = len(TAGS)
    config.id2label = dict(enumerate(TAGS))
    config.label2id = {tag: i for i, tag in enumerate(TAGS)}
    torch.manual_seed(seed)
    return BertForTokenClassification(config).eval()


def trained_like(model: nn.Module) -> nn.Module:
    """Perturb every weight so that logits are not all near zero, as after fine-tuning."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def encode(
    tokenizer, sentences, labels: list[str] = TAGS, max_length: int = 32
) -> tuple[list[dict], dict]:
    """Per sentence, the model-input features (aligned labels), and tokenize_words' columns."""
    words = [tokens for tokens, _ in sentences]
    tag_ids = [[labels.index(tag) for tag in tags] for _, tags in sentences]
    columns, _ = tokenize_words(words, tag_ids, tokenizer, max_length, labels, False)
    features = [{key: columns[key][row] for key in MODEL_INPUTS} for row in range(len(sentences))]
    return features, columns


def collate(tokenizer, features: list[dict]) -> dict[str, Tensor]:
    """Pad like the data module does: labels padded with IGNORE_INDEX."""
    return dict(DataCollatorForTokenClassification(tokenizer)(features))


@pytest.fixture
def token_batches(packaged_tokenizer) -> list[dict[str, Tensor]]:
    """Two padded batches of two sentences (different lengths, both with padding)."""
    features, _ = encode(packaged_tokenizer, SENTENCES)
    return [
        collate(packaged_tokenizer, [features[0], features[1]]),
        collate(packaged_tokenizer, [features[2], features[3]]),
    ]


@pytest.fixture
def all_batch(packaged_tokenizer) -> dict[str, Tensor]:
    """All four sentences in one batch: another batch size and sequence length."""
    features, _ = encode(packaged_tokenizer, SENTENCES)
    return collate(packaged_tokenizer, features)


@pytest.fixture
def token_bert() -> BertForTokenClassification:
    return trained_like(build_tiny_token_bert())


@pytest.fixture
def token_dir(tmp_path, token_bert, packaged_tokenizer):
    """save_model_dir of the token model: the source of every variant."""
    path = tmp_path / "token-bert"
    save_model_dir(token_bert, packaged_tokenizer, LABEL_MAP, path)
    return path


def logits(model, batch: dict[str, Tensor]) -> Tensor:
    with torch.inference_mode():
        return model(**model_inputs(batch)).logits


def labelled(batch: dict[str, Tensor]) -> Tensor:
    """The [batch, seq] mask of scored tokens (first word pieces)."""
    return batch["labels"] != IGNORE_INDEX


def argmax_agreement(a: Tensor, b: Tensor, batch: dict[str, Tensor]) -> float:
    """Share of real (non-padding) tokens whose arg-max tags agree."""
    real = batch["attention_mask"].bool()
    return (a.argmax(-1) == b.argmax(-1))[real].float().mean().item()


def assert_token_logits(output: Tensor, batch: dict[str, Tensor]) -> None:
    assert output.shape == (*batch["input_ids"].shape, len(TAGS))


# --- the batches themselves --------------------------------------------------------------------


def test_batches_label_first_word_pieces_and_ignore_specials_and_padding(
    token_batches, packaged_tokenizer
):
    """Sanity of the test data: -100 on [CLS]/[SEP]/padding/later pieces, tags elsewhere."""
    first = token_batches[0]
    assert first["input_ids"].shape == first["labels"].shape
    pad = first["attention_mask"] == 0
    assert pad.any() and (first["labels"][pad] == IGNORE_INDEX).all()
    tokens = packaged_tokenizer.convert_ids_to_tokens(first["input_ids"][0].tolist())
    row = first["labels"][0].tolist()
    assert tokens[:5] == ["[CLS]", "angela", "mer", "##kel", "visited"]
    assert row[:7] == [-100, 3, 4, -100, 0, 1, -100]  # B-per I-per (##kel) O B-loc [SEP]
    assert int(labelled(first).sum()) == 4 + 7


# --- 1. head detection and loading -------------------------------------------------------------


def test_token_head_is_detected_and_reloads_with_identical_logits(
    token_bert, token_dir, tmp_path, packaged_tokenizer, token_batches
):
    """is_token_classifier / auto_model_class tell the heads apart; load_classifier round trips."""
    sequence = build_tiny_bert()
    assert is_token_classifier(token_bert)
    assert not is_token_classifier(sequence)
    save_model_dir(sequence, packaged_tokenizer, LABEL_MAP, tmp_path / "sequence")

    config = AutoConfig.from_pretrained(token_dir)
    assert auto_model_class(config) is AutoModelForTokenClassification
    sequence_config = AutoConfig.from_pretrained(tmp_path / "sequence")
    assert auto_model_class(sequence_config) is AutoModelForSequenceClassification

    reloaded = load_classifier(token_dir)
    assert type(reloaded) is BertForTokenClassification and not reloaded.training
    assert reloaded.config.id2label == dict(enumerate(TAGS))
    for batch in token_batches:
        assert_token_logits(logits(reloaded, batch), batch)
        assert torch.equal(logits(reloaded, batch), logits(token_bert, batch))


# --- 2. ClassifierModule ------------------------------------------------------------------------


def test_validation_metrics_of_a_token_head_are_entity_f1_and_token_accuracy(token_bert):
    assert set(validation_metrics(token_bert)) == {"f1", "token_accuracy"}
    assert set(validation_metrics(build_tiny_bert())) == {"accuracy", "macro_f1"}
    assert ClassifierModule(token_bert, lr=1e-3).main_metric == "f1"


def test_fit_logs_entity_f1_and_token_accuracy_of_the_trained_model(token_batches):
    """val/f1 and val/token_accuracy after fit equal seqeval / hand-made scores of the model."""
    module = ClassifierModule(build_tiny_token_bert(), lr=5e-3)
    val = token_batches[0]
    trainer = quiet_trainer(max_steps=3, limit_val_batches=1, num_sanity_val_steps=0)
    # Three training batches: the epoch (and its validation) ends at the last step.
    trainer.fit(
        module,
        train_dataloaders=DataLoader([token_batches[1]] * 3, batch_size=None),
        val_dataloaders=DataLoader([val], batch_size=None),
    )
    metrics = trainer.callback_metrics
    assert {"train/loss", "val/loss", "val/f1", "val/token_accuracy"} <= set(metrics)

    predicted = logits(module.model.eval(), val).argmax(-1)
    keep = labelled(val)
    accuracy = (predicted[keep] == val["labels"][keep]).float().mean()
    torch.testing.assert_close(metrics["val/token_accuracy"], accuracy)
    gold_tags = [
        [TAGS[t] for t in row[mask]] for row, mask in zip(val["labels"], keep, strict=True)
    ]
    pred_tags = [[TAGS[p] for p in row[mask]] for row, mask in zip(predicted, keep, strict=True)]
    expected_f1 = f1_score(gold_tags, pred_tags, zero_division=0)
    assert metrics["val/f1"].item() == pytest.approx(expected_f1, abs=1e-6)


def test_training_steps_lower_the_token_loss(token_batches):
    """A few AdamW steps on one batch reduce its token-level cross-entropy."""
    batch = token_batches[0]
    module = ClassifierModule(build_tiny_token_bert(), lr=1e-2)
    module.model.eval()  # no dropout: the loss is a function of the weights only
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)

    def loss() -> Tensor:
        return module(**batch).loss

    before = loss().item()
    for _ in range(5):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    after = loss().item()
    assert np.isfinite(before) and after < 0.8 * before


# --- 3. distillation ---------------------------------------------------------------------------


def test_labelled_positions_keep_only_labelled_tokens_in_order(token_batches):
    batch = token_batches[0]
    labels = batch["labels"]
    scores = torch.randn(*labels.shape, len(TAGS))

    kept_logits, kept_labels = labelled_positions(scores, labels)

    rows = [(b, t) for b in range(labels.shape[0]) for t in range(labels.shape[1])]
    rows = [(b, t) for b, t in rows if labels[b, t] != IGNORE_INDEX]
    assert kept_logits.shape == (len(rows), len(TAGS))
    assert torch.equal(kept_logits, torch.stack([scores[b, t] for b, t in rows]))
    assert kept_labels.tolist() == [labels[b, t].item() for b, t in rows]


def test_distillation_terms_on_tokens_equal_the_2d_terms_of_labelled_positions(token_batches):
    """3-D terms = 2-D terms of the labelled tokens; ignored positions have no influence."""
    labels = token_batches[0]["labels"]
    keep = labels != IGNORE_INDEX
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(*labels.shape, len(TAGS), generator=generator)
    teacher = torch.randn(*labels.shape, len(TAGS), generator=generator)
    temperature = 2.0

    kd, ce = distillation_terms(student, teacher, labels, temperature)

    kd_2d, ce_2d = distillation_terms(student[keep], teacher[keep], labels[keep], temperature)
    torch.testing.assert_close(kd, kd_2d)
    torch.testing.assert_close(ce, ce_2d)
    # Independently: CE ignoring -100, and T^2 * KL averaged over labelled tokens only.
    torch.testing.assert_close(ce, F.cross_entropy(student.transpose(1, 2), labels))
    p_teacher = F.softmax(teacher[keep] / temperature, -1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(student[keep] / temperature, -1))).sum(-1)
    torch.testing.assert_close(kd, temperature**2 * kl.mean())
    # Garbage at padding / special tokens changes nothing.
    noisy_student, noisy_teacher = student.clone(), teacher.clone()
    noisy_student[~keep] = 1e3
    noisy_teacher[~keep] = -1e3
    noisy = distillation_terms(noisy_student, noisy_teacher, labels, temperature)
    torch.testing.assert_close(noisy, (kd, ce))


def test_student_of_a_token_teacher_is_a_token_classifier(token_bert, token_batches):
    student = student_from_teacher(token_bert, [0])

    assert type(student) is BertForTokenClassification and is_token_classifier(student)
    assert student.config.num_hidden_layers == 1
    assert torch.equal(student.classifier.weight, token_bert.classifier.weight)
    assert_token_logits(logits(student, token_batches[0]), token_batches[0])


def test_distillation_training_step_on_tokens_returns_the_mixed_finite_loss(
    token_bert, token_batches
):
    student = student_from_teacher(token_bert, [1])
    module = DistillationClassifier(
        student, lr=1e-3, teacher=token_bert, temperature=2.0, alpha=0.3
    )
    module.model.eval()  # no dropout, so the loss can be recomputed exactly
    batch = token_batches[0]

    loss = module.training_step(batch, 0)

    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
    kd, ce = distillation_terms(
        logits(student, batch), logits(token_bert, batch), batch["labels"], 2.0
    )
    torch.testing.assert_close(loss.detach(), 0.3 * kd + 0.7 * ce)
    loss.backward()
    assert student.classifier.weight.grad is not None
    assert token_bert.classifier.weight.grad is None


# --- 4. structured pruning ---------------------------------------------------------------------


def test_structured_pruning_of_a_token_model_saves_and_reloads(
    token_bert, token_batches, packaged_tokenizer, tmp_path, all_batch
):
    """Heads and FFN neurons scored on token batches are removed; load_variant rebuilds them."""
    heads, neurons = unit_importance(token_bert, token_batches)
    assert heads.shape == (2, 4) and neurons.shape == (2, 64)
    assert torch.isfinite(heads).all() and (heads > 0).any() and (neurons > 0).any()

    pruner = StructuredPruner(token_bert, heads, neurons, heads_fraction=0.25, ffn_fraction=0.5)
    pruner.set_progress(1.0)
    masked = logits(token_bert, all_batch)
    pruner.finalize(token_bert)

    layers = token_bert.bert.encoder.layer
    assert sum(layer.attention.self.num_attention_heads for layer in layers) == 8 - 2
    assert sum(token_bert.config.intermediate_sizes) == 128 - 64
    torch.testing.assert_close(logits(token_bert, all_batch), masked, atol=1e-5, rtol=0)

    save_model_dir(token_bert, packaged_tokenizer, LABEL_MAP, tmp_path / "pruned")
    reloaded = load_variant(tmp_path / "pruned")

    assert type(reloaded) is BertForTokenClassification and not reloaded.training
    for ours, theirs in zip(layers, reloaded.bert.encoder.layer, strict=True):
        assert theirs.attention.self.query.weight.shape == ours.attention.self.query.weight.shape
        assert theirs.intermediate.dense.weight.shape == ours.intermediate.dense.weight.shape
    for batch in [*token_batches, all_batch]:
        assert_token_logits(logits(reloaded, batch), batch)
        assert torch.equal(logits(reloaded, batch), logits(token_bert, batch))


# --- 5. magnitude pruning ----------------------------------------------------------------------


def test_magnitude_pruned_token_model_round_trips_through_the_sparse_format(
    token_bert, token_batches, packaged_tokenizer, tmp_path
):
    MagnitudePruner(token_bert, 0.5).set_progress(1.0)
    make_permanent(token_bert)
    assert sparsity(token_bert) == pytest.approx(0.5, abs=1e-3)

    out = tmp_path / "sparse"
    save_sparse_variant(token_bert, packaged_tokenizer, LABEL_MAP, out)
    reloaded = load_variant(out)

    assert sorted(path.name for path in out.glob("*.safetensors")) == [SPARSE_FILE]
    assert type(reloaded) is BertForTokenClassification and not reloaded.training
    assert sparsity(reloaded) == pytest.approx(0.5, abs=1e-3)
    for batch in token_batches:
        assert_token_logits(logits(reloaded, batch), batch)
        assert torch.equal(logits(reloaded, batch), logits(token_bert, batch))


# --- 6. torch dynamic int8 ---------------------------------------------------------------------


def test_dynamic_int8_token_model_keeps_token_logits(
    token_bert, token_dir, token_batches, tmp_path
):
    quantized = quantize_model(token_bert, "dynamic_int8")
    save_quantized(quantized, token_dir, tmp_path / "int8", "dynamic_int8")
    reloaded = load_variant(tmp_path / "int8")

    assert scheme_of(reloaded) == "dynamic_int8" and is_token_classifier(reloaded)
    for batch in token_batches:
        output = logits(reloaded, batch)
        assert_token_logits(output, batch)
        assert torch.equal(output, logits(quantized, batch))
        assert argmax_agreement(output, logits(token_bert, batch), batch) >= 0.8


# --- 7. ONNX -----------------------------------------------------------------------------------


def test_onnx_token_model_has_dynamic_batch_and_sequence_axes(
    token_bert, token_dir, token_batches, all_batch, packaged_tokenizer, tmp_path
):
    """Exported from a 2 x 6 batch, the fp32 graph serves 4 x 12 and 1 x 4 batches like torch."""
    out = tmp_path / "onnx_fp32"
    out.mkdir()  # the quantize stage passes an atomic_dir
    sample = token_batches[1]
    save_onnx_variant(token_bert, token_dir, out, "onnx_fp32", sample, [])
    session = load_variant(out, num_threads=1)
    assert isinstance(session, OnnxClassifier)

    features, _ = encode(packaged_tokenizer, SENTENCES[2:3])
    single = collate(packaged_tokenizer, features)
    shapes = [tuple(batch["input_ids"].shape) for batch in (sample, all_batch, single)]
    assert len({size for size, _ in shapes}) == 3 and len({length for _, length in shapes}) == 3
    for batch in (sample, all_batch, single):
        output = logits(session, batch)
        assert_token_logits(output, batch)
        torch.testing.assert_close(output, logits(token_bert, batch), atol=1e-4, rtol=0)


@pytest.mark.parametrize("scheme", ["onnx_dynamic_int8", "onnx_static_int8"])
def test_onnx_int8_token_models_run_with_token_shapes(
    scheme, token_bert, token_dir, token_batches, all_batch, tmp_path
):
    out = tmp_path / scheme
    out.mkdir()
    save_onnx_variant(token_bert, token_dir, out, scheme, token_batches[0], token_batches)
    session = load_variant(out, num_threads=1)

    for batch in (token_batches[1], all_batch):
        output = logits(session, batch)
        assert_token_logits(output, batch)
        assert torch.isfinite(output).all()
        assert argmax_agreement(output, logits(token_bert, batch), batch) >= 0.8


def test_token_logits_strip_padding_per_sentence(token_bert, all_batch):
    predictions = [row.argmax(-1) for row in predict_token_logits(token_bert, [all_batch])]

    lengths = all_batch["attention_mask"].sum(-1).tolist()
    assert [len(row) for row in predictions] == lengths
    full = logits(token_bert, all_batch).argmax(-1)
    for row, length, prediction in zip(full, lengths, predictions, strict=True):
        assert prediction.tolist() == row[:length].tolist()


# --- 8. entity scoring -------------------------------------------------------------------------

# O deliberately not first: words cut by truncation must be filled with O, not with tag id 0.
SCORER_TAGS = ["B-per", "I-per", "B-loc", "I-loc", "O"]
# What the fake tagger predicts for a word piece (anything else: O).
PIECE_TAGS = {
    "[CLS]": "B-per",  # special tokens: never a word's prediction
    "[SEP]": "B-per",
    "[PAD]": "B-loc",  # padding: stripped
    "angela": "B-per",
    "mer": "I-per",
    "##kel": "B-loc",  # later pieces: never a word's prediction
    "schwarz": "B-per",
    "##ene": "I-loc",
    "##gger": "I-loc",
    "paris": "B-loc",
    "wolf": "B-loc",
    "##sburg": "I-per",
    "and": "B-per",  # a false positive
}


class PieceTagger(nn.Module):
    """A token classifier predicting a fixed tag per vocabulary entry (one-hot logits)."""

    def __init__(self, tokenizer) -> None:
        super().__init__()
        table = torch.full((len(tokenizer),), SCORER_TAGS.index("O"))
        for piece, tag in PIECE_TAGS.items():
            table[tokenizer.convert_tokens_to_ids(piece)] = SCORER_TAGS.index(tag)
        self.register_buffer("table", table)

    def forward(self, input_ids: Tensor, **_: Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=F.one_hot(self.table[input_ids], len(SCORER_TAGS)).float())


def test_entity_scorer_scores_first_pieces_per_word_and_truncated_words_as_o(
    packaged_tokenizer,
):
    # [CLS] schwarz ##ene ##gger met mer ##kel in [SEP]: "Kuala Lumpur yesterday" are cut.
    features, columns = encode(packaged_tokenizer, SENTENCES, SCORER_TAGS, max_length=9)
    assert columns["num_words"][1] == 7 and max(columns["word_ids"][1]) == 3
    lengths = [len(feature["input_ids"]) for feature in features]
    order = np.argsort(lengths, kind="stable")
    assert order.tolist() != sorted(order.tolist())  # batches are not in row order
    batches = [
        collate(packaged_tokenizer, [features[i] for i in order[start : start + 2]])
        for start in range(0, len(order), 2)
    ]
    gold = [tags for _, tags in SENTENCES]
    scorer = EntityScorer(gold, columns["word_ids"], SCORER_TAGS, "default")

    result = scorer.score(PieceTagger(packaged_tokenizer).eval(), batches, order)

    assert result["predictions"] == [
        ["B-per", "I-per", "O", "B-loc"],
        ["B-per", "O", "I-per", "O", "O", "O", "O"],  # truncated words -> O
        ["B-loc"],
        ["B-loc", "B-per", "B-loc"],
    ]
    # 8 gold entities, 8 predicted, 7 right: the cut LOC is missed, "and" is a false PER.
    assert result["f1"] == pytest.approx(7 / 8)
    assert result["f1"] == pytest.approx(f1_score(gold, result["predictions"]))
    assert result["precision"] == pytest.approx(7 / 8) and result["recall"] == pytest.approx(7 / 8)
    # The logits of the words read (their first pieces; the 3 cut words have none), in row
    # order, with the gold ids of those words; their arg-max is the words' predictions.
    read = [tags[:4] if row == 1 else tags for row, tags in enumerate(gold)]
    assert result["logits"].shape == (sum(map(len, read)), len(SCORER_TAGS))
    assert scorer.truth.tolist() == [SCORER_TAGS.index(tag) for tags in read for tag in tags]
    predicted = [tags[: len(kept)] for tags, kept in zip(result["predictions"], read, strict=True)]
    assert [SCORER_TAGS[i] for i in result["logits"].argmax(-1)] == sum(predicted, [])

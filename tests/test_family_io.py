"""Every encoder family through tokenization (texts and tagged words), collation and forward,
ONNX export (fp32 agreeing with torch, dynamic int8 running), serving's tokenization and a
checkpoint head of another size."""

from __future__ import annotations

import logging

import datasets
import pytest
import torch
from families import (
    CORPUS,
    FAMILIES,
    batches_for,
    build_tiny,
    save_tiny_encoder,
    tiny_config,
    tiny_tokenizer,
)
from helpers import logits, perturbed
from transformers import AutoConfig, AutoModel, AutoTokenizer

from trimflow.compress.onnx import (
    OnnxClassifier,
    export_onnx,
    quantize_onnx_dynamic,
    session_fusions,
)
from trimflow.compress.quantize import quantize_model, save_quantized, scheme_of
from trimflow.compress.variants import load_variant
from trimflow.data.datamodule import load_tokenized, make_collator
from trimflow.data.token_labels import IGNORE_INDEX, word_predictions
from trimflow.data.tokenization import tokenize_split, tokenize_tagged_split
from trimflow.models.families import ENCODER_FAMILIES
from trimflow.models.loading import (
    load_base_classifier,
    load_task_tokenizer,
    save_model_dir,
    takes_token_type_ids,
)
from trimflow.serving.pyfunc import VariantModel

CLASSES = ["alpha", "beta", "gamma"]
TAGS = ["O", "B-LOC", "I-LOC", "B-ORG"]
LABELS = {"classification": CLASSES, "ner": TAGS}
TEXTS = CORPUS[:12]
LONG_TEXT = " ".join(CORPUS[:6])  # longer than ModernBERT's window and DeBERTa's buckets
MAX_LENGTH = 100


def tags_of(words: list[str]) -> list[int]:
    """A B-LOC I-LOC entity on words 1-2, a B-ORG on word 4, O elsewhere."""
    return [{1: 1, 2: 2, 4: 3}.get(index, 0) for index in range(len(words))]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def hub_dir(family, tmp_path_factory):
    """A local 'hub' encoder of the family with its tokenizer."""
    return save_tiny_encoder(family, tmp_path_factory.mktemp(family))


@pytest.fixture(scope="module")
def tokenized(family, hub_dir, tmp_path_factory):
    """Per task: the tokenizer and the saved-then-loaded tokenized splits."""
    out = {}
    for task in ("classification", "ner"):
        tokenizer = load_task_tokenizer(str(hub_dir), task)
        if task == "ner":
            words = [text.split() for text in TEXTS]
            data = datasets.Dataset.from_dict(
                {"tokens": words, "tag_ids": [tags_of(w) for w in words]}
            )
            split, _ = tokenize_tagged_split(data, tokenizer, MAX_LENGTH, TAGS, False)
        else:
            data = datasets.Dataset.from_dict({"text": TEXTS, "label_id": [0, 1, 2] * 4})
            split, _ = tokenize_split(data, tokenizer, MAX_LENGTH)
        path = tmp_path_factory.mktemp(f"{family}-{task}")
        datasets.DatasetDict(train=split, validation=split, test=split).save_to_disk(path)
        out[task] = tokenizer, split, load_tokenized(path)[0]["validation"]
    return out


def batches(tokenized, task: str) -> list[dict[str, torch.Tensor]]:
    """The loaded split of `task` collated in padded batches of 4."""
    tokenizer, _, split = tokenized[task]
    collate = make_collator(tokenizer, split, None)
    return [collate([split[i] for i in range(start, start + 4)]) for start in (0, 4, 8)]


def trained_like(family: str, tokenized, task: str):
    """A tiny `task` model of the family, its weights perturbed so logits differ by input."""
    model = build_tiny(family, LABELS[task], task, tokenizer=tokenized[task][0])
    return perturbed(model, 0.1)


def long_batch(tokenizer, task: str) -> dict[str, torch.Tensor]:
    """A long sequence and a short one, padded together."""
    texts = [LONG_TEXT, "oil prices rose"]
    inputs = [text.split() for text in texts] if task == "ner" else texts
    return dict(
        tokenizer(
            inputs,
            is_split_into_words=task == "ner",
            padding=True,
            truncation=True,
            max_length=MAX_LENGTH,
            return_tensors="pt",
        )
    )


def test_tokenized_splits_have_the_family_inputs(family, tokenized):
    segments = ENCODER_FAMILIES[family].token_type_ids
    for tokenizer, split, loaded in tokenized.values():
        assert ("token_type_ids" in split.column_names) == segments
        assert ("token_type_ids" in loaded.column_names) == segments
        assert ("token_type_ids" in tokenizer("some text")) == segments
    assert tokenized["classification"][1]["labels"] == [0, 1, 2] * 4


def test_words_tokenize_as_running_text_and_labels_round_trip(tokenized):
    tokenizer, split, _ = tokenized["ner"]
    for index, text in enumerate(TEXTS):
        words = text.split()
        row = split[index]
        # Each word is read as within a sentence (byte-level BPE: with its leading space).
        assert row["input_ids"] == tokenizer(text)["input_ids"]
        assert sum(label != IGNORE_INDEX for label in row["labels"]) == len(words)
        recovered = word_predictions(row["labels"], row["word_ids"], row["num_words"], fill=-1)
        assert recovered == tags_of(words)


def test_segment_ids_dropped_where_the_model_takes_none(tmp_path):
    # A DistilBERT checkpoint shipped with a BERT tokenizer, which yields token_type_ids.
    tokenizer = tiny_tokenizer("bert")
    AutoModel.from_config(tiny_config("distilbert", tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_task_tokenizer(str(tmp_path))
    assert "token_type_ids" not in loaded("some text")
    loaded.save_pretrained(tmp_path / "saved")
    assert "token_type_ids" not in AutoTokenizer.from_pretrained(tmp_path / "saved")("some text")


def test_student_without_segments_exports_from_data_with_them(tmp_path):
    # A DistilBERT student distilled from a BERT teacher reads the teacher's tokenized data.
    tokenizer = tiny_tokenizer("bert")
    model = perturbed(build_tiny("distilbert", tokenizer=tokenizer), 0.1)
    sample, batch = batches_for(tokenizer)
    assert "token_type_ids" in sample
    export_onnx(model, sample, tmp_path / "student.onnx")
    student = OnnxClassifier(tmp_path / "student.onnx", num_threads=1)
    assert student.input_names == ["input_ids", "attention_mask"]
    torch.testing.assert_close(student(**batch).logits, logits(model, batch), atol=1e-4, rtol=0)


def test_segment_ids_of_a_family_outside_the_table_follow_its_forward():
    assert takes_token_type_ids(AutoConfig.for_model("albert"))
    assert not takes_token_type_ids(AutoConfig.for_model("mpnet"))


@pytest.mark.parametrize("task", ["classification", "ner"])
def test_collated_batches_run_the_model(family, tokenized, task):
    model = trained_like(family, tokenized, task)
    for batch in batches(tokenized, task):
        assert ("token_type_ids" in batch) == ENCODER_FAMILIES[family].token_type_ids
        shape = batch["labels"].shape
        assert logits(model, batch).shape == (*shape, model.config.num_labels)


@pytest.mark.parametrize("task", ["classification", "ner"])
def test_onnx_export_agrees_with_torch_and_quantizes(family, tokenized, task, tmp_path):
    model = trained_like(family, tokenized, task)
    # Traced on 3 tokens without padding, run on padded batches and a long sequence.
    first = batches(tokenized, task)[0]
    sample = {key: value[:1, :3] for key, value in first.items() if key != "labels"}
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    export_onnx(model, sample, fp32)
    quantize_onnx_dynamic(fp32, int8)
    exported, quantized = OnnxClassifier(fp32, num_threads=1), OnnxClassifier(int8, num_threads=1)
    for batch in [*batches(tokenized, task), long_batch(tokenized[task][0], task)]:
        expected = logits(model, batch)
        # Token logits of padding are not predictions (ModernBERT's differ there).
        kept = batch["attention_mask"].bool() if task == "ner" else slice(None)
        got = exported(**batch).logits
        torch.testing.assert_close(got[kept], expected[kept], atol=1e-4, rtol=1e-4)
        int8_logits = quantized(**batch).logits
        assert int8_logits.shape == expected.shape and torch.isfinite(int8_logits).all()
    for name, path in (("fp32", fp32), ("dynamic int8", int8)):
        print(f"{family} {task} {name}: ORT session fusions {dict(session_fusions(path))}")


@pytest.mark.parametrize("scheme", ["dynamic_int8", "dynamic_int8_embeddings"])
def test_torch_int8_saves_and_reloads_to_the_same_logits(family, tokenized, scheme, tmp_path):
    model = trained_like(family, tokenized, "classification")
    source, target = tmp_path / "fp32", tmp_path / scheme
    save_model_dir(
        model, tokenized["classification"][0], {"labels": LABELS["classification"]}, source
    )
    quantized = quantize_model(model, scheme)
    save_quantized(quantized, source, target, scheme)
    reloaded = load_variant(target)
    assert scheme_of(reloaded) == scheme
    for batch in batches(tokenized, "classification"):
        expected = logits(quantized, batch)
        torch.testing.assert_close(logits(reloaded, batch), expected, atol=0, rtol=0)
        assert (expected - logits(model, batch)).abs().max() < 0.1


def test_checkpoint_head_of_other_size_is_reinitialised(family, tokenized, tmp_path, caplog):
    tokenizer, _, _ = tokenized["classification"]
    checkpoint = build_tiny(family, ["negative", "positive"], tokenizer=tokenizer)
    checkpoint.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="trimflow.models.loading"):
        model = load_base_classifier(str(tmp_path), CLASSES)
    assert model.config.num_labels == 3
    assert model.config.id2label == dict(enumerate(CLASSES))
    assert "re-initialised classifier" in caplog.text
    assert "for 3 labels" in caplog.text and "[2, 32] -> [3, 32]" in caplog.text
    encoder = dict(checkpoint.base_model.named_parameters())
    for name, parameter in model.base_model.named_parameters():
        torch.testing.assert_close(parameter, encoder[name])
    batch = batches(tokenized, "classification")[0]
    assert logits(model, batch).shape == (4, 3)


@pytest.mark.parametrize("task", ["classification", "ner"])
def test_served_variant_tokenizes_as_trained(family, tokenized, task, tmp_path):
    tokenizer, split, _ = tokenized[task]
    save_model_dir(
        trained_like(family, tokenized, task), tokenizer, {"labels": LABELS[task]}, tmp_path
    )
    served = VariantModel().load(tmp_path)
    for index, text in enumerate(TEXTS):
        inputs = text.split() if task == "ner" else text
        encoded = served.tokenizer(inputs, is_split_into_words=task == "ner")
        assert encoded["input_ids"] == split[index]["input_ids"]
        assert ("token_type_ids" in encoded) == ENCODER_FAMILIES[family].token_type_ids
    rows = served.predict_texts(TEXTS[:4])
    assert len(rows) == 4

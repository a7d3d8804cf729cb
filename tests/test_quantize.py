"""Quantization schemes on a tiny BERT: round trips, accuracy, size and parameter counts."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import build_tiny_bert
from torch import nn
from transformers import AutoModelForSequenceClassification

from trimflow.compress.onnx import ONNX_QUANTIZERS
from trimflow.compress.openvino import OPENVINO_QUANTIZERS
from trimflow.compress.quantize import (
    STATE_DICT_FILE,
    TORCH_SCHEMES,
    load_quantized,
    quantize_model,
    save_quantized,
    scheme_of,
)
from trimflow.compress.structured import prune_heads
from trimflow.compress.variants import load_variant
from trimflow.config.schemes import QUANTIZE_SCHEMES, RUNTIMES, QuantizeScheme
from trimflow.evaluation.footprint import count_parameters, size_on_disk_mb
from trimflow.evaluation.inference import model_inputs

# Largest |quantized - fp32| logit difference, relative to the largest |fp32| logit.
RELATIVE_TOLERANCE = {
    "dynamic_int8": 0.1,
    "dynamic_int8_embeddings": 0.1,
    "bf16": 0.05,
    "fp16": 0.01,
}
# (low, high) bounds of the state dict size over the fp32 safetensors size. The tiny BERT's
# 30522 x 32 word embedding dominates, so int8 linears alone barely shrink it; int8 embeddings
# keep a float scale and offset per row (8 bytes next to 32), hence ~0.32 rather than 0.25.
SIZE_RATIO = {
    "dynamic_int8": (0.95, 1.0),
    "dynamic_int8_embeddings": (0.25, 0.35),
    "bf16": (0.48, 0.52),
    "fp16": (0.48, 0.52),
}


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return model(**model_inputs(batch)).logits.float()


def saved_size_ratio(quantized_dir, source_dir) -> float:
    return size_on_disk_mb(quantized_dir / STATE_DICT_FILE) / size_on_disk_mb(
        source_dir / "model.safetensors"
    )


@pytest.fixture
def fp32(tiny_model_dir):
    return AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()


def test_every_scheme_of_the_table_has_a_builder_in_its_runtime_and_no_other_does():
    builders = {
        "torch": TORCH_SCHEMES,
        "onnxruntime": ONNX_QUANTIZERS,
        "openvino": OPENVINO_QUANTIZERS,
    }
    assert tuple(builders) == RUNTIMES
    for runtime, registry in builders.items():
        rows = [name for name, scheme in QUANTIZE_SCHEMES.items() if scheme.runtime == runtime]
        assert list(registry) == rows, runtime


def test_a_scheme_names_a_known_runtime():
    with pytest.raises(ValueError, match="runtime 'tensorrt'"):
        QuantizeScheme(runtime="tensorrt")


@pytest.mark.parametrize("scheme", TORCH_SCHEMES)
def test_round_trip_matches_in_memory_model_and_stays_close_to_fp32(
    scheme, fp32, tiny_model_dir, tiny_batches, tmp_path
):
    (tiny_model_dir / "model.onnx").write_bytes(b"onnx")
    quantized = quantize_model(fp32, scheme)

    save_quantized(quantized, tiny_model_dir, tmp_path / scheme, scheme)
    reloaded = load_quantized(tmp_path / scheme)

    names = {path.name for path in (tmp_path / scheme).iterdir()}
    assert {"config.json", "tokenizer.json", STATE_DICT_FILE} <= names
    assert not names & {"model.safetensors", "model.onnx"}
    assert json.loads((tmp_path / scheme / "quantization.json").read_text())["scheme"] == scheme
    assert scheme_of(reloaded) == scheme and not reloaded.training
    for batch in tiny_batches:
        reference = logits(fp32, batch)
        assert torch.equal(logits(reloaded, batch), logits(quantized, batch))
        error = (logits(reloaded, batch) - reference).abs().max()
        assert error <= RELATIVE_TOLERANCE[scheme] * reference.abs().max()
        assert torch.equal(logits(reloaded, batch).argmax(-1), reference.argmax(-1))


@pytest.mark.parametrize("scheme", TORCH_SCHEMES)
def test_weight_file_shrinks_by_the_expected_factor(scheme, fp32, tiny_model_dir, tmp_path):
    save_quantized(quantize_model(fp32, scheme), tiny_model_dir, tmp_path / scheme, scheme)

    low, high = SIZE_RATIO[scheme]
    assert low < saved_size_ratio(tmp_path / scheme, tiny_model_dir) < high


@pytest.mark.parametrize("scheme", TORCH_SCHEMES)
def test_parameter_counts_equal_the_fp32_models(scheme, tiny_bert):
    total, nonzero = count_parameters(tiny_bert)

    quantized_total, quantized_nonzero = count_parameters(quantize_model(tiny_bert, scheme))

    assert quantized_total == total
    assert quantized_nonzero <= nonzero


@pytest.mark.parametrize("scheme", TORCH_SCHEMES)
def test_head_pruned_source_round_trips(
    scheme, tiny_bert, packaged_tokenizer, tiny_batches, tmp_path
):
    prune_heads(tiny_bert, {0: [1]})
    tiny_bert.save_pretrained(tmp_path / "pruned")
    packaged_tokenizer.save_pretrained(tmp_path / "pruned")
    quantized = quantize_model(tiny_bert, scheme)

    save_quantized(quantized, tmp_path / "pruned", tmp_path / scheme, scheme)
    reloaded = load_variant(tmp_path / scheme)

    assert reloaded.bert.encoder.layer[0].attention.self.num_attention_heads == 3
    assert count_parameters(reloaded)[0] == count_parameters(tiny_bert)[0]
    for batch in tiny_batches:
        assert torch.equal(logits(reloaded, batch), logits(quantized, batch))


def test_quantized_embeddings_accept_default_token_types(tiny_bert, tiny_batches):
    quantized = quantize_model(tiny_bert, "dynamic_int8_embeddings")
    batch = tiny_batches[0]
    without_token_types = {key: value for key, value in batch.items() if key != "token_type_ids"}

    assert torch.equal(logits(quantized, without_token_types), logits(quantized, batch))


@pytest.mark.parametrize("scheme", TORCH_SCHEMES)
def test_quantize_model_copies_into_eval_mode(scheme, tiny_bert):
    tiny_bert.train()

    quantized = quantize_model(tiny_bert, scheme)

    assert tiny_bert.training and not quantized.training
    assert scheme_of(tiny_bert) is None and scheme_of(quantized) == scheme


def test_unknown_scheme_is_named_with_the_known_ones(tiny_bert, tiny_model_dir, tmp_path):
    for call in (
        lambda: quantize_model(tiny_bert, "int4"),
        lambda: save_quantized(tiny_bert, tiny_model_dir, tmp_path / "out", "int4"),
    ):
        with pytest.raises(ValueError, match="'int4'") as error:
            call()
        assert all(scheme in str(error.value) for scheme in TORCH_SCHEMES)
    assert not (tmp_path / "out").exists()


def test_save_refuses_a_model_quantized_with_another_scheme(tiny_model_dir, tmp_path):
    bf16 = quantize_model(build_tiny_bert(), "bf16")

    with pytest.raises(ValueError, match="'bf16'"):
        save_quantized(bf16, tiny_model_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()

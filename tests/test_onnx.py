"""ONNX export, ONNX Runtime int8 quantization and the ORT-backed classifier on the tiny BERT."""

from __future__ import annotations

import onnx
import pytest
import torch
from helpers import build_tiny_bert

from trimflow.compress.onnx import (
    OnnxClassifier,
    export_onnx,
    quantize_onnx_dynamic,
    quantize_onnx_static,
    session_fusions,
)
from trimflow.compress.structured import prune_heads
from trimflow.evaluation.footprint import count_parameters
from trimflow.evaluation.inference import model_inputs, predict_logits


def random_batch(batch_size: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens, right-padded to `seq_len` from per-example lengths in [2, seq_len]."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, seq_len + 1, (batch_size,), generator=generator)
    mask = (torch.arange(seq_len)[None] < lengths[:, None]).long()
    ids = torch.randint(1000, 30522, (batch_size, seq_len), generator=generator)
    return {
        "input_ids": ids * mask,
        "attention_mask": mask,
        "token_type_ids": torch.zeros_like(ids),
        "labels": torch.zeros(batch_size, dtype=torch.long),
    }


def trained_like(model):
    """Perturb every weight so that no two tensors are identical, as after fine-tuning."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return model


def torch_logits(model, batch):
    with torch.inference_mode():
        return model(**model_inputs(batch)).logits


def onnx_logits(path, batch):
    with torch.inference_mode():
        return OnnxClassifier(path, num_threads=2)(**batch).logits


@pytest.fixture
def fp32_path(tiny_bert, tmp_path):
    """The tiny BERT exported from a padded batch-2, sequence-6 sample."""
    path = tmp_path / "fp32.onnx"
    sample = random_batch(2, 6, seed=3)
    sample["attention_mask"][1, 3:] = 0
    export_onnx(tiny_bert, sample, path)
    return path


def test_fp32_export_matches_torch_on_other_shapes(tiny_bert, tiny_batches, fp32_path):
    graph = onnx.load(str(fp32_path))
    assert graph.opset_import[0].version >= 17
    assert [value.name for value in graph.graph.input] == [
        "input_ids",
        "attention_mask",
        "token_type_ids",
    ]
    assert [value.name for value in graph.graph.output] == ["logits"]
    assert [dim.dim_param for dim in graph.graph.input[0].type.tensor_type.shape.dim] == [
        "batch",
        "sequence",
    ]
    assert list(fp32_path.parent.iterdir()) == [fp32_path]  # one file, no external data
    for batch in [*tiny_batches, random_batch(7, 40)]:
        expected = torch_logits(tiny_bert, batch)
        torch.testing.assert_close(onnx_logits(fp32_path, batch), expected, atol=1e-4, rtol=0)


def test_session_fuses_gelu_and_scaled_attention_product(tiny_bert, fp32_path):
    # Per layer: the FFN's GELU with its bias, and Q·Kᵀ with its scale. ORT's session optimizer
    # fuses no Attention for the graph (onnxruntime.transformers.optimizer would).
    layers = tiny_bert.config.num_hidden_layers
    fusions = session_fusions(fp32_path)
    assert fusions["BiasGelu"] == fusions["FusedMatMul"] == layers


def test_export_restores_model_state(tmp_path):
    model = build_tiny_bert().train()
    export_onnx(model, random_batch(2, 6), tmp_path / "model.onnx")
    assert model.training
    assert model.config._attn_implementation == "sdpa"


def test_classifier_feeds_only_declared_inputs(tiny_bert, tmp_path):
    sample = random_batch(2, 6)
    del sample["token_type_ids"]
    path = tmp_path / "no-token-types.onnx"
    export_onnx(tiny_bert, sample, path)
    classifier = OnnxClassifier(path, num_threads=1)
    assert classifier.input_names == ["input_ids", "attention_mask"]
    batch = random_batch(3, 9)  # carries token_type_ids (all zero) and labels
    torch.testing.assert_close(
        onnx_logits(path, batch), torch_logits(tiny_bert, batch), atol=1e-4, rtol=0
    )


def test_classifier_predicts_like_torch_and_ignores_labels(tiny_bert, tiny_batches, fp32_path):
    classifier = OnnxClassifier(fp32_path, num_threads=1)
    assert classifier.eval() is classifier
    batches = [{**batch, "labels": torch.zeros(len(batch["input_ids"]))} for batch in tiny_batches]
    labels = [predict_logits(model, batches).argmax(-1) for model in (classifier, tiny_bert)]
    assert (labels[0] == labels[1]).all()


class TrackedBatch(dict):
    """A batch that records whether its tensors were read."""

    read = False

    def __getitem__(self, key):
        self.read = True
        return super().__getitem__(key)


def test_int8_graphs_are_smaller_and_agree(tiny_bert, fp32_path, tmp_path):
    dynamic, static = tmp_path / "dynamic.onnx", tmp_path / "static.onnx"
    quantize_onnx_dynamic(fp32_path, dynamic)
    calibration = [TrackedBatch(random_batch(8, length, seed=length)) for length in (8, 16, 24)]
    quantize_onnx_static(fp32_path, static, calibration)
    assert all(batch.read for batch in calibration)
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "dynamic.onnx",
        "fp32.onnx",
        "static.onnx",
    ]  # no temporary files left behind
    large = random_batch(256, 24, seed=9)
    expected = torch_logits(tiny_bert, large).argmax(-1)
    for path in (dynamic, static):
        assert path.stat().st_size < fp32_path.stat().st_size / 2
        logits = onnx_logits(path, large)
        assert torch.isfinite(logits).all()
        assert (logits.argmax(-1) == expected).float().mean() >= 0.9


def test_static_quantization_needs_calibration(fp32_path, tmp_path):
    with pytest.raises(ValueError, match="calibration"):
        quantize_onnx_static(fp32_path, tmp_path / "static.onnx", [])


def test_parameter_counts_match_torch(tmp_path):
    # A fresh model's zero biases and unit LayerNorm weights are identical tensors that the
    # exporter stores once; perturbed (trained-like) weights are all kept.
    model = trained_like(build_tiny_bert())
    with torch.no_grad():
        model.classifier.weight[0] = 0
        model.bert.encoder.layer[0].intermediate.dense.weight[:5] = 0
    total, nonzero = count_parameters(model)
    assert nonzero < total
    fp32 = tmp_path / "fp32.onnx"
    export_onnx(model, random_batch(2, 6), fp32)
    assert OnnxClassifier(fp32, num_threads=1).parameter_counts() == (total, nonzero)
    quantize_onnx_dynamic(fp32, tmp_path / "dynamic.onnx")
    quantize_onnx_static(fp32, tmp_path / "static.onnx", [random_batch(4, 8)])
    for name in ("dynamic.onnx", "static.onnx"):
        quantized_total, quantized_nonzero = OnnxClassifier(
            tmp_path / name, num_threads=1
        ).parameter_counts()
        assert quantized_total == total
        assert 0.9 * nonzero < quantized_nonzero <= nonzero  # small weights may round to 0


def test_head_pruned_model_exports_and_matches(tiny_batches, tmp_path):
    model = trained_like(build_tiny_bert())
    prune_heads(model, {0: [1, 2]})
    path = tmp_path / "pruned.onnx"
    export_onnx(model, random_batch(2, 6), path)
    for batch in [*tiny_batches, random_batch(5, 17)]:
        torch.testing.assert_close(
            onnx_logits(path, batch), torch_logits(model, batch), atol=1e-4, rtol=0
        )
    assert OnnxClassifier(path, num_threads=1).parameter_counts() == count_parameters(model)

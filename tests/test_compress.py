"""Head pruning, magnitude pruning and dynamic quantization on a tiny BERT."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import build_tiny_bert, logits, parameter_count
from torch import nn
from transformers import AutoModelForSequenceClassification

from trimflow.compress.magnitude import MagnitudePruner, make_permanent, prunable_linears, sparsity
from trimflow.compress.pruned import load_pruned
from trimflow.compress.quantize import (
    load_quantized,
    quantize_dynamic_int8,
    save_quantized,
)
from trimflow.compress.structured import prune_heads, unit_importance
from trimflow.compress.variants import load_variant
from trimflow.evaluation.footprint import size_on_disk_mb

# --- head importance (scored with the FFN neurons in one pass) -----------------------------------


def test_head_importance_is_deterministic_normalised_and_leaves_model_unchanged(
    tiny_bert, labelled_batches
):
    tiny_bert.train()
    before = {name: value.clone() for name, value in tiny_bert.state_dict().items()}

    first, _ = unit_importance(tiny_bert, labelled_batches)
    second, _ = unit_importance(tiny_bert, labelled_batches)

    assert first.shape == (2, 4)
    assert torch.equal(first, second)
    assert (first >= 0).all()
    torch.testing.assert_close(first.norm(dim=-1), torch.ones(2))
    assert tiny_bert.training
    assert all(parameter.grad is None for parameter in tiny_bert.parameters())
    assert all(not module._forward_pre_hooks for module in tiny_bert.modules())
    for name, value in tiny_bert.state_dict().items():
        assert torch.equal(value, before[name])


def test_head_importance_equals_gradient_through_output_dense_columns(tiny_bert, labelled_batches):
    # Scaling head h's context slice by m is scaling its columns of attention.output.dense, so
    # dL/dm_h = sum over those columns of W * dL/dW: an independent check of the mask hooks.
    head_size = tiny_bert.config.hidden_size // tiny_bert.config.num_attention_heads
    raw = torch.zeros(2, 4)
    for batch in labelled_batches:
        tiny_bert.zero_grad()
        tiny_bert(**batch).loss.backward()
        for i, layer in enumerate(tiny_bert.bert.encoder.layer):
            dense = layer.attention.output.dense
            per_column = (dense.weight * dense.weight.grad).sum(dim=0)
            raw[i] += per_column.unflatten(0, (4, head_size)).sum(dim=-1).abs()
    expected = raw / raw.norm(dim=-1, keepdim=True)

    torch.testing.assert_close(unit_importance(tiny_bert, labelled_batches)[0], expected)


def test_unit_importance_max_batches_uses_only_the_first_batches(tiny_bert, labelled_batches):
    limited = unit_importance(tiny_bert, labelled_batches, max_batches=1)
    first_only = unit_importance(tiny_bert, labelled_batches[:1])
    assert all(map(torch.equal, limited, first_only))


def test_unit_importance_works_under_no_grad(tiny_bert, labelled_batches):
    expected = unit_importance(tiny_bert, labelled_batches)
    with torch.no_grad():
        assert all(map(torch.equal, unit_importance(tiny_bert, labelled_batches), expected))


def test_head_importance_rejects_a_head_pruned_model(tiny_bert, labelled_batches):
    prune_heads(tiny_bert, {0: [1]})
    with pytest.raises(ValueError, match="same number of heads"):
        unit_importance(tiny_bert, labelled_batches)


# --- head pruning ------------------------------------------------------------------------------


def test_prune_heads_shrinks_layers_and_parameter_count(tiny_bert, tiny_batches):
    config = tiny_bert.config
    head_size = config.hidden_size // config.num_attention_heads
    per_head = 4 * config.hidden_size * head_size + 3 * head_size  # q/k/v rows + biases, out cols
    before = parameter_count(tiny_bert)

    prune_heads(tiny_bert, {0: [1, 2], 1: [3]})

    layers = tiny_bert.bert.encoder.layer
    for layer, kept in ((layers[0], 2), (layers[1], 3)):
        attention = layer.attention
        for projection in (attention.self.query, attention.self.key, attention.self.value):
            assert projection.out_features == kept * head_size
        assert attention.output.dense.in_features == kept * head_size
        assert attention.self.num_attention_heads == kept
    assert parameter_count(tiny_bert) == before - 3 * per_head
    assert tiny_bert.config.pruned_heads == {0: [1, 2], 1: [3]}
    assert torch.isfinite(logits(tiny_bert, tiny_batches[0])).all()


def test_prune_heads_keeps_the_remaining_heads_weights(tiny_bert):
    head_size = tiny_bert.config.hidden_size // tiny_bert.config.num_attention_heads
    query = tiny_bert.bert.encoder.layer[0].attention.self.query.weight.detach().clone()

    prune_heads(tiny_bert, {0: [1]})
    prune_heads(tiny_bert, {0: [1, 2]})  # original indices: head 1 is skipped, head 2 removed

    kept = torch.cat([query[:head_size], query[3 * head_size :]])
    assert torch.equal(tiny_bert.bert.encoder.layer[0].attention.self.query.weight, kept)
    assert tiny_bert.config.pruned_heads == {0: [1, 2]}


def test_prune_heads_refuses_to_empty_a_layer(tiny_bert):
    with pytest.raises(ValueError, match="every attention head"):
        prune_heads(tiny_bert, {0: [0, 1, 2, 3]})


def test_pruned_model_round_trips_through_save_pretrained(tiny_bert, tiny_batches, tmp_path):
    prune_heads(tiny_bert, {0: [0, 3], 1: [2]})
    tiny_bert.save_pretrained(tmp_path)

    with pytest.raises(RuntimeError):  # transformers 5 no longer re-applies pruned_heads
        AutoModelForSequenceClassification.from_pretrained(tmp_path)
    reloaded = load_pruned(tmp_path)

    assert not reloaded.training
    assert reloaded.config.pruned_heads == {0: [0, 3], 1: [2]}
    assert reloaded.bert.encoder.layer[0].attention.self.query.out_features == 16
    assert reloaded.bert.encoder.layer[1].attention.output.dense.in_features == 24
    assert parameter_count(reloaded) == parameter_count(tiny_bert)
    for batch in tiny_batches:
        assert torch.equal(logits(reloaded, batch), logits(tiny_bert, batch))


# --- global magnitude pruning ------------------------------------------------------------------


def test_prunable_linears_cover_only_the_encoder(tiny_bert):
    modules = [module for module, _ in prunable_linears(tiny_bert)]
    assert len(modules) == 2 * 6  # q, k, v, attention out, intermediate, output per layer
    assert tiny_bert.classifier not in modules
    assert tiny_bert.bert.pooler.dense not in modules


@pytest.mark.parametrize("target", [0.3, 0.7])
def test_global_magnitude_reaches_requested_sparsity(tiny_bert, target):
    assert sparsity(tiny_bert) < 0.01
    MagnitudePruner(tiny_bert, target).set_progress(1.0)
    assert sparsity(tiny_bert) == pytest.approx(target, abs=0.01)
    assert torch.count_nonzero(tiny_bert.classifier.weight) == tiny_bert.classifier.weight.numel()


def test_masks_keep_zeros_through_an_optimizer_step(tiny_bert, tiny_batches):
    MagnitudePruner(tiny_bert, 0.5).set_progress(1.0)
    masks = [module.weight_mask.clone() for module, _ in prunable_linears(tiny_bert)]
    optimizer = torch.optim.SGD(tiny_bert.parameters(), lr=1.0)
    tiny_bert.train()

    loss = tiny_bert(**tiny_batches[0], labels=torch.tensor([0, 1, 2, 0])).loss
    loss.backward()
    optimizer.step()
    tiny_bert.eval()
    logits(tiny_bert, tiny_batches[0])  # the forward pre-hook recomputes weight = orig * mask

    for (module, _), mask in zip(prunable_linears(tiny_bert), masks, strict=True):
        assert (module.weight[mask == 0] == 0).all()
    assert sparsity(tiny_bert) >= 0.5 - 0.01


def test_make_permanent_leaves_plain_sparse_parameters(tiny_bert, tiny_batches):
    MagnitudePruner(tiny_bert, 0.5).set_progress(1.0)
    expected = logits(tiny_bert, tiny_batches[0])

    make_permanent(tiny_bert)

    for module, name in prunable_linears(tiny_bert):
        assert isinstance(module.weight, nn.Parameter)
        assert not hasattr(module, f"{name}_mask")
        assert not hasattr(module, f"{name}_orig")
        assert not module._forward_pre_hooks
    assert sparsity(tiny_bert) == pytest.approx(0.5, abs=0.01)
    assert all("_orig" not in key and "_mask" not in key for key in tiny_bert.state_dict())
    torch.testing.assert_close(logits(tiny_bert, tiny_batches[0]), expected)


# --- dynamic int8 quantization -----------------------------------------------------------------


def test_quantize_copies_and_replaces_linears(tiny_bert):
    tiny_bert.train()
    quantized = quantize_dynamic_int8(tiny_bert)

    assert tiny_bert.training and not quantized.training
    assert isinstance(tiny_bert.classifier, nn.Linear)
    assert not any(type(module) is nn.Linear for module in quantized.modules())


def test_quantized_round_trip_matches_in_memory_model(tiny_model_dir, tiny_batches, tmp_path):
    (tiny_model_dir / "label_map.json").write_text('{"0": "alpha"}')
    fp32 = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    quantized = quantize_dynamic_int8(fp32)
    out_dir = tmp_path / "quantized"

    save_quantized(quantized, tiny_model_dir, out_dir)
    reloaded = load_quantized(out_dir)

    names = {path.name for path in out_dir.iterdir()}
    assert {"config.json", "tokenizer.json", "label_map.json", "quantized_state_dict.pt"} <= names
    assert "model.safetensors" not in names
    scheme = json.loads((out_dir / "quantization.json").read_text())
    assert scheme == {
        "scheme": "dynamic_int8",
        "modules": ["Linear"],
        "backend": torch.backends.quantized.engine,
    }
    assert not reloaded.training
    for batch in tiny_batches:
        assert torch.equal(logits(reloaded, batch), logits(quantized, batch))
        torch.testing.assert_close(logits(reloaded, batch), logits(fp32, batch), atol=0.05, rtol=0)
        assert torch.equal(logits(reloaded, batch).argmax(-1), logits(fp32, batch).argmax(-1))
    assert size_on_disk_mb(out_dir / "quantized_state_dict.pt") < size_on_disk_mb(
        tiny_model_dir / "model.safetensors"
    )


def test_quantized_head_pruned_model_round_trips(
    tiny_bert, packaged_tokenizer, tiny_batches, tmp_path
):
    prune_heads(tiny_bert, {1: [0, 1]})
    tiny_bert.save_pretrained(tmp_path / "pruned")
    packaged_tokenizer.save_pretrained(tmp_path / "pruned")
    quantized = quantize_dynamic_int8(tiny_bert)

    save_quantized(quantized, tmp_path / "pruned", tmp_path / "quantized")
    reloaded = load_variant(tmp_path / "quantized")

    assert reloaded.bert.encoder.layer[1].attention.self.query.out_features == 16
    assert torch.equal(logits(reloaded, tiny_batches[1]), logits(quantized, tiny_batches[1]))


def test_save_quantized_is_atomic_and_needs_a_config(tmp_path):
    with pytest.raises(FileNotFoundError):
        save_quantized(quantize_dynamic_int8(build_tiny_bert()), tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_load_variant_handles_pretrained_and_quantized_dirs(tiny_model_dir, tiny_batches, tmp_path):
    fp32 = load_variant(tiny_model_dir)
    save_quantized(quantize_dynamic_int8(fp32), tiny_model_dir, tmp_path / "quantized")
    quantized = load_variant(tmp_path / "quantized")

    assert not fp32.training and not quantized.training
    assert isinstance(fp32.classifier, nn.Linear)
    assert type(quantized.classifier) is not nn.Linear
    reference = build_tiny_bert()
    assert torch.equal(logits(fp32, tiny_batches[0]), logits(reference, tiny_batches[0]))

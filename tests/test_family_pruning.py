"""Structured and magnitude pruning, and loading pruned models, on every encoder family."""

from __future__ import annotations

import functools
import re

import pytest
import torch
from families import FAMILIES, batches_for, build_outside_table, build_tiny, tiny_tokenizer
from helpers import logits
from transformers import PreTrainedModel

from trimflow.compress.magnitude import MagnitudePruner, prunable_linears, sparsity
from trimflow.compress.pruned import apply_recorded_pruning, is_structurally_pruned, load_pruned
from trimflow.compress.structured import (
    StructuredPruner,
    head_units,
    neuron_units,
    prune_heads,
    prune_neurons,
    register_unit_mask,
    unit_importance,
)
from trimflow.config.loading import ConfigError
from trimflow.layout import Layout
from trimflow.models.families import encoder_layers, family_of, submodule, supported_families
from trimflow.stages import prune

# DeBERTa without shared keys projects relative positions with pos_key_proj / pos_query_proj.
UNSHARED_DEBERTA = "deberta-v2:unshared-position-projections"
CASES = (*FAMILIES, UNSHARED_DEBERTA)
LAYERS, HEADS, NEURONS = 2, 4, 64  # the tiny shape of tests/families.py
# Weights ten times wider than transformers' default: pruning visibly changes the logits.
INITIALIZER_RANGE = 0.2

# Two passes of uneven removal: heads by original index, neurons by current position.
FIRST_HEADS = {0: [1], 1: [0, 2, 3]}
FIRST_NEURONS = {0: [3, 5, 7], 1: list(range(0, NEURONS, 2))}
SECOND_HEADS = {0: [0, 1, 3]}  # head 1 is already gone: skipped
SECOND_NEURONS = {0: [3, 4], 1: [31]}  # neurons 4 and 6 of layer 0, neuron 63 of layer 1
ALL_HEADS = {0: [0, 1, 3], 1: [0, 2, 3]}
ALL_NEURONS = {0: [3, 4, 5, 6, 7], 1: [*range(0, NEURONS, 2), 63]}


@functools.cache
def tokenizer_of(family: str):
    """One tiny tokenizer per family for the whole module (training one takes a moment)."""
    return tiny_tokenizer(family)


def family_name(case: str) -> str:
    return case.partition(":")[0]


def build(case: str, task: str = "classification") -> PreTrainedModel:
    """A tiny seeded model of `case` (two builds are equal), its weights drawn wide enough that
    every head and neuron moves the logits."""
    tiny = build_tiny(family_name(case), task=task, tokenizer=tokenizer_of(family_name(case)))
    tiny.config.initializer_range = INITIALIZER_RANGE
    if case == UNSHARED_DEBERTA:
        tiny.config.share_att_key = False
    torch.manual_seed(0)
    return type(tiny)(tiny.config).eval()


def labelled_batch(case: str, task: str = "classification") -> dict[str, torch.Tensor]:
    """Four padded texts; a token classifier gets a label per real token."""
    batch = batches_for(tokenizer_of(family_name(case)), count=1)[0]
    if task == "ner":
        labels = batch["input_ids"] % 3
        batch["labels"] = labels.masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def masked_reference(case: str, heads: dict, neurons: dict) -> PreTrainedModel:
    """A fresh model of `case` whose given heads and neurons (original indices) are masked."""
    model = build(case)
    for units, silenced in ((head_units(model), heads), (neuron_units(model), neurons)):
        mask = torch.ones(len(units.inputs), units.count)
        for layer, indices in silenced.items():
            mask[layer, indices] = 0.0
        register_unit_mask(units, mask)
    return model


def layer_shapes(model: PreTrainedModel) -> list[tuple[int, int]]:
    """(heads, FFN neurons) of every layer, checked against every linear and attribute holding
    them."""
    family = family_of(model.config)
    shapes = []
    for layer in encoder_layers(model):
        attention = submodule(layer, family.attention)
        head_size = getattr(attention, family.head_size_attribute)
        heads = submodule(layer, family.attention_output).in_features // head_size
        neurons = submodule(layer, family.ffn_output).in_features
        for path in family.projections:
            if (projection := submodule(layer, path)) is not None:
                assert projection.out_features == (1 + 2 * family.fused_qkv) * heads * head_size
        assert submodule(layer, family.ffn_input).out_features == (1 + family.gated_ffn) * neurons
        for name in family.head_count_attributes:
            assert getattr(attention, name) == heads
        for name in family.head_width_attributes:
            assert getattr(attention, name) == heads * head_size
        shapes.append((heads, neurons))
    return shapes


def assert_close_logits(model, batch: dict[str, torch.Tensor], expected: torch.Tensor) -> None:
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=0)


def test_the_unshared_deberta_variant_has_position_projections():
    attention = build(UNSHARED_DEBERTA).deberta.encoder.layer[0].attention.self
    assert hasattr(attention, "pos_key_proj") and hasattr(attention, "pos_query_proj")


@pytest.mark.parametrize("case", CASES)
def test_pruning_nothing_leaves_the_logits_unchanged(case):
    model, batch = build(case), labelled_batch(case)
    before = logits(model, batch)
    ones = torch.ones(LAYERS, HEADS), torch.ones(LAYERS, NEURONS)

    StructuredPruner(model, *ones, heads_fraction=0.0, ffn_fraction=0.0).finalize(model)

    assert model.config.pruned_heads == {}
    assert model.config.intermediate_sizes == [NEURONS] * LAYERS
    assert not is_structurally_pruned(model.config)
    assert layer_shapes(model) == [(HEADS, NEURONS)] * LAYERS
    assert torch.equal(logits(model, batch), before)


@pytest.mark.parametrize("case", CASES)
def test_removing_heads_and_neurons_gives_the_logits_of_masking_them(case):
    model, batch = build(case), labelled_batch(case)
    unpruned = logits(model, batch)

    prune_heads(model, FIRST_HEADS)
    prune_neurons(model, FIRST_NEURONS)

    assert layer_shapes(model) == [(3, NEURONS - 3), (1, NEURONS // 2)]
    masked = logits(masked_reference(case, FIRST_HEADS, FIRST_NEURONS), batch)
    assert_close_logits(model, batch, masked)

    prune_heads(model, SECOND_HEADS)  # a second pass on the pruned model
    prune_neurons(model, SECOND_NEURONS)

    assert layer_shapes(model) == [(1, NEURONS - 5), (1, NEURONS // 2 - 1)]
    assert model.config.pruned_heads == ALL_HEADS
    assert model.config.intermediate_sizes == [NEURONS - 5, NEURONS // 2 - 1]
    assert_close_logits(model, batch, logits(masked_reference(case, ALL_HEADS, ALL_NEURONS), batch))
    assert not torch.allclose(masked, unpruned, atol=1e-3)  # the units did matter


@pytest.mark.parametrize("case", CASES)
def test_importance_scores_one_value_per_head_and_neuron_of_every_layer(case):
    model = build(case)
    heads, neurons = unit_importance(model, [labelled_batch(case)])

    assert heads.shape == (LAYERS, HEADS) and neurons.shape == (LAYERS, NEURONS)
    for scores in (heads, neurons):
        assert (scores >= 0).all()
        torch.testing.assert_close(scores.norm(dim=-1), torch.ones(LAYERS))
    assert all(not module._forward_pre_hooks for module in model.modules())


@pytest.mark.parametrize(
    ("case", "task"),
    [*((case, "classification") for case in CASES), ("roberta", "ner"), ("modernbert", "ner")],
)
def test_a_pruned_model_reloads_with_its_shapes_and_logits(case, task, tmp_path):
    model, batch = build(case, task), labelled_batch(case, task)
    heads, neurons = unit_importance(model, [batch])
    pruner = StructuredPruner(model, heads, neurons, heads_fraction=0.5, ffn_fraction=0.25)
    pruner.set_progress(1.0)
    masked = logits(model, batch)

    pruner.finalize(model)
    model.save_pretrained(tmp_path)
    reloaded = load_pruned(tmp_path)

    shapes = layer_shapes(model)
    assert sum(heads for heads, _ in shapes) == LAYERS * HEADS // 2
    assert sum(neurons for _, neurons in shapes) == LAYERS * NEURONS * 3 // 4
    assert type(reloaded) is type(model) and not reloaded.training
    assert layer_shapes(reloaded) == shapes
    assert_close_logits(model, batch, masked)
    assert torch.equal(logits(reloaded, batch), logits(model, batch))


@pytest.mark.parametrize("case", CASES)
def test_magnitude_pruning_reaches_its_sparsity_in_the_encoder_layers(case):
    model = build(case)
    family = family_of(model.config)
    targets = {id(module) for module, _ in prunable_linears(model)}
    for layer in encoder_layers(model):
        for path in (family.attention_output, family.ffn_input, family.ffn_output):
            assert id(submodule(layer, path)) in targets

    pruner = MagnitudePruner(model, 0.6)
    pruner.set_progress(1.0)
    pruner.finalize(model)

    assert sparsity(model) == pytest.approx(0.6, abs=0.01)
    assert torch.isfinite(logits(model, labelled_batch(case))).all()


def test_structured_pruning_refuses_a_family_not_in_the_table():
    model = build_outside_table()
    refusal = rf"model_type 'albert' \(supported: {re.escape(supported_families())}\)"
    attempts = (
        lambda: unit_importance(model, []),
        lambda: StructuredPruner(model, torch.ones(1, 4), torch.ones(1, 64), 0.5, 0.5),
        lambda: prune_heads(model, {0: [1]}),
        lambda: prune_neurons(model, {0: [1]}),
    )
    for attempt in attempts:
        with pytest.raises(ConfigError, match=refusal):
            attempt()

    assert not is_structurally_pruned(model.config)
    apply_recorded_pruning(model)  # nothing recorded: any family loads


def test_the_prune_stage_refuses_a_family_not_in_the_table_before_any_work(tiny_config, tmp_path):
    layout = Layout(*(tmp_path / name for name in ("prepared", "tokenized", "models", "r", "w")))
    build_outside_table().config.save_pretrained(layout.finetuned)  # no weights, no labels

    with pytest.raises(ConfigError, match="prune does not support model_type 'albert'"):
        prune.run(tiny_config(), layout)

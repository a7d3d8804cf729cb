"""FFN-neuron pruning, one-pass unit importance, pruners and the gradual pruning schedule."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from helpers import build_tiny_bert, logits, parameter_count, quiet_trainer
from torch import nn
from torch.utils.data import DataLoader

from trimflow.compress.magnitude import MagnitudePruner, prunable_linears, sparsity
from trimflow.compress.pruned import load_pruned
from trimflow.compress.schedule import GradualPruning, cubic_schedule
from trimflow.compress.structured import (
    MIN_HEADS,
    MIN_NEURONS,
    StructuredPruner,
    by_layer,
    encoder_layers,
    prune_heads,
    prune_neurons,
    pruning_order,
    unit_importance,
)

LABELS = torch.tensor([0, 1, 2, 0])


def predicted_parameter_count(
    model: nn.Module, heads: Mapping[int, Sequence[int]], neurons: Mapping[int, Sequence[int]]
) -> int:
    """Parameters left after removing the given (currently present) heads and FFN neurons.

    A head owns its query/key/value rows and biases plus its attention-output columns; a neuron
    owns its intermediate row and bias plus its output column.
    """
    hidden = model.config.hidden_size
    head_size = encoder_layers(model)[0].attention.self.attention_head_size
    per_head = 4 * hidden * head_size + 3 * head_size
    per_neuron = 2 * hidden + 1
    removed_heads = sum(len(units) for units in heads.values())
    removed_neurons = sum(len(units) for units in neurons.values())
    return parameter_count(model) - removed_heads * per_head - removed_neurons * per_neuron


def least_important(importance: torch.Tensor, fraction: float, min_kept: int) -> dict:
    """{layer: units} of the `round(fraction * total)` globally least important units, keeping
    `min_kept` per layer: what a pruner masks at full progress."""
    return by_layer(pruning_order(importance, min_kept)[: round(fraction * importance.numel())])


def ffn(model: nn.Module, layer: int) -> tuple[nn.Linear, nn.Linear]:
    """(intermediate.dense, output.dense) of one encoder layer."""
    block = model.bert.encoder.layer[layer]
    return block.intermediate.dense, block.output.dense


def pruners_for(model: nn.Module, heads: torch.Tensor, neurons: torch.Tensor) -> list:
    """A structured and a magnitude pruner on the same model."""
    return [StructuredPruner(model, heads, neurons, 0.25, 0.5), MagnitudePruner(model, 0.5)]


# --- one-pass importance and selection ---------------------------------------------------------


def test_unit_importance_matches_separate_gradients_in_one_pass(tiny_bert, labelled_batches):
    # Scaling neuron j by m scales column j of output.dense, so dL/dm_j = sum_i W_ij dL/dW_ij.
    tiny_bert.train()
    heads, neurons = unit_importance(tiny_bert, labelled_batches)

    assert tiny_bert.training
    assert all(parameter.grad is None for parameter in tiny_bert.parameters())
    assert all(not module._forward_pre_hooks for module in tiny_bert.modules())
    tiny_bert.eval()
    raw = torch.zeros(2, 64)
    for batch in labelled_batches:
        tiny_bert.zero_grad()
        tiny_bert(**batch).loss.backward()
        for layer in range(2):
            dense = ffn(tiny_bert, layer)[1]
            raw[layer] += (dense.weight * dense.weight.grad).sum(dim=0).abs()
    torch.testing.assert_close(neurons, raw / raw.norm(dim=-1, keepdim=True))


def test_pruning_order_ranks_globally_and_keeps_a_floor_per_layer():
    importance = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.9, 0.8, 0.7, 0.05]])
    assert least_important(importance, 0.5, 1) == {0: [0, 1, 2], 1: [3]}
    assert least_important(importance, 0.5, 2) == {0: [0, 1], 1: [2, 3]}
    assert least_important(importance, 1.0, 1) == {0: [0, 1, 2], 1: [1, 2, 3]}
    assert least_important(importance, 0.0, 1) == {}
    with pytest.raises(ValueError, match="min_kept"):
        pruning_order(importance, 0)


# --- FFN neuron removal ------------------------------------------------------------------------


def test_prune_neurons_removes_exactly_the_requested_neurons(tiny_bert, tiny_batches):
    removed = {0: [1, 5, 63], 1: [0]}
    before = {name: value.clone() for name, value in tiny_bert.state_dict().items()}
    predicted = predicted_parameter_count(tiny_bert, {}, removed)

    prune_neurons(tiny_bert, removed)

    assert parameter_count(tiny_bert) == predicted
    assert tiny_bert.config.intermediate_sizes == [61, 63]
    for layer, gone in removed.items():
        keep = [neuron for neuron in range(64) if neuron not in gone]
        intermediate, output = ffn(tiny_bert, layer)
        assert (intermediate.out_features, output.in_features) == (len(keep), len(keep))
        prefix = f"bert.encoder.layer.{layer}."
        weights = {
            "intermediate.dense.weight": before[prefix + "intermediate.dense.weight"][keep],
            "intermediate.dense.bias": before[prefix + "intermediate.dense.bias"][keep],
            "output.dense.weight": before[prefix + "output.dense.weight"][:, keep],
        }
        for name, expected in weights.items():
            assert torch.equal(tiny_bert.state_dict()[prefix + name], expected)
    for name, value in tiny_bert.state_dict().items():
        if "intermediate.dense" not in name and "output.dense.weight" not in name:
            assert torch.equal(value, before[name]), name
    assert torch.isfinite(logits(tiny_bert, tiny_batches[0])).all()


def test_pruning_a_neuron_equals_silencing_it(tiny_bert, tiny_batches):
    reference = build_tiny_bert()
    with torch.no_grad():
        ffn(reference, 1)[1].weight[:, 7] = 0.0

    prune_neurons(tiny_bert, {1: [7]})

    for batch in tiny_batches:
        torch.testing.assert_close(logits(tiny_bert, batch), logits(reference, batch))


def test_prune_neurons_refuses_to_empty_a_layer(tiny_bert):
    with pytest.raises(ValueError, match="every FFN neuron"):
        prune_neurons(tiny_bert, {0: range(64)})


def test_heads_and_neurons_pruned_round_trip_through_save_pretrained(
    tiny_bert, tiny_batches, tmp_path
):
    heads, neurons = {0: [1], 1: [0, 3]}, {0: list(range(0, 64, 2)), 1: [5]}
    predicted = predicted_parameter_count(tiny_bert, heads, neurons)
    prune_heads(tiny_bert, heads)
    prune_neurons(tiny_bert, neurons)
    tiny_bert.save_pretrained(tmp_path)

    reloaded = load_pruned(tmp_path)

    assert parameter_count(tiny_bert) == parameter_count(reloaded) == predicted
    assert reloaded.config.intermediate_sizes == [32, 63]
    assert reloaded.config.pruned_heads == heads
    assert ffn(reloaded, 0)[0].out_features == 32
    assert reloaded.bert.encoder.layer[1].attention.self.num_attention_heads == 2
    for batch in tiny_batches:
        assert torch.equal(logits(reloaded, batch), logits(tiny_bert, batch))


# --- cubic schedule ----------------------------------------------------------------------------


def test_cubic_schedule_ramps_from_zero_to_final_within_the_window():
    values = [cubic_schedule(step, 100, 0.6, end_fraction=0.8) for step in range(101)]

    assert values[0] == 0.0
    assert values[80] == values[100] == 0.6
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert values[40] == pytest.approx(0.6 * (1 - 0.5**3))  # cubic: 7/8 of the way at midpoint
    assert cubic_schedule(10, 100, 0.6, start_fraction=0.2, end_fraction=0.8) == 0.0
    assert cubic_schedule(50, 100, 0.6, start_fraction=0.2, end_fraction=0.8) == pytest.approx(
        0.6 * 7 / 8
    )
    assert cubic_schedule(0, 100, 0.6, end_fraction=0.0) == 0.6  # empty window: one shot
    with pytest.raises(ValueError, match="start_fraction"):
        cubic_schedule(0, 100, 0.6, start_fraction=0.9, end_fraction=0.5)


# --- pruners -----------------------------------------------------------------------------------


def test_structured_pruner_masks_gradually_and_finalize_keeps_the_outputs(
    tiny_bert, labelled_batches, tiny_batches
):
    heads, neurons = unit_importance(tiny_bert, labelled_batches)
    pruner = StructuredPruner(tiny_bert, heads, neurons, heads_fraction=0.5, ffn_fraction=0.25)
    seen: list[torch.Tensor] = []
    ffn(tiny_bert, 0)[1].register_forward_hook(lambda _m, args, _o: seen.append(args[0]))

    for progress, heads_masked, neurons_masked in ((0.0, 0, 0), (0.5, 2, 16), (1.0, 4, 32)):
        pruner.set_progress(progress)
        assert sum(map(len, pruner.masks["heads"].masked().values())) == heads_masked
        assert sum(map(len, pruner.masks["neurons"].masked().values())) == neurons_masked
    assert pruner.masks["heads"].masked() == least_important(heads, 0.5, MIN_HEADS)
    masked_neurons = pruner.masks["neurons"].masked()
    assert masked_neurons == least_important(neurons, 0.25, MIN_NEURONS)
    expected = [logits(tiny_bert, batch) for batch in tiny_batches]
    assert (seen[-1][..., masked_neurons.get(0, [])] == 0).all()
    predicted = predicted_parameter_count(tiny_bert, pruner.masks["heads"].masked(), masked_neurons)

    pruner.finalize(tiny_bert)

    assert all(not module._forward_pre_hooks for module in tiny_bert.modules())
    assert parameter_count(tiny_bert) == predicted
    assert sum(tiny_bert.config.intermediate_sizes) == 2 * 64 - 32
    for batch, before in zip(tiny_batches, expected, strict=True):
        torch.testing.assert_close(logits(tiny_bert, batch), before)


def test_structured_pruner_leaves_a_kind_with_fraction_zero_alone(tiny_bert, labelled_batches):
    heads, neurons = unit_importance(tiny_bert, labelled_batches)
    pruner = StructuredPruner(tiny_bert, heads, neurons, heads_fraction=0.0, ffn_fraction=0.25)
    pruner.set_progress(1.0)

    assert list(pruner.masks) == ["neurons"]
    assert not tiny_bert.bert.encoder.layer[0].attention.output.dense._forward_pre_hooks
    pruner.finalize(tiny_bert)
    assert tiny_bert.bert.encoder.layer[0].attention.self.num_attention_heads == 4
    assert tiny_bert.config.pruned_heads == {}
    assert sum(tiny_bert.config.intermediate_sizes) == 2 * 64 - 32


def test_magnitude_pruner_grows_monotone_masks_that_survive_training(tiny_bert, tiny_batches):
    pruner = MagnitudePruner(tiny_bert, 0.6)
    previous = [module.weight_mask.clone() for module, _ in prunable_linears(tiny_bert)]
    for progress in (0.0, 0.25, 0.5, 1.0):
        pruner.set_progress(progress)
        assert sparsity(tiny_bert) == pytest.approx(0.6 * progress, abs=0.01)
        masks = [module.weight_mask.clone() for module, _ in prunable_linears(tiny_bert)]
        assert all((new <= old).all() for new, old in zip(masks, previous, strict=True))
        previous = masks

    tiny_bert.train()
    optimizer = torch.optim.SGD(tiny_bert.parameters(), lr=1.0)
    tiny_bert(**tiny_batches[0], labels=LABELS).loss.backward()
    optimizer.step()
    logits(tiny_bert, tiny_batches[0])  # the pre-hooks recompute weight = orig * mask
    assert sparsity(tiny_bert) == pytest.approx(0.6, abs=0.01)

    pruner.finalize(tiny_bert)
    assert all("_orig" not in key for key in tiny_bert.state_dict())
    assert sparsity(tiny_bert) == pytest.approx(0.6, abs=0.01)


def test_magnitude_pruner_can_rank_the_word_embeddings_too(tiny_bert):
    embeddings = tiny_bert.get_input_embeddings()
    MagnitudePruner(tiny_bert, 0.5, include_embeddings=True).set_progress(1.0)

    assert sparsity(tiny_bert, include_embeddings=True) == pytest.approx(0.5, abs=0.01)
    assert float((embeddings.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.05)
    assert torch.count_nonzero(tiny_bert.bert.embeddings.position_embeddings.weight) > 0


# --- the Lightning callback --------------------------------------------------------------------


class Classifier(L.LightningModule):
    """The smallest LightningModule training a Hugging Face classifier."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class ProgressSpy(L.Callback):
    """Records the pruning progress each training batch starts with."""

    def __init__(self, pruning: GradualPruning) -> None:
        self.pruning = pruning
        self.seen: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(self.pruning.progress)


def random_tokens(batches: int = 6, size: int = 4) -> DataLoader:
    """A tiny labelled dataset of random token ids."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (batches * size, 12), generator=generator)
    labels = torch.randint(0, 3, (batches * size,), generator=generator)
    samples = [
        {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": label}
        for row, label in zip(ids, labels, strict=True)
    ]
    return DataLoader(samples, batch_size=size)


class RecordingPruner:
    """A pruner that only remembers the progress values it was given."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def set_progress(self, progress: float) -> None:
        self.calls.append(progress)


def test_gradual_pruning_updates_every_n_steps_and_at_the_window_end():
    pruner = RecordingPruner()
    pruning = GradualPruning([pruner], end_fraction=0.5, every_n_steps=2)
    pruning.total_steps = 10
    for step in range(10):
        pruning.on_train_batch_start(SimpleNamespace(global_step=step), None, None, step)

    assert pruner.calls == [
        cubic_schedule(2, 10, 1.0, end_fraction=0.5),
        cubic_schedule(4, 10, 1.0, end_fraction=0.5),
        1.0,
    ]
    assert pruning.progress == 1.0


def test_gradual_pruning_state_restores_the_same_masks(tiny_bert, labelled_batches, tmp_path):
    callback = GradualPruning(pruners_for(tiny_bert, *unit_importance(tiny_bert, labelled_batches)))
    callback.set_progress(0.5)
    torch.save(callback.state_dict(), tmp_path / "state.pt")

    fresh = build_tiny_bert()
    restored = GradualPruning(pruners_for(fresh, torch.rand(2, 4), torch.rand(2, 64)))
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))

    assert restored.progress == 0.5
    for kind in ("heads", "neurons"):
        before, after = (c.pruners[0].masks[kind].mask for c in (callback, restored))
        assert torch.equal(before, after) and (before == 0).any()
    for (old, _), (new, _) in zip(
        prunable_linears(tiny_bert), prunable_linears(fresh), strict=True
    ):
        assert torch.equal(old.weight_mask, new.weight_mask)


def test_gradual_pruning_reaches_the_final_masks_during_a_short_fit(tiny_bert, labelled_batches):
    structured, magnitude = pruners_for(tiny_bert, *unit_importance(tiny_bert, labelled_batches))
    pruning = GradualPruning([structured, magnitude], end_fraction=0.5)
    spy = ProgressSpy(pruning)
    trainer = quiet_trainer(max_steps=6, callbacks=[pruning, spy])

    trainer.fit(Classifier(tiny_bert), random_tokens())

    assert pruning.total_steps == 6
    assert spy.seen[0] == 0.0 and spy.seen[-1] == 1.0
    assert all(b >= a for a, b in zip(spy.seen, spy.seen[1:], strict=False))
    assert 0.0 < spy.seen[2] < 1.0
    assert sparsity(tiny_bert) == pytest.approx(0.5, abs=0.01)
    assert sum(map(len, structured.masks["heads"].masked().values())) == 2
    assert sum(map(len, structured.masks["neurons"].masked().values())) == 64
    for pruner in (magnitude, structured):  # fold magnitude masks before slicing
        pruner.finalize(tiny_bert)
    assert sum(tiny_bert.config.intermediate_sizes) == 64
    assert torch.isfinite(logits(tiny_bert.eval(), labelled_batches[0])).all()


def test_a_resumed_fit_continues_with_the_same_masks(tiny_bert, labelled_batches, tmp_path):
    def fit(model, heads, neurons, **kwargs):
        pruning = GradualPruning(pruners_for(model, heads, neurons), end_fraction=0.5)
        spy = ProgressSpy(pruning)  # before `pruning`: sees the progress each batch starts from
        checkpoints = L.pytorch.callbacks.ModelCheckpoint(
            tmp_path, "{step}", save_top_k=-1, every_n_train_steps=3
        )
        trainer = quiet_trainer(
            max_steps=6, enable_checkpointing=True, callbacks=[spy, pruning, checkpoints]
        )
        trainer.fit(Classifier(model), random_tokens(), **kwargs)
        return pruning, spy

    first, _ = fit(tiny_bert, *unit_importance(tiny_bert, labelled_batches))
    other_ranking = (torch.rand(2, 4), torch.rand(2, 64))
    resumed, spy = fit(build_tiny_bert(), *other_ranking, ckpt_path=tmp_path / "step=3.ckpt")

    assert spy.seen[0] == pytest.approx(1 - (1 / 3) ** 3)  # restored from step 2, not 0
    for kind in ("heads", "neurons"):
        masks = [pruning.pruners[0].masks[kind].mask for pruning in (first, resumed)]
        assert torch.equal(*masks)

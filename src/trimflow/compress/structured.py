"""Structured pruning of BERT-style encoders: attention heads and FFN neurons.

A *unit* is an equal-width slice of the input of one linear layer per encoder layer:

* an attention head is `head_size` input columns of `layer.attention.output.dense`;
* an FFN neuron is one input column of `layer.output.dense` (one intermediate activation).

Scaling a unit's slice by a mask entry (a forward pre-hook) silences it at 0 and, with a mask of
ones requiring grad, gives its importance |dL/dmask| (Michel et al., 2019) for every kind of unit
in one backward pass per batch.

Units are removed by slicing the linears with `transformers.pytorch_utils.prune_linear_layer`
(transformers 5.x dropped `PreTrainedModel.prune_heads`). Removed heads are recorded in
`config.pruned_heads` (original head indices) and the kept FFN width of every layer in
`config.intermediate_sizes`; `save_pretrained` writes both to config.json, and
`pruned.load_pruned` rebuilds those shapes before loading the weights.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel
from transformers.pytorch_utils import prune_linear_layer

# Scores are L2-normalised per layer, so a layer may lose most of its units: the floors only rule
# out empty layers (a zero-width linear has no valid int8 quantization range).
MIN_HEADS = 1
MIN_NEURONS = 1


# --- units and masks ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Units:
    """One kind of unit: per layer, the linear whose input holds `count` units of width `size`."""

    kind: str
    inputs: list[nn.Linear]
    count: int
    size: int


def encoder_layers(model: PreTrainedModel) -> list[nn.Module]:
    """The encoder layers of a BERT-style model (`base_model.encoder.layer`)."""
    return list(model.base_model.encoder.layer)


def _uniform(kind: str, counts: Iterable[int]) -> int:
    """The per-layer unit count, which masks ([layers, units] tensors) need to be equal."""
    distinct = set(counts)
    if len(distinct) != 1:
        raise ValueError(f"masking {kind} needs the same number of {kind} in every layer")
    return distinct.pop()


def head_units(model: PreTrainedModel) -> Units:
    """Attention heads: `head_size` columns each of `attention.output.dense`."""
    blocks = [layer.attention for layer in encoder_layers(model)]
    count = _uniform("heads", (block.self.num_attention_heads for block in blocks))
    size = blocks[0].self.attention_head_size
    return Units("heads", [block.output.dense for block in blocks], count, size)


def neuron_units(model: PreTrainedModel) -> Units:
    """FFN intermediate neurons: one column each of `output.dense`."""
    outputs = [layer.output.dense for layer in encoder_layers(model)]
    return Units("neurons", outputs, _uniform("neurons", (d.in_features for d in outputs)), 1)


def _scaling_hook(mask: Tensor, size: int) -> Callable[..., tuple[Tensor, ...]]:
    """A pre-hook multiplying unit j of the layer input (width `size`) by `mask[j]`."""

    def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        inputs, *rest = args
        scaled = inputs.unflatten(-1, (mask.numel(), size)) * mask.to(inputs)[:, None]
        return (scaled.flatten(-2), *rest)

    return hook


def register_unit_mask(units: Units, mask: Tensor) -> list[RemovableHandle]:
    """Scale unit j of layer i by `mask[i, j]` until the returned handles are removed.

    The hooks read `mask` at every forward, so in-place updates take effect immediately.
    """
    return [
        linear.register_forward_pre_hook(_scaling_hook(mask[i], units.size))
        for i, linear in enumerate(units.inputs)
    ]


@contextlib.contextmanager
def _masked(kinds: Sequence[Units], masks: Sequence[Tensor]) -> Iterator[None]:
    """Apply one mask per kind of unit for the duration of the block."""
    handles = [
        handle
        for units, mask in zip(kinds, masks, strict=True)
        for handle in register_unit_mask(units, mask)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# --- importance --------------------------------------------------------------------------------


def masked_unit_importance(
    model: PreTrainedModel,
    kinds: Sequence[Units],
    batches: Iterable[dict[str, Tensor]],
    max_batches: int | None = None,
) -> list[Tensor]:
    """Per-unit |dL/dmask| summed over batches, L2-normalised per layer, for every kind at once.

    Batches must contain `labels`. Returns one [num_layers, count] tensor per kind. The model is
    left unchanged: it runs in eval mode, its mode is restored, no parameter gradient accumulates.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.enable_grad():
        masks = [
            torch.ones(len(units.inputs), units.count, device=device, requires_grad=True)
            for units in kinds
        ]
        totals = [torch.zeros_like(mask) for mask in masks]
        try:
            with _masked(kinds, masks):
                for batch in itertools.islice(batches, max_batches):
                    loss = model(**{key: value.to(device) for key, value in batch.items()}).loss
                    for total, grad in zip(totals, torch.autograd.grad(loss, masks), strict=True):
                        total += grad.abs()
        finally:
            model.train(was_training)
    return [total / total.norm(dim=-1, keepdim=True).clamp_min(1e-20) for total in totals]


def unit_importance(
    model: PreTrainedModel,
    batches: Iterable[dict[str, Tensor]],
    max_batches: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(head [L, heads], neuron [L, intermediate]) importance from one pass over `batches`."""
    heads, neurons = masked_unit_importance(
        model, [head_units(model), neuron_units(model)], batches, max_batches
    )
    return heads, neurons


# --- selection ---------------------------------------------------------------------------------


def pruning_order(importance: Tensor, min_kept: int) -> Tensor:
    """[n, 2] (layer, unit) rows, least important first, leaving `min_kept` units in each layer.

    Every prefix is the globally least important set that respects the floor, so growing a
    prefix only ever adds units.
    """
    if min_kept < 1:
        raise ValueError(f"min_kept must be at least 1, got {min_kept}")
    num_layers, count = importance.shape
    remaining = [count] * num_layers
    order: list[tuple[int, int]] = []
    for flat in torch.argsort(importance.flatten(), stable=True).tolist():
        layer, unit = divmod(flat, count)
        if remaining[layer] > min_kept:
            order.append((layer, unit))
            remaining[layer] -= 1
    return torch.tensor(order, dtype=torch.long).reshape(-1, 2)


def _budget(importance: Tensor, fraction: float, order: Tensor) -> int:
    """How many units of `order` pruning `fraction` of all units removes (the floor may cap it)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    return min(round(fraction * importance.numel()), len(order))


def by_layer(rows: Tensor) -> dict[int, list[int]]:
    """{layer: sorted units} from (layer, unit) rows, only for layers that appear."""
    grouped: dict[int, list[int]] = {}
    for layer, unit in rows.tolist():
        grouped.setdefault(layer, []).append(unit)
    return {layer: sorted(units) for layer, units in sorted(grouped.items())}


# --- removal -----------------------------------------------------------------------------------


def _int_keys(heads: Mapping[int | str, Iterable[int]]) -> dict[int, set[int]]:
    """Head map with int layer keys (config.json stores them as strings)."""
    return {int(layer): set(indices) for layer, indices in heads.items()}


def _present_heads(model: PreTrainedModel, block: nn.Module) -> list[int]:
    """Original indices of the heads still in an attention block, in position order."""
    already = getattr(block, "pruned_heads", set())
    return [head for head in range(model.config.num_attention_heads) if head not in already]


def original_heads(
    model: PreTrainedModel, positions: Mapping[int, Iterable[int]]
) -> dict[int, list[int]]:
    """Translate heads given by current position into the original indices `prune_heads` takes.

    The two differ only in layers that already lost heads.
    """
    layers = encoder_layers(model)
    return {
        layer: [_present_heads(model, layers[layer].attention)[position] for position in indices]
        for layer, indices in positions.items()
    }


def _keep_heads(block: nn.Module, keep_heads: list[int]) -> None:
    """Slice an attention block down to the heads at the given current positions."""
    attention = block.self
    head_size = attention.attention_head_size
    index = torch.tensor(
        [head * head_size + offset for head in keep_heads for offset in range(head_size)]
    )
    attention.query = prune_linear_layer(attention.query, index)
    attention.key = prune_linear_layer(attention.key, index)
    attention.value = prune_linear_layer(attention.value, index)
    block.output.dense = prune_linear_layer(block.output.dense, index, dim=1)
    attention.num_attention_heads = len(keep_heads)
    attention.all_head_size = len(keep_heads) * head_size


def prune_heads(model: PreTrainedModel, heads: Mapping[int | str, Iterable[int]]) -> None:
    """Physically remove attention heads, given per layer by their original (unpruned) index.

    Shrinks query/key/value (outputs) and attention.output.dense (inputs), and records the union
    of removed heads in `model.config.pruned_heads`. Heads already removed are skipped; removing
    every head of a layer is an error.
    """
    layers = encoder_layers(model)
    recorded = _int_keys(getattr(model.config, "pruned_heads", {}) or {})
    for layer, requested in _int_keys(heads).items():
        block = layers[layer].attention
        present = _present_heads(model, block)
        keep_heads = [position for position, head in enumerate(present) if head not in requested]
        if not keep_heads:
            raise ValueError(f"cannot prune every attention head of layer {layer}")
        if len(keep_heads) == len(present):
            continue
        _keep_heads(block, keep_heads)
        block.pruned_heads = getattr(block, "pruned_heads", set()) | (requested & set(present))
        recorded[layer] = block.pruned_heads
    model.config.pruned_heads = {layer: sorted(pruned) for layer, pruned in recorded.items()}


def _keep_neurons(layer: nn.Module, index: Tensor) -> None:
    """Slice one FFN down to the intermediate neurons at the given current positions."""
    layer.intermediate.dense = prune_linear_layer(layer.intermediate.dense, index)
    layer.output.dense = prune_linear_layer(layer.output.dense, index, dim=1)


def _record_intermediate_sizes(model: PreTrainedModel) -> None:
    """Store every layer's current FFN width in `config.intermediate_sizes`."""
    layers = encoder_layers(model)
    model.config.intermediate_sizes = [layer.intermediate.dense.out_features for layer in layers]


def prune_neurons(model: PreTrainedModel, neurons: Mapping[int, Iterable[int]]) -> None:
    """Physically remove FFN neurons, given per layer by their current position.

    Records every layer's kept width in `model.config.intermediate_sizes`. Removing every
    neuron of a layer is an error.
    """
    layers = encoder_layers(model)
    for layer, removed in neurons.items():
        width = layers[layer].intermediate.dense.out_features
        keep = sorted(set(range(width)) - set(removed))
        if not keep:
            raise ValueError(f"cannot prune every FFN neuron of layer {layer}")
        if len(keep) < width:
            _keep_neurons(layers[layer], torch.tensor(keep))
    _record_intermediate_sizes(model)


def restore_intermediate_sizes(model: PreTrainedModel) -> None:
    """Shrink a freshly built model's FFNs to `config.intermediate_sizes` (shapes only).

    Which neurons are kept does not matter: the state dict loaded afterwards fills the weights.
    """
    sizes = getattr(model.config, "intermediate_sizes", None)
    if not sizes:
        return
    for layer, size in zip(encoder_layers(model), sizes, strict=True):
        width = layer.intermediate.dense.out_features
        if size > width:
            raise ValueError(f"recorded FFN width {size} exceeds the layer's {width}")
        if size < width:
            _keep_neurons(layer, torch.arange(size))


# --- gradual pruning ---------------------------------------------------------------------------


class GradualUnitMask:
    """Silences a growing prefix of a pruning order through forward pre-hooks.

    At progress p in [0, 1] exactly the first `round(p * final)` units of `order` are masked.
    """

    def __init__(self, units: Units, importance: Tensor, fraction: float, min_kept: int) -> None:
        if importance.shape != (len(units.inputs), units.count):
            raise ValueError(
                f"{units.kind} importance has shape {tuple(importance.shape)}, expected "
                f"({len(units.inputs)}, {units.count})"
            )
        self.order = pruning_order(importance, min_kept)
        self.final = _budget(importance, fraction, self.order)
        self.mask = torch.ones(importance.shape, device=units.inputs[0].weight.device)
        self._handles = register_unit_mask(units, self.mask)

    def set_progress(self, progress: float) -> None:
        """Mask exactly the first `round(progress * final)` units of the order, in place."""
        rows = self.order[: round(progress * self.final)]
        self.mask.fill_(1.0)
        self.mask[rows[:, 0], rows[:, 1]] = 0.0

    def masked(self) -> dict[int, list[int]]:
        """{layer: sorted positions} of the units currently masked."""
        return by_layer((self.mask == 0).nonzero())

    def remove(self) -> None:
        """Detach the hooks: the units are no longer masked."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def state_dict(self) -> dict[str, Any]:
        """The pruning order and final count, so a resumed run masks the same units."""
        return {"order": self.order, "final": self.final}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the order and final count; the next `set_progress` masks by them."""
        self.order, self.final = state["order"], state["final"]


class StructuredPruner:
    """Masks the least important heads and FFN neurons progressively, then removes them.

    Units are ranked once by importance. At progress p the `round(p * target)` least important
    heads and neurons are silenced (their outputs are exactly zero); `finalize` removes exactly
    those. A kind whose fraction is 0 gets no hooks and loses no unit.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        head_importance: Tensor,
        neuron_importance: Tensor,
        heads_fraction: float,
        ffn_fraction: float,
        min_neurons: int = MIN_NEURONS,
    ) -> None:
        plans = (
            (head_units, head_importance, heads_fraction, MIN_HEADS),
            (neuron_units, neuron_importance, ffn_fraction, min_neurons),
        )
        self.masks: dict[str, GradualUnitMask] = {}
        for units_of, importance, fraction, floor in plans:
            if fraction != 0:
                units = units_of(model)
                self.masks[units.kind] = GradualUnitMask(units, importance, fraction, floor)
        self.progress = 0.0

    def set_progress(self, progress: float) -> None:
        """Mask the share `progress` (in [0, 1]) of the final number of units of each kind."""
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress must be in [0, 1], got {progress}")
        for mask in self.masks.values():
            mask.set_progress(progress)
        self.progress = progress

    def finalize(self, model: PreTrainedModel) -> None:
        """Remove the hooks and physically prune exactly the masked heads and neurons.

        Always records `config.pruned_heads` and `config.intermediate_sizes`. When a magnitude
        pruner shares the model, finalize it first: slicing copies each linear's cached weight.
        """
        masked = {kind: mask.masked() for kind, mask in self.masks.items()}
        for mask in self.masks.values():
            mask.remove()
        prune_heads(model, original_heads(model, masked.get("heads", {})))
        prune_neurons(model, masked.get("neurons", {}))

    def state_dict(self) -> dict[str, Any]:
        """The progress and the rankings, so a resumed run masks the very same units."""
        return {
            "progress": self.progress,
            "masks": {kind: mask.state_dict() for kind, mask in self.masks.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the rankings and mask at the saved progress."""
        for kind, mask in self.masks.items():
            mask.load_state_dict(state["masks"][kind])
        self.set_progress(state["progress"])

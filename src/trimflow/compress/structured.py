"""Structured pruning of transformer encoders: attention heads and FFN neurons.

Where a family keeps its attention and FFN comes from its row of the family table
(`trimflow.models.families`). A *unit* is an equal-width slice of the input of one linear layer
per encoder layer:

* an attention head is `head_size` input columns of the attention output projection;
* an FFN neuron is one input column of the FFN output projection (one intermediate activation).

Scaling a unit's slice by a mask entry (a forward pre-hook) silences it at 0 and, with a mask of
ones requiring grad, gives its importance |dL/dmask| (Michel et al., 2019) for every kind of unit
in one backward pass per batch.

Units are removed by slicing the linears with `transformers.pytorch_utils.prune_linear_layer`
(transformers 5.x dropped `PreTrainedModel.prune_heads`): a head's output rows of every q/k/v
projection (in each third of a fused one) and its input columns of the attention output, a
neuron's output row of the FFN input projection (both halves of a gated one) and its input column
of the FFN output. Removed heads are recorded in `config.pruned_heads` (original head indices)
and the kept FFN width of every layer in `config.intermediate_sizes`; `save_pretrained` writes
both to config.json, and `pruned.load_pruned` rebuilds those shapes before loading the weights.
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

from trimflow.models.families import EncoderFamily, encoder_layers, family_of, submodule

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


def _family_layers(model: PreTrainedModel) -> tuple[EncoderFamily, list[nn.Module]]:
    """The model's family row and encoder layers; a ConfigError for a family not in the table."""
    return family_of(model.config, "structured pruning"), encoder_layers(model)


def _uniform(kind: str, counts: Iterable[int]) -> int:
    """The per-layer unit count, which masks ([layers, units] tensors) need to be equal."""
    distinct = set(counts)
    if len(distinct) != 1:
        raise ValueError(f"masking {kind} needs the same number of {kind} in every layer")
    return distinct.pop()


def _head_size(family: EncoderFamily, layer: nn.Module) -> int:
    """The width of one attention head of `layer`."""
    return getattr(submodule(layer, family.attention), family.head_size_attribute)


def _ffn_width(family: EncoderFamily, layer: nn.Module) -> int:
    """The current number of FFN neurons of `layer`."""
    return submodule(layer, family.ffn_output).in_features


def head_units(model: PreTrainedModel) -> Units:
    """Attention heads: `head_size` input columns each of the attention output projection."""
    family, layers = _family_layers(model)
    outputs = [submodule(layer, family.attention_output) for layer in layers]
    size = _head_size(family, layers[0])
    count = _uniform("heads", (output.in_features // size for output in outputs))
    return Units("heads", outputs, count, size)


def neuron_units(model: PreTrainedModel) -> Units:
    """FFN intermediate neurons: one input column each of the FFN output projection."""
    family, layers = _family_layers(model)
    outputs = [submodule(layer, family.ffn_output) for layer in layers]
    count = _uniform("neurons", (output.in_features for output in outputs))
    return Units("neurons", outputs, count, 1)


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


def _present_heads(model: PreTrainedModel, attention: nn.Module) -> list[int]:
    """Original indices of the heads still in an attention module, in position order."""
    already = getattr(attention, "pruned_heads", set())
    return [head for head in range(model.config.num_attention_heads) if head not in already]


def original_heads(
    model: PreTrainedModel, positions: Mapping[int, Iterable[int]]
) -> dict[int, list[int]]:
    """Translate heads given by current position into the original indices `prune_heads` takes.

    The two differ only in layers that already lost heads.
    """
    family, layers = _family_layers(model)
    translated = {}
    for layer, indices in positions.items():
        present = _present_heads(model, submodule(layers[layer], family.attention))
        translated[layer] = [present[position] for position in indices]
    return translated


def _slice(layer: nn.Module, path: str, index: Tensor, dim: int = 0) -> None:
    """Replace the linear at `path` in `layer` by its entries `index` along `dim` (0: outputs)."""
    layer.set_submodule(path, prune_linear_layer(submodule(layer, path), index, dim=dim))


def _keep_heads(family: EncoderFamily, layer: nn.Module, keep_heads: list[int]) -> None:
    """Slice a layer's attention down to the heads at the given current positions."""
    attention = submodule(layer, family.attention)
    head_size = _head_size(family, layer)
    width = submodule(layer, family.attention_output).in_features
    columns = torch.tensor(
        [head * head_size + offset for head in keep_heads for offset in range(head_size)]
    )
    rows = torch.cat([part * width + columns for part in range(3)]) if family.fused_qkv else columns
    for path in family.projections:
        if submodule(layer, path) is not None:
            _slice(layer, path, rows)
    _slice(layer, family.attention_output, columns, dim=1)
    for name in family.head_count_attributes:
        setattr(attention, name, len(keep_heads))
    for name in family.head_width_attributes:
        setattr(attention, name, len(keep_heads) * head_size)


def prune_heads(model: PreTrainedModel, heads: Mapping[int | str, Iterable[int]]) -> None:
    """Physically remove attention heads, given per layer by their original (unpruned) index.

    Shrinks the q/k/v projections (outputs) and the attention output (inputs), and records the
    union of removed heads in `model.config.pruned_heads`. Heads already removed are skipped;
    removing every head of a layer is an error.
    """
    family, layers = _family_layers(model)
    recorded = _int_keys(getattr(model.config, "pruned_heads", {}) or {})
    for layer, requested in _int_keys(heads).items():
        attention = submodule(layers[layer], family.attention)
        present = _present_heads(model, attention)
        keep_heads = [position for position, head in enumerate(present) if head not in requested]
        if not keep_heads:
            raise ValueError(f"cannot prune every attention head of layer {layer}")
        if len(keep_heads) == len(present):
            continue
        _keep_heads(family, layers[layer], keep_heads)
        removed = requested & set(present)
        attention.pruned_heads = getattr(attention, "pruned_heads", set()) | removed
        recorded[layer] = attention.pruned_heads
    model.config.pruned_heads = {layer: sorted(pruned) for layer, pruned in recorded.items()}


def _keep_neurons(family: EncoderFamily, layer: nn.Module, index: Tensor) -> None:
    """Slice one FFN down to the intermediate neurons at the given current positions."""
    rows = index
    if family.gated_ffn:  # neuron j is row j of the input half and row I + j of the gate half
        rows = torch.cat([index, _ffn_width(family, layer) + index])
    _slice(layer, family.ffn_input, rows)
    _slice(layer, family.ffn_output, index, dim=1)


def prune_neurons(model: PreTrainedModel, neurons: Mapping[int, Iterable[int]]) -> None:
    """Physically remove FFN neurons, given per layer by their current position.

    Records every layer's kept width in `model.config.intermediate_sizes`. Removing every
    neuron of a layer is an error.
    """
    family, layers = _family_layers(model)
    for layer, removed in neurons.items():
        width = _ffn_width(family, layers[layer])
        keep = sorted(set(range(width)) - set(removed))
        if not keep:
            raise ValueError(f"cannot prune every FFN neuron of layer {layer}")
        if len(keep) < width:
            _keep_neurons(family, layers[layer], torch.tensor(keep))
    model.config.intermediate_sizes = [_ffn_width(family, layer) for layer in layers]


def restore_intermediate_sizes(model: PreTrainedModel) -> None:
    """Shrink a freshly built model's FFNs to `config.intermediate_sizes` (shapes only).

    Which neurons are kept does not matter: the state dict loaded afterwards fills the weights.
    """
    sizes = getattr(model.config, "intermediate_sizes", None)
    if not sizes:
        return
    family, layers = _family_layers(model)
    for layer, size in zip(layers, sizes, strict=True):
        width = _ffn_width(family, layer)
        if size > width:
            raise ValueError(f"recorded FFN width {size} exceeds the layer's {width}")
        if size < width:
            _keep_neurons(family, layer, torch.arange(size))


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

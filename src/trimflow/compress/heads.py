"""Structured attention-head pruning guided by gradient importance (Michel et al., 2019).

transformers 5.x dropped both the `head_mask` forward argument and `PreTrainedModel.prune_heads`,
so this module provides both pieces itself for BERT-style encoders (`encoder.layer[i].attention`
with `self.query/key/value` and `output.dense`):

* the head mask is applied by a forward pre-hook that scales each head's slice of the context
  layer just before `attention.output.dense`;
* heads are removed by slicing the linear layers with `transformers.pytorch_utils`.

Pruned heads are recorded in `config.pruned_heads` (original head indices), which
`save_pretrained` writes to config.json. `from_pretrained` no longer re-applies them, so a pruned
directory must be loaded with `load_pruned`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel
from transformers.pytorch_utils import prune_linear_layer


def _attention_blocks(model: PreTrainedModel) -> list[nn.Module]:
    """The self-attention block (`layer.attention`) of every encoder layer."""
    return [layer.attention for layer in model.base_model.encoder.layer]


def _head_scaling_hook(mask: Tensor, head_size: int) -> Callable[..., tuple[Tensor, ...]]:
    """A pre-hook multiplying each head's slice of the dense input by its entry in `mask`."""

    def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        context, *rest = args
        per_head = context.unflatten(-1, (mask.numel(), head_size)) * mask[:, None]
        return (per_head.flatten(-2), *rest)

    return hook


def head_importance(
    model: PreTrainedModel,
    batches: Iterable[dict[str, Tensor]],
    max_batches: int | None = None,
) -> Tensor:
    """Per-head importance: |dL/d head_mask| summed over batches, L2-normalised per layer.

    Batches must contain `labels`. Returns a [num_layers, num_heads] tensor, so every layer must
    have the same number of heads (score before pruning). The model is left unchanged: it runs in
    eval mode, its train/eval mode is restored and no parameter gradient is accumulated.
    """
    blocks = _attention_blocks(model)
    if len({block.self.num_attention_heads for block in blocks}) > 1:
        raise ValueError("head importance needs the same number of heads in every layer")
    num_heads = blocks[0].self.num_attention_heads
    head_size = blocks[0].self.attention_head_size
    device = next(model.parameters()).device
    importance = torch.zeros(len(blocks), num_heads, device=device)
    was_training = model.training
    model.eval()
    with torch.enable_grad():
        mask = torch.ones(len(blocks), num_heads, device=device, requires_grad=True)
        handles = [
            block.output.dense.register_forward_pre_hook(_head_scaling_hook(mask[i], head_size))
            for i, block in enumerate(blocks)
        ]
        try:
            for batch in itertools.islice(batches, max_batches):
                loss = model(**{key: value.to(device) for key, value in batch.items()}).loss
                (grad,) = torch.autograd.grad(loss, mask)
                importance += grad.abs()
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
    return importance / importance.norm(dim=-1, keepdim=True).clamp_min(1e-20)


def select_heads_to_prune(importance: Tensor, fraction: float) -> dict[int, list[int]]:
    """The `round(fraction * total_heads)` globally least important heads, keeping one per layer.

    Returns {layer: sorted head indices}, only for layers that lose at least one head.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    num_layers, num_heads = importance.shape
    budget = round(fraction * importance.numel())
    remaining = [num_heads] * num_layers
    selected: dict[int, list[int]] = {}
    for flat in torch.argsort(importance.flatten(), stable=True).tolist():
        if budget == 0:
            break
        layer, head = divmod(flat, num_heads)
        if remaining[layer] > 1:
            selected.setdefault(layer, []).append(head)
            remaining[layer] -= 1
            budget -= 1
    return {layer: sorted(heads) for layer, heads in sorted(selected.items())}


def _normalised(heads: Mapping[int | str, Iterable[int]]) -> dict[int, set[int]]:
    """Head map with int layer keys (config.json stores them as strings)."""
    return {int(layer): set(indices) for layer, indices in heads.items()}


def prune_heads(model: PreTrainedModel, heads: Mapping[int | str, Iterable[int]]) -> None:
    """Physically remove attention heads, given per layer by their original (unpruned) index.

    Shrinks query/key/value (outputs) and attention.output.dense (inputs), and records the union
    of removed heads in `model.config.pruned_heads`. Heads already removed are skipped; removing
    every head of a layer is an error.
    """
    blocks = _attention_blocks(model)
    original_heads = model.config.num_attention_heads
    recorded = _normalised(getattr(model.config, "pruned_heads", {}) or {})
    for layer, requested in _normalised(heads).items():
        block = blocks[layer]
        already = getattr(block, "pruned_heads", set())
        present = [head for head in range(original_heads) if head not in already]
        keep_heads = [position for position, head in enumerate(present) if head not in requested]
        if not keep_heads:
            raise ValueError(f"cannot prune every attention head of layer {layer}")
        if len(keep_heads) == len(present):
            continue
        _keep_heads(block, keep_heads)
        block.pruned_heads = already | (requested & set(present))
        recorded[layer] = block.pruned_heads
    model.config.pruned_heads = {layer: sorted(pruned) for layer, pruned in recorded.items()}


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


def apply_recorded_pruning(model: PreTrainedModel) -> None:
    """Re-apply `config.pruned_heads` to a model freshly built (unpruned) from that config."""
    prune_heads(model, getattr(model.config, "pruned_heads", {}) or {})


def load_pruned(path: str | Path) -> PreTrainedModel:
    """Load a `save_pretrained` classifier directory, re-applying `config.pruned_heads`.

    Needed because transformers 5.x `from_pretrained` ignores `pruned_heads` and would fail on
    the shrunken weights. Directories without pruned heads load through `from_pretrained`.
    """
    config = AutoConfig.from_pretrained(path)
    if not getattr(config, "pruned_heads", None):
        return AutoModelForSequenceClassification.from_pretrained(path).eval()
    model = AutoModelForSequenceClassification.from_config(config)
    apply_recorded_pruning(model)
    state: dict[str, Tensor] = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(shard))
    model.load_state_dict(state)
    return model.eval()

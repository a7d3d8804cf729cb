"""Attention-head pruning guided by gradient importance (Michel et al., 2019), and loading of
structurally pruned models.

transformers 5.x dropped both the `head_mask` forward argument and `PreTrainedModel.prune_heads`;
`trimflow.compress.structured` provides both for BERT-style encoders (a head's mask scales its
slice of the context layer just before `attention.output.dense`; heads are removed by slicing the
linears). This module is the head-level API on top of it.

Removed heads (`config.pruned_heads`) and FFN widths (`config.intermediate_sizes`) are saved in
config.json, but `from_pretrained` re-applies neither, so a structurally pruned directory must be
loaded with `load_pruned`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from safetensors.torch import load_file
from torch import Tensor
from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel

from trimflow.compress.structured import (
    MIN_HEADS,
    head_units,
    masked_unit_importance,
    prune_heads,
    restore_intermediate_sizes,
    select_units,
)
from trimflow.models.loading import auto_model_class, load_classifier

__all__ = [
    "apply_recorded_pruning",
    "head_importance",
    "is_structurally_pruned",
    "load_pruned",
    "model_skeleton",
    "prune_heads",
    "select_heads_to_prune",
]


def head_importance(
    model: PreTrainedModel,
    batches: Iterable[dict[str, Tensor]],
    max_batches: int | None = None,
) -> Tensor:
    """Per-head importance: |dL/d head_mask| summed over batches, L2-normalised per layer.

    Batches must contain `labels`. Returns a [num_layers, num_heads] tensor, so every layer must
    have the same number of heads (score before pruning). The model is left unchanged.
    `structured.unit_importance` scores heads and FFN neurons in the same pass.
    """
    return masked_unit_importance(model, [head_units(model)], batches, max_batches)[0]


def select_heads_to_prune(importance: Tensor, fraction: float) -> dict[int, list[int]]:
    """The `round(fraction * total_heads)` globally least important heads, keeping one per layer.

    Returns {layer: sorted head indices}, only for layers that lose at least one head.
    """
    return select_units(importance, fraction, MIN_HEADS)


def apply_recorded_pruning(model: PreTrainedModel) -> None:
    """Re-create the recorded pruned shapes (heads and FFN widths) on a freshly built model."""
    prune_heads(model, getattr(model.config, "pruned_heads", {}) or {})
    restore_intermediate_sizes(model)


def is_structurally_pruned(config: PreTrainedConfig) -> bool:
    """Whether a config records removed heads or narrowed FFNs."""
    sizes = getattr(config, "intermediate_sizes", None) or []
    narrowed = any(size != config.intermediate_size for size in sizes)
    return bool(getattr(config, "pruned_heads", None)) or narrowed


def model_skeleton(path: str | Path) -> PreTrainedModel:
    """A sequence or token classifier built from `path`'s config.json, pruned shapes applied.

    Its weights are freshly initialised: load a state dict into it.
    """
    config = AutoConfig.from_pretrained(path)
    model = auto_model_class(config).from_config(config)
    apply_recorded_pruning(model)
    return model


def load_pruned(path: str | Path) -> PreTrainedModel:
    """Load a saved sequence or token classifier, re-applying the recorded pruning.

    Needed because transformers 5.x `from_pretrained` ignores `pruned_heads` and
    `intermediate_sizes` and would fail on the shrunken weights. Unpruned directories load
    through `from_pretrained`.
    """
    if not is_structurally_pruned(AutoConfig.from_pretrained(path)):
        return load_classifier(path)
    model = model_skeleton(path)
    state: dict[str, Tensor] = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(shard))
    model.load_state_dict(state)
    return model.eval()

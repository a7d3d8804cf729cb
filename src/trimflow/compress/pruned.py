"""Loading structurally pruned models: their recorded shapes are rebuilt before the weights.

transformers 5.x dropped `PreTrainedModel.prune_heads`; `trimflow.compress.structured` removes
heads and FFN neurons by slicing the linears and records removed heads (`config.pruned_heads`)
and FFN widths (`config.intermediate_sizes`) in config.json. `from_pretrained` re-applies
neither, so a structurally pruned directory must be loaded with `load_pruned`.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file
from torch import Tensor
from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel

from trimflow.compress.structured import prune_heads, restore_intermediate_sizes
from trimflow.models.families import intermediate_size
from trimflow.models.loading import auto_model_class, load_classifier


def apply_recorded_pruning(model: PreTrainedModel) -> None:
    """Re-create the recorded pruned shapes (heads and FFN widths) on a freshly built model.

    A model with nothing recorded is left alone, whatever its family.
    """
    if is_structurally_pruned(model.config):
        prune_heads(model, getattr(model.config, "pruned_heads", {}) or {})
        restore_intermediate_sizes(model)


def is_structurally_pruned(config: PreTrainedConfig) -> bool:
    """Whether a config records removed heads or FFNs narrower than its family's width.

    The family is looked up only where something is recorded: any other model is unpruned.
    """
    if getattr(config, "pruned_heads", None):
        return True
    sizes = getattr(config, "intermediate_sizes", None) or []
    return any(size != intermediate_size(config) for size in sizes)


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

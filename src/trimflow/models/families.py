"""The encoder families trimflow compresses: one table keyed by `config.model_type`.

A row says where a family keeps its layers and how its attention and FFN are laid out, which is
all that structured pruning, layer-dropping distillation, the adapters' default targets and the
tokenizer need to know about an architecture. Paths are dotted attribute paths: `layers`
from the base model (`model.base_model`), every other path from one layer of that list.

Adding a family is one row here (docs/architecture.md: the recipe and its tests). A model whose
`model_type` has no row still fine-tunes, adapts with explicit `target_modules`, quantizes,
evaluates and serves; prune and distill refuse it before any work (`family_of`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

from trimflow.config.loading import ConfigError


@dataclass(frozen=True)
class EncoderFamily:
    """Where one family keeps its layers, and how attention and FFN are laid out."""

    name: str
    # The ModuleList of encoder layers, from the base model.
    layers: str
    # The module holding the head-count attributes (below), from a layer.
    attention: str
    # Linears whose outputs are laid out [heads, head_size]; a fused one [3, heads, head_size].
    # A path a layer lacks is skipped (DeBERTa's pos_key_proj exists only without share_att_key).
    projections: tuple[str, ...]
    # The linear whose input is laid out [heads, head_size] (the attention output projection).
    attention_output: str
    # The attention module's attribute holding the width of one head.
    head_size_attribute: str
    # The FFN: input projection (out: intermediate neurons) and output projection (in: neurons).
    ffn_input: str
    ffn_output: str
    # Attributes of the attention module set to the kept head count / kept heads * head size,
    # where the family's forward reads them.
    head_count_attributes: tuple[str, ...] = ()
    head_width_attributes: tuple[str, ...] = ()
    # One fused q/k/v projection, its output laid out [3, heads, head_size] (ModernBERT's Wqkv).
    fused_qkv: bool = False
    # A GLU whose input projection holds [input; gate]: neuron j is rows j and I + j.
    gated_ffn: bool = False
    # The config key of the unpruned FFN width.
    intermediate_size_key: str = "intermediate_size"
    # Config lists with one entry per layer, re-indexed when layers are dropped.
    per_layer_config: tuple[str, ...] = ()
    # The first layer differs from the others (ModernBERT's has no attention LayerNorm): a
    # layer-dropping student must keep the teacher's layer 0 first.
    first_layer_distinct: bool = False
    # Whether the model takes `token_type_ids` (segment embeddings).
    token_type_ids: bool = True
    # Adapter targets by default: LoRA and AdaLoRA (queries and values, Hu et al.), IA3 (keys,
    # values and the FFN output, whose input it rescales: Liu et al.).
    lora_targets: tuple[str, ...] = ("query", "value")
    ia3_targets: tuple[str, ...] = ("key", "value", "output.dense")
    ia3_feedforward: tuple[str, ...] = ("output.dense",)


_BERT_LIKE = dict(
    layers="encoder.layer",
    attention="attention.self",
    projections=("attention.self.query", "attention.self.key", "attention.self.value"),
    attention_output="attention.output.dense",
    head_size_attribute="attention_head_size",
    head_count_attributes=("num_attention_heads",),
    head_width_attributes=("all_head_size",),
    ffn_input="intermediate.dense",
    ffn_output="output.dense",
)

ENCODER_FAMILIES: dict[str, EncoderFamily] = {
    "bert": EncoderFamily("BERT", **_BERT_LIKE),
    "roberta": EncoderFamily("RoBERTa", token_type_ids=False, **_BERT_LIKE),
    "xlm-roberta": EncoderFamily("XLM-RoBERTa", token_type_ids=False, **_BERT_LIKE),
    "electra": EncoderFamily("ELECTRA", **_BERT_LIKE),
    "distilbert": EncoderFamily(
        "DistilBERT",
        layers="transformer.layer",
        attention="attention",
        projections=("attention.q_lin", "attention.k_lin", "attention.v_lin"),
        attention_output="attention.out_lin",
        head_size_attribute="attention_head_size",
        head_count_attributes=("n_heads",),
        ffn_input="ffn.lin1",
        ffn_output="ffn.lin2",
        intermediate_size_key="hidden_dim",
        token_type_ids=False,
        lora_targets=("q_lin", "v_lin"),
        ia3_targets=("k_lin", "v_lin", "lin2"),
        ia3_feedforward=("lin2",),
    ),
    "deberta-v2": EncoderFamily(
        "DeBERTa-v2/v3",
        layers="encoder.layer",
        attention="attention.self",
        projections=(
            "attention.self.query_proj",
            "attention.self.key_proj",
            "attention.self.value_proj",
            "attention.self.pos_key_proj",
            "attention.self.pos_query_proj",
        ),
        attention_output="attention.output.dense",
        head_size_attribute="attention_head_size",
        head_count_attributes=("num_attention_heads",),
        head_width_attributes=("all_head_size",),
        ffn_input="intermediate.dense",
        ffn_output="output.dense",
        lora_targets=("query_proj", "value_proj"),
        ia3_targets=("key_proj", "value_proj", "output.dense"),
    ),
    "modernbert": EncoderFamily(
        "ModernBERT",
        layers="layers",
        attention="attn",
        projections=("attn.Wqkv",),
        attention_output="attn.Wo",
        head_size_attribute="head_dim",
        fused_qkv=True,
        ffn_input="mlp.Wi",
        ffn_output="mlp.Wo",
        gated_ffn=True,
        per_layer_config=("layer_types",),
        first_layer_distinct=True,
        token_type_ids=False,
        lora_targets=("Wqkv",),
        ia3_targets=("Wqkv", "mlp.Wo"),
        ia3_feedforward=("mlp.Wo",),
    ),
}


def supported_families() -> str:
    """The table's model types, for error messages."""
    return ", ".join(sorted(ENCODER_FAMILIES))


def family_of(config: PreTrainedConfig, needed_by: str = "this stage") -> EncoderFamily:
    """The table row of `config.model_type`; a ConfigError naming it and the supported ones."""
    family = ENCODER_FAMILIES.get(config.model_type)
    if family is None:
        raise ConfigError(
            f"model.name: {needed_by} does not support model_type '{config.model_type}' "
            f"(supported: {supported_families()}); fine-tune, adapt with explicit "
            "target_modules, quantize, evaluate and serve work with any encoder"
        )
    return family


def submodule(root: nn.Module, path: str) -> nn.Module | None:
    """The module at dotted `path` under `root`, or None where a step is missing."""
    module = root
    for step in path.split("."):
        module = getattr(module, step, None)
        if module is None:
            return None
    return module


def encoder_layers(model: PreTrainedModel) -> list[nn.Module]:
    """The encoder layers of `model`, by its family's table row."""
    return list(submodule(model.base_model, family_of(model.config).layers))


def intermediate_size(config: PreTrainedConfig) -> int:
    """The unpruned FFN width of a model of a supported family."""
    return getattr(config, family_of(config).intermediate_size_key)

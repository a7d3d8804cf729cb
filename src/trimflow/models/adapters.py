"""Parameter-efficient adaptation of a classifier of any encoder family: peft's LoRA, AdaLoRA,
IA3 and prefix tuning, and BitFit and bottleneck adapters by hand; saving the adapter alone,
merging it, and loading it back unmerged.

Null target modules are the family's defaults (models.families). An adapted variant's directory
holds the adapter in `adapter/` (peft's files, or the trained tensors of BitFit and bottleneck
adapters) and `adaptation.json` (method, base model); for a method that merges, the merged model
beside them in the ordinary save_pretrained layout, so every other stage reads it like any
variant. A prefix-tuned or bottleneck variant has only config, tokenizer and label map beside
its adapter, and is loaded as base model + adapter.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from peft import (
    AdaLoraConfig,
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    TaskType,
    get_peft_model,
)
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from trimflow.config.loading import ConfigError
from trimflow.config.schema import (
    MERGEABLE_METHODS,
    AdaLoraAdapter,
    AdaptVariant,
    BitFitAdapter,
    BottleneckAdapter,
    Ia3Adapter,
    LoraAdapter,
    PrefixAdapter,
)
from trimflow.layout import ADAPTATION_FILE, ADAPTER_DIR, LABEL_MAP_FILE
from trimflow.models.families import (
    ENCODER_FAMILIES,
    encoder_layers,
    family_of,
    submodule,
    supported_families,
)
from trimflow.models.loading import (
    TASK_MODELS,
    auto_model_class,
    is_token_classifier,
    load_base_classifier,
    save_model_dir,
)
from trimflow.utils.atomic import read_json, write_json

# The methods trimflow trains by hand, whose adapter is their trained tensors in one file
# `<method>.safetensors` (BitFit: bitfit.safetensors), and the bottleneck's shape beside it.
TENSOR_METHODS = ("bitfit", "bottleneck")
BOTTLENECK_CONFIG = "bottleneck.json"
NORM_MARKERS = ("LayerNorm", "layer_norm", "layernorm")
# Linear modules an unknown target's error lists at most, for a family outside the table.
LISTED_MODULES = 24
PEFT_TARGETED = LoraAdapter | AdaLoraAdapter | Ia3Adapter


def head_modules(model: PreTrainedModel) -> list[str]:
    """The task head: the model's top-level children with weights, besides the encoder."""
    return [
        name
        for name, child in model.named_children()
        if name != model.base_model_prefix and any(True for _ in child.parameters())
    ]


def _linear_names(root: nn.Module) -> list[str]:
    return [name for name, module in root.named_modules() if isinstance(module, nn.Linear)]


def target_candidates(model: PreTrainedModel) -> str:
    """What a target may name: the linear modules of the first encoder layer, or for a family
    outside the table the model's first linear modules."""
    if model.config.model_type in ENCODER_FAMILIES:
        first = _linear_names(encoder_layers(model)[0])
        return f"linear modules of its first layer: {', '.join(first)}"
    names = _linear_names(model)
    more = ", ..." if len(names) > LISTED_MODULES else ""
    return f"its linear modules: {', '.join(names[:LISTED_MODULES])}{more}"


def check_target_modules(model: PreTrainedModel, targets: list[str], config_key: str) -> None:
    """Fail, naming `config_key`, when a target matches no module name (peft matches suffixes
    at dot boundaries)."""
    names = [name for name, _ in model.named_modules()]
    for target in targets:
        if not any(name == target or name.endswith(f".{target}") for name in names):
            raise ConfigError(
                f"{config_key}: '{target}' matches no module of {type(model).__name__} "
                f"({target_candidates(model)})"
            )


def resolve_targets(model: PreTrainedModel, spec: AdaptVariant, config_key: str) -> AdaptVariant:
    """`spec` with null target (and IA3 feedforward) modules set to the defaults of the model's
    family; a ConfigError naming the key where the family has no row."""
    if not isinstance(spec, PEFT_TARGETED):
        return spec
    family = ENCODER_FAMILIES.get(model.config.model_type)

    def default(key: str, field: str) -> list[str]:
        if family is None:
            raise ConfigError(
                f"{config_key}.{key}: no default for model_type '{model.config.model_type}' "
                f"(defaults exist for: {supported_families()}); set them explicitly"
            )
        return list(getattr(family, field))

    ia3 = isinstance(spec, Ia3Adapter)
    targets = spec.target_modules or default(
        "target_modules", "ia3_targets" if ia3 else "lora_targets"
    )
    if not ia3:
        return spec.model_copy(update={"target_modules": targets})
    feedforward = spec.feedforward_modules
    if feedforward is None:
        feedforward = [m for m in default("feedforward_modules", "ia3_feedforward") if m in targets]
    extra = [m for m in feedforward if m not in targets]
    if extra:
        raise ConfigError(
            f"{config_key}.feedforward_modules: {extra} are not among the target modules {targets}"
        )
    return spec.model_copy(update={"target_modules": targets, "feedforward_modules": feedforward})


def _peft_config(spec: AdaptVariant, task_type: TaskType, heads: list[str]) -> PeftConfig:
    """The peft config of a LoRA, AdaLoRA, IA3 or prefix spec."""
    common = {"task_type": task_type, "modules_to_save": heads}
    if isinstance(spec, LoraAdapter):
        return LoraConfig(
            r=spec.r,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            target_modules=spec.target_modules,
            **common,
        )
    if isinstance(spec, AdaLoraAdapter):
        # The step counts are set from the trainer's schedule when training starts
        # (AdaLoraBudget); these placeholders only pass peft's checks.
        return AdaLoraConfig(
            init_r=spec.init_r,
            target_r=spec.target_r,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            target_modules=spec.target_modules,
            deltaT=spec.delta_t,
            orth_reg_weight=spec.orth_reg_weight,
            total_step=100,
            tinit=0,
            tfinal=0,
            **common,
        )
    if isinstance(spec, Ia3Adapter):
        return IA3Config(
            target_modules=spec.target_modules,
            feedforward_modules=spec.feedforward_modules,
            **common,
        )
    if isinstance(spec, PrefixAdapter):
        return PrefixTuningConfig(num_virtual_tokens=spec.num_virtual_tokens, **common)
    raise TypeError(f"no peft method for {type(spec).__name__}")


def is_bitfit_weight(name: str, heads: list[str]) -> bool:
    """Whether BitFit trains parameter `name`: a bias, a LayerNorm weight, or the head's."""
    return (
        name.endswith(".bias")
        or any(marker in name for marker in NORM_MARKERS)
        or name.split(".", 1)[0] in heads
    )


# peft 0.21.2 has no Houlsby bottleneck adapter (peft.PeftType's ADAPTION_PROMPT is
# LLaMA-Adapter's gated prompts), so trimflow inserts its own on the family table's paths.
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


class Bottleneck(nn.Module):
    """x + up(activation(down(x))) (Houlsby et al., 2019); `up` starts at zero, so the adapter
    starts as the identity."""

    def __init__(self, width: int, size: int, activation: str) -> None:
        super().__init__()
        self.down = nn.Linear(width, size)
        self.activation = ACTIVATIONS[activation]()
        self.up = nn.Linear(size, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` plus the bottleneck's correction of it."""
        return x + self.up(self.activation(self.down(x)))


class WithBottleneck(nn.Module):
    """A projection followed by its bottleneck adapter (before the residual add and norm)."""

    def __init__(self, projection: nn.Linear, size: int, activation: str) -> None:
        super().__init__()
        self.projection = projection
        weight = projection.weight
        self.adapter = Bottleneck(projection.out_features, size, activation).to(
            weight.device, weight.dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The projection's output, through the adapter."""
        return self.adapter(self.projection(x))


def add_bottlenecks(
    model: PreTrainedModel, size: int, activation: str, needed_by: str = "bottleneck adapters"
) -> PreTrainedModel:
    """`model` with a bottleneck adapter after the attention and the FFN output projections of
    every encoder layer (the family table's `attention_output` and `ffn_output`)."""
    family = family_of(model.config, needed_by)
    for layer in encoder_layers(model):
        for path in (family.attention_output, family.ffn_output):
            layer.set_submodule(path, WithBottleneck(submodule(layer, path), size, activation))
    return model


def check_takes_key_value_cache(model: PreTrainedModel, config_key: str) -> None:
    """Prefix tuning feeds its virtual tokens as past keys and values: fail, naming the key,
    for an encoder whose forward takes none (DistilBERT, DeBERTa, ModernBERT)."""
    if "past_key_values" not in inspect.signature(model.base_model.forward).parameters:
        raise ConfigError(
            f"{config_key}.method: prefix tuning needs an encoder that takes past_key_values, "
            f"and {type(model.base_model).__name__} (model_type '{model.config.model_type}') "
            "does not: use lora, ia3, adalora, bottleneck or bitfit"
        )


def adapt_model(model: PreTrainedModel, spec: AdaptVariant, config_key: str) -> nn.Module:
    """`model` made ready for `spec`'s method: wrapped by peft (null targets: the family's
    defaults), with everything frozen but biases, LayerNorms and the head (BitFit), or frozen
    with bottleneck adapters added, only they and the head training. The head trains with
    every method."""
    heads = head_modules(model)
    if isinstance(spec, BitFitAdapter):
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(is_bitfit_weight(name, heads))
        return model
    if isinstance(spec, BottleneckAdapter):
        model.requires_grad_(False)  # before the adapters are added: they train
        add_bottlenecks(model, spec.size, spec.activation, f"{config_key} (method bottleneck)")
        for head in heads:
            model.get_submodule(head).requires_grad_(True)
        return model
    if isinstance(spec, PrefixAdapter):
        check_takes_key_value_cache(model, config_key)
    spec = resolve_targets(model, spec, config_key)
    if isinstance(spec, PEFT_TARGETED):
        check_target_modules(model, spec.target_modules, f"{config_key}.target_modules")
    task_type = TaskType.TOKEN_CLS if is_token_classifier(model) else TaskType.SEQ_CLS
    return get_peft_model(model, _peft_config(spec, task_type, heads))


def save_adapter(model: nn.Module, spec: AdaptVariant, adapter_dir: Path) -> None:
    """The adapter alone: peft's adapter files, or the trained tensors (and the bottleneck's
    shape)."""
    if spec.method not in TENSOR_METHODS:
        model.save_pretrained(adapter_dir)
        return
    adapter_dir.mkdir(parents=True, exist_ok=True)
    trained = {
        name: parameter.detach().contiguous()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }
    save_file(trained, adapter_dir / f"{spec.method}.safetensors")
    if isinstance(spec, BottleneckAdapter):
        write_json(adapter_dir / BOTTLENECK_CONFIG, spec.model_dump(include={"size", "activation"}))


def merge_adapter(model: PeftModel) -> PreTrainedModel:
    """`model` with its adapter folded into the weights and its trained head in place.

    The heads peft keeps in `modules_to_save` are put in place first: peft's generic unload
    (BaseTuner._replace_module, which IA3 uses) assigns the replaced module's `weight`, which a
    head of several layers lacks (RoBERTa's, XLM-R's and ELECTRA's dense + out_proj).
    """
    wrapped = model.get_base_model()
    for name, module in list(wrapped.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent, _, child = name.rpartition(".")
            head = module.unload_and_optionally_merge_module(
                merge=True, safe_merge=False, adapter_names=None
            )
            setattr(wrapped.get_submodule(parent), child, head)
    return model.merge_and_unload()


def save_adapted(
    model: nn.Module,
    spec: AdaptVariant,
    base_model: str,
    tokenizer: PreTrainedTokenizerBase,
    label_map: dict,
    out_dir: Path,
) -> None:
    """Write an adapted variant into `out_dir`: the adapter, adaptation.json, and the merged
    model where the method merges (else the base config, tokenizer and label map)."""
    save_adapter(model, spec, out_dir / ADAPTER_DIR)
    mergeable = spec.method in MERGEABLE_METHODS
    if mergeable:
        merged = model if isinstance(spec, BitFitAdapter) else merge_adapter(model)
        save_model_dir(merged.eval(), tokenizer, label_map, out_dir)
    else:
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        base.config.architectures = [type(base).__name__]  # the head: per text or per token
        base.config.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        write_json(out_dir / LABEL_MAP_FILE, label_map)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    write_json(
        out_dir / ADAPTATION_FILE,
        {
            "method": spec.method,
            "base_model": base_model,
            "merged": mergeable,
            # What the base model's weights take, for the size of a variant run unmerged.
            "base_weights_mb": sum(p.numel() * p.element_size() for p in frozen) / 2**20,
        },
    )


def load_unmerged(directory: Path) -> nn.Module:
    """An adapted variant as its base model plus the adapter, in eval mode."""
    directory = Path(directory)
    adaptation = read_json(directory / ADAPTATION_FILE)
    labels = read_json(directory / LABEL_MAP_FILE)["labels"]
    model_class = auto_model_class(AutoConfig.from_pretrained(directory))
    task = next(task for task, auto in TASK_MODELS.items() if auto is model_class)
    base = load_base_classifier(adaptation["base_model"], labels, task)
    adapter_dir = directory / ADAPTER_DIR
    method = adaptation["method"]
    if method not in TENSOR_METHODS:
        return PeftModel.from_pretrained(base, adapter_dir).eval()
    if method == "bottleneck":
        add_bottlenecks(base, **read_json(adapter_dir / BOTTLENECK_CONFIG))
    trained = load_file(adapter_dir / f"{method}.safetensors")
    missing = set(trained) - set(base.state_dict())
    if missing:
        raise KeyError(f"{adapter_dir}: tensors {sorted(missing)[:3]} not in the base model")
    with torch.no_grad():
        base.load_state_dict(trained, strict=False)
    return base.eval()

"""Parameter-efficient adaptation of a classifier: peft's LoRA, AdaLoRA, IA3 and prefix tuning,
and BitFit by hand; saving the adapter alone, merging it, and loading it back unmerged.

An adapted variant's directory holds the adapter in `adapter/` (peft's files, or BitFit's
trained tensors) and `adaptation.json` (method, base model); for a method that merges, the
merged model beside them in the ordinary save_pretrained layout, so every other stage reads it
like any variant. A prefix-tuned variant has only config, tokenizer and label map beside its
adapter, and is loaded as base model + adapter.
"""

from __future__ import annotations

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
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from trimflow.config.loading import ConfigError
from trimflow.config.schema import (
    MERGEABLE_METHODS,
    AdaLoraAdapter,
    AdaptVariant,
    BitFitAdapter,
    Ia3Adapter,
    LoraAdapter,
    PrefixAdapter,
)
from trimflow.layout import ADAPTATION_FILE, ADAPTER_DIR, LABEL_MAP_FILE
from trimflow.models.loading import (
    TASK_MODELS,
    auto_model_class,
    is_token_classifier,
    load_base_classifier,
    save_model_dir,
)
from trimflow.utils.atomic import read_json, write_json

BITFIT_FILE = "bitfit.safetensors"
NORM_MARKERS = ("LayerNorm", "layer_norm", "layernorm")


def head_modules(model: PreTrainedModel) -> list[str]:
    """The task head: the model's top-level children with weights, besides the encoder."""
    return [
        name
        for name, child in model.named_children()
        if name != model.base_model_prefix and any(True for _ in child.parameters())
    ]


def check_target_modules(model: PreTrainedModel, targets: list[str], config_key: str) -> None:
    """Fail, naming `config_key`, when a target matches no module name (peft matches suffixes
    at dot boundaries)."""
    names = [name for name, _ in model.named_modules()]
    for target in targets:
        if not any(name == target or name.endswith(f".{target}") for name in names):
            linear = sorted(
                {name.rsplit("layer.0.", 1)[-1] for name in names if "layer.0." in name}
            )
            raise ConfigError(
                f"{config_key}: '{target}' matches no module of {type(model).__name__} "
                f"(modules of its first layer: {', '.join(linear)})"
            )


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


def adapt_model(model: PreTrainedModel, spec: AdaptVariant, config_key: str) -> nn.Module:
    """`model` made ready for `spec`'s method: wrapped by peft, or (BitFit) with everything
    frozen but biases, LayerNorms and the head. The head trains with every method."""
    heads = head_modules(model)
    if isinstance(spec, BitFitAdapter):
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(is_bitfit_weight(name, heads))
        return model
    if isinstance(spec, LoraAdapter | AdaLoraAdapter | Ia3Adapter):
        check_target_modules(model, spec.target_modules, f"{config_key}.target_modules")
    task_type = TaskType.TOKEN_CLS if is_token_classifier(model) else TaskType.SEQ_CLS
    return get_peft_model(model, _peft_config(spec, task_type, heads))


def save_adapter(model: nn.Module, spec: AdaptVariant, adapter_dir: Path) -> None:
    """The adapter alone: peft's adapter files, or BitFit's trained tensors."""
    if isinstance(spec, BitFitAdapter):
        adapter_dir.mkdir(parents=True, exist_ok=True)
        trained = {
            name: parameter.detach().contiguous()
            for name, parameter in model.named_parameters()
            if parameter.requires_grad
        }
        save_file(trained, adapter_dir / BITFIT_FILE)
    else:
        model.save_pretrained(adapter_dir)


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
        merged = model if isinstance(spec, BitFitAdapter) else model.merge_and_unload()
        save_model_dir(merged.eval(), tokenizer, label_map, out_dir)
    else:
        base = model.get_base_model()
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
    if adaptation["method"] == "bitfit":
        trained = load_file(adapter_dir / BITFIT_FILE)
        missing = set(trained) - set(base.state_dict())
        if missing:
            raise KeyError(f"{adapter_dir}: tensors {sorted(missing)[:3]} not in the base model")
        with torch.no_grad():
            base.load_state_dict(trained, strict=False)
        return base.eval()
    return PeftModel.from_pretrained(base, adapter_dir).eval()

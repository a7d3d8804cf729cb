"""Dynamic int8 quantization of linear layers for CPU inference, with a loadable on-disk format.

A quantized directory holds `quantized_state_dict.pt`, `quantization.json` describing the scheme,
and the source directory's other files (config.json, tokenizer files, label_map.json).
It is rebuilt by re-creating the fp32 architecture from config.json, quantizing it the same way
and loading the state dict.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification

from trimflow.compress.heads import apply_recorded_pruning, load_pruned
from trimflow.utils.atomic import atomic_dir, write_json

STATE_DICT_FILE = "quantized_state_dict.pt"
SCHEME_FILE = "quantization.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
DEPRECATION_MESSAGES = (
    "torch.ao.quantization is deprecated",
    "torch.quantize_per_tensor, torch.quantize_per_channel",
    "TypedStorage is deprecated",
)


@contextlib.contextmanager
def _quiet_quantization_warnings() -> Iterator[None]:
    """Silence torch's deprecation notices for the eager-mode quantization API we rely on."""
    with warnings.catch_warnings():
        for message in DEPRECATION_MESSAGES:
            warnings.filterwarnings("ignore", message=message)
        yield


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with every nn.Linear dynamically quantized to int8."""
    quantized = copy.deepcopy(model).eval()
    with _quiet_quantization_warnings():
        return torch.ao.quantization.quantize_dynamic(
            quantized, {nn.Linear}, dtype=torch.qint8, inplace=True
        )


def save_quantized(model: nn.Module, source_dir: str | Path, out_dir: str | Path) -> None:
    """Atomically write `model`'s state dict, the scheme, and `source_dir`'s non-weight files."""
    source_dir = Path(source_dir)
    if not (source_dir / "config.json").is_file():
        raise FileNotFoundError(f"{source_dir} has no config.json")
    with atomic_dir(out_dir) as tmp:
        for path in source_dir.iterdir():
            if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES):
                shutil.copy2(path, tmp / path.name)
        with _quiet_quantization_warnings():
            torch.save(model.state_dict(), tmp / STATE_DICT_FILE)
        write_json(
            tmp / SCHEME_FILE,
            {
                "scheme": "dynamic_int8",
                "modules": ["Linear"],
                "backend": torch.backends.quantized.engine,
            },
        )


def load_quantized(path: str | Path) -> nn.Module:
    """Rebuild a model written by `save_quantized` (pruned heads included), in eval mode."""
    model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(path))
    apply_recorded_pruning(model)
    quantized = quantize_dynamic_int8(model)
    with _quiet_quantization_warnings():
        quantized.load_state_dict(torch.load(Path(path) / STATE_DICT_FILE, weights_only=True))
    return quantized.eval()


def load_variant(path: str | Path) -> nn.Module:
    """Load any saved variant: a quantized directory or a (possibly head-pruned) pretrained one."""
    if (Path(path) / SCHEME_FILE).is_file():
        return load_quantized(path)
    return load_pruned(path)

"""Post-training quantization schemes for CPU (int8) and GPU (half precision) inference.

The torch schemes, by name (`TORCH_SCHEMES`, the torch rows of config/schemes.py's table):

* `dynamic_int8`: every nn.Linear dynamically quantized to int8 (torch.ao eager mode), with a
  scale per output channel: on the NER default per-tensor scales cost 1.05 entity-F1 points,
  per-channel ones 0.00, for ~5% more batch-1 latency (measured on the fine-tuned MiniLM);
* `dynamic_int8_embeddings`: the same, plus weight-only int8 nn.Embedding (per-row float
  qparams) - the embeddings hold most of a small BERT's weights;
* `bf16` / `fp16`: the whole model cast to that dtype (meant for GPUs; runs on CPU).

A quantized directory holds `quantized_state_dict.pt`, `quantization.json` naming the scheme,
and the source directory's other files (config.json, tokenizer files, label_map.json).
It is rebuilt by re-creating the fp32 architecture from config.json (pruning included),
applying the recorded scheme and loading the state dict.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.ao.nn.quantized import Embedding as QuantizedEmbedding
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
from torch.ao.quantization import float_qparams_weight_only_qconfig, per_channel_dynamic_qconfig

from trimflow.compress.pruned import model_skeleton
from trimflow.models.loading import copy_metadata
from trimflow.utils.atomic import atomic_dir, read_json, write_json

STATE_DICT_FILE = "quantized_state_dict.pt"
SCHEME_FILE = "quantization.json"
DEPRECATION_MESSAGES = (
    "torch.ao.quantization is deprecated",
    "torch.quantize_per_tensor, torch.quantize_per_channel",
    "TypedStorage is deprecated",
)
INT8_QCONFIGS = {
    "dynamic_int8": {nn.Linear: per_channel_dynamic_qconfig},
    "dynamic_int8_embeddings": {
        nn.Linear: per_channel_dynamic_qconfig,
        nn.Embedding: float_qparams_weight_only_qconfig,
    },
}
CAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TORCH_SCHEMES = (*INT8_QCONFIGS, *CAST_DTYPES)
DEFAULT_SCHEME = "dynamic_int8"


@contextlib.contextmanager
def _quiet_quantization_warnings() -> Iterator[None]:
    """Silence torch's deprecation notices for the eager-mode quantization API we rely on."""
    with warnings.catch_warnings():
        for message in DEPRECATION_MESSAGES:
            warnings.filterwarnings("ignore", message=message)
        yield


def _check_scheme(scheme: str) -> None:
    if scheme not in TORCH_SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; expected one of {TORCH_SCHEMES}")


def _contiguous_indices(_module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Quantized embedding kernels need contiguous indices; BERT passes expanded token types."""
    return tuple(arg.contiguous() for arg in args)


def _lookup_tables(model: nn.Module) -> set[nn.Module]:
    """The nn.Embedding modules read by index: the input embeddings and the embeddings block's
    tables (position, token type). Not DeBERTa's `encoder.rel_embeddings`: its whole weight is
    read as a matrix, which a quantized embedding does not offer."""
    tables = {model.get_input_embeddings()}
    block = getattr(getattr(model, "base_model", model), "embeddings", None)
    if isinstance(block, nn.Module):
        tables.update(module for module in block.modules() if isinstance(module, nn.Embedding))
    return tables


def _qconfig_spec(model: nn.Module, scheme: str) -> dict:
    """The scheme's qconfigs, its nn.Embedding entry narrowed to the lookup tables by name."""
    spec = dict(INT8_QCONFIGS[scheme])
    embedding = spec.pop(nn.Embedding, None)
    if embedding is not None:
        tables = _lookup_tables(model)
        spec.update({name: embedding for name, module in model.named_modules() if module in tables})
    return spec


def _apply_scheme(model: nn.Module, scheme: str) -> nn.Module:
    """Quantize or cast `model` in place according to `scheme`; returns it in eval mode."""
    _check_scheme(scheme)
    model.eval()
    if scheme in CAST_DTYPES:
        return model.to(CAST_DTYPES[scheme])
    with _quiet_quantization_warnings():
        torch.ao.quantization.quantize_dynamic(
            model, _qconfig_spec(model, scheme), dtype=torch.qint8, inplace=True
        )
    for module in model.modules():
        if isinstance(module, QuantizedEmbedding):
            module.register_forward_pre_hook(_contiguous_indices)
    return model


def quantize_model(model: nn.Module, scheme: str) -> nn.Module:
    """An eval-mode copy of `model` quantized with `scheme` (one of `TORCH_SCHEMES`)."""
    return _apply_scheme(copy.deepcopy(model), scheme)


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with every nn.Linear dynamically quantized to int8."""
    return quantize_model(model, "dynamic_int8")


def scheme_of(model: nn.Module) -> str | None:
    """The scheme `model` was quantized with, judged from its modules and dtypes (None: fp32)."""
    module_types = {type(module) for module in model.modules()}
    if QuantizedEmbedding in module_types:
        return "dynamic_int8_embeddings"
    if DynamicQuantizedLinear in module_types:
        return "dynamic_int8"
    dtypes = {parameter.dtype for parameter in model.parameters()}
    return next((name for name, dtype in CAST_DTYPES.items() if dtypes == {dtype}), None)


def _scheme_record(scheme: str) -> dict[str, Any]:
    """What `quantization.json` says about `scheme`."""
    if scheme in CAST_DTYPES:
        return {"scheme": scheme, "dtype": str(CAST_DTYPES[scheme]).removeprefix("torch.")}
    return {
        "scheme": scheme,
        "modules": [module.__name__ for module in INT8_QCONFIGS[scheme]],
        "backend": torch.backends.quantized.engine,
    }


def save_quantized(
    model: nn.Module,
    source_dir: str | Path,
    out_dir: str | Path,
    scheme: str = DEFAULT_SCHEME,
) -> None:
    """Atomically write `model`'s state dict, its scheme, and `source_dir`'s non-weight files.

    `model` must have been quantized with `scheme` (see `quantize_model`).
    """
    _check_scheme(scheme)
    if (found := scheme_of(model)) != scheme:
        raise ValueError(f"model looks quantized with {found!r}, not with scheme {scheme!r}")
    source_dir = Path(source_dir)
    if not (source_dir / "config.json").is_file():
        raise FileNotFoundError(f"{source_dir} has no config.json")
    with atomic_dir(out_dir) as tmp:
        copy_metadata(source_dir, tmp)
        with _quiet_quantization_warnings():
            torch.save(model.state_dict(), tmp / STATE_DICT_FILE)
        write_json(tmp / SCHEME_FILE, _scheme_record(scheme))


def load_quantized(path: str | Path) -> nn.Module:
    """Rebuild a model written by `save_quantized` (pruning included), in eval mode."""
    scheme = read_json(Path(path) / SCHEME_FILE)["scheme"]
    quantized = _apply_scheme(model_skeleton(path), scheme)
    with _quiet_quantization_warnings():
        quantized.load_state_dict(torch.load(Path(path) / STATE_DICT_FILE, weights_only=True))
    return quantized

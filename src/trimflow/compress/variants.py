"""Every saved model variant behind one loader, and the builders of the non-HF formats.

A variant directory always carries config.json, the tokenizer and label_map.json of its source;
its weights are one of: HF safetensors (fine-tuned, structurally pruned, distilled, merged
adapters), the sparse bitmask file (magnitude-pruned), a torch quantized state dict, an ONNX
graph, an OpenVINO IR (model.xml + model.bin), or an adapter alone (prefix tuning: the base
model plus `adapter/`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from trimflow.compress.onnx import ONNX_QUANTIZERS, OnnxClassifier, export_onnx
from trimflow.compress.pruned import load_pruned, model_skeleton
from trimflow.compress.quantize import SCHEME_FILE, load_quantized
from trimflow.compress.sparse import SPARSE_FILE, load_sparse, save_sparse
from trimflow.config.schemes import QUANTIZE_SCHEMES
from trimflow.evaluation.machine import has_int8_dot_product
from trimflow.layout import ADAPTATION_FILE
from trimflow.models.loading import copy_metadata, save_model_dir
from trimflow.utils.atomic import write_json

if TYPE_CHECKING:
    from trimflow.compress.openvino import OpenVinoClassifier

ONNX_FILE = "model.onnx"
ONNX_SCHEME_FILE = "onnx.json"
OPENVINO_FILE = "model.xml"  # the graph; its weights are model.bin
OPENVINO_SCHEME_FILE = "openvino.json"


def _check_variant_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a model variant directory (no config.json)")


def variant_runtime(path: str | Path) -> str:
    """What runs the variant saved in `path`: "openvino", "onnxruntime" or "torch" (one of
    config/schemes.py's RUNTIMES)."""
    path = Path(path)
    _check_variant_dir(path)
    if (path / OPENVINO_FILE).is_file():
        return "openvino"
    if (path / ONNX_FILE).is_file():
        return "onnxruntime"
    return "torch"


def load_variant(
    path: str | Path, num_threads: int = 1, device: str = "cpu"
) -> nn.Module | OnnxClassifier | OpenVinoClassifier:
    """Load any saved variant in eval mode on `device`; ONNX Runtime sessions and OpenVINO
    models use `num_threads` CPU threads (torch dynamic int8 and OpenVINO variants run on the
    CPU only)."""
    path = Path(path)
    _check_variant_dir(path)
    if (path / ADAPTATION_FILE).is_file() and not any(path.glob("*.safetensors")):
        from trimflow.models.adapters import load_unmerged  # peft takes ~2 s to import

        return load_unmerged(path).to(device)
    runtime = variant_runtime(path)
    if runtime == "openvino":
        from trimflow.compress.openvino import OpenVinoClassifier  # only where one is loaded

        return OpenVinoClassifier(path / OPENVINO_FILE, num_threads, device)
    if runtime == "onnxruntime":
        return OnnxClassifier(path / ONNX_FILE, num_threads, device)
    if (path / SCHEME_FILE).is_file():
        return load_quantized(path).to(device)
    if (path / SPARSE_FILE).is_file():
        model = model_skeleton(path)
        model.load_state_dict(load_sparse(path / SPARSE_FILE))
        return model.eval().to(device)
    return load_pruned(path).to(device)


def save_sparse_variant(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, label_map: dict, out_dir: Path
) -> None:
    """A magnitude-pruned model directory with its weights in the sparse bitmask format."""
    save_model_dir(model, tokenizer, label_map, out_dir)
    for dense in out_dir.glob("*.safetensors"):
        dense.unlink()
    save_sparse(model.state_dict(), out_dir / SPARSE_FILE)


def save_onnx_variant(
    model: nn.Module,
    source_dir: Path,
    out_dir: Path,
    scheme: str,
    sample: dict[str, Tensor],
    calibration: list[dict[str, Tensor]],
) -> None:
    """Export `model` to ONNX and quantize it per `scheme` (one of `ONNX_QUANTIZERS`)."""
    if scheme not in ONNX_QUANTIZERS:
        raise ValueError(f"unknown ONNX scheme '{scheme}'")
    copy_metadata(source_dir, out_dir)
    target = out_dir / ONNX_FILE
    quantizer = ONNX_QUANTIZERS[scheme]
    if quantizer is None:
        export_onnx(model, sample, target)
    else:
        fp32 = out_dir / "fp32.onnx.tmp"
        export_onnx(model, sample, fp32)
        quantizer(fp32, target, calibration)
        fp32.unlink()
    calibrated = QUANTIZE_SCHEMES[scheme].calibrated
    write_json(
        out_dir / ONNX_SCHEME_FILE,
        {
            "scheme": scheme,
            "calibration_batches": len(calibration) if calibrated else 0,
            # 7-bit weights where the machine that quantized had no VNNI/AMX int8.
            "reduced_range": scheme != "onnx_fp32" and not has_int8_dot_product(),
        },
    )


def save_openvino_variant(
    model: nn.Module,
    source_dir: Path,
    out_dir: Path,
    scheme: str,
    sample: dict[str, Tensor],
    calibration: list[dict[str, Tensor]],
) -> None:
    """Export `model` to ONNX, convert it to OpenVINO IR and quantize it per `scheme` (one of
    `OPENVINO_QUANTIZERS`, calibrated on `calibration`): `save_onnx_variant`'s arguments."""
    from trimflow.compress.openvino import OPENVINO_QUANTIZERS, save_openvino

    if scheme not in OPENVINO_QUANTIZERS:
        raise ValueError(f"unknown OpenVINO scheme '{scheme}'")
    copy_metadata(source_dir, out_dir)
    record = save_openvino(model, sample, out_dir / OPENVINO_FILE, scheme, calibration)
    write_json(out_dir / OPENVINO_SCHEME_FILE, record)


# How the quantize stage saves a variant of each exported runtime (torch: compress.quantize).
EXPORTED_VARIANT_BUILDERS = {
    "onnxruntime": save_onnx_variant,
    "openvino": save_openvino_variant,
}

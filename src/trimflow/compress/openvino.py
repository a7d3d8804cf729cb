"""OpenVINO IR variants: the ONNX export converted (fp32) or quantized by NNCF (int8), and a
classifier that runs them on the CPU.

Both start from the graph `export_onnx` writes for ONNX Runtime. `openvino_fp32` is that graph
converted by `openvino.convert_model` and saved unchanged (`compress_to_fp16=False`: OpenVINO
otherwise stores fp16 weights). `openvino_int8` is NNCF's post-training quantization of the
converted model (`nncf.quantize`, `ModelType.TRANSFORMER`: int8 weights, per channel, and int8
activations calibrated on the quantize stage's validation batches; SmoothQuant scales; the
embedding tables int8 too). NNCF quantizes the OpenVINO model rather than the ONNX graph: its
ONNX backend calibrates with ONNX Runtime and gives a QDQ graph that converts to the same
FakeQuantize layers, plus a Transpose per quantized weight; on the MiniLM shape both ran alike
(within the noise of a shared 2-core machine). Where the CPU has no VNNI/AMX int8
(`has_int8_dot_product`) every weight is quantized to 7 bits (NNCF's overflow fix, ONNX
Runtime's `reduce_range`): on an AVX2-only AMD EPYC it cut a perturbed tiny BERT's largest
logit error ~3x (0.056 to 0.021, and 0.41 to 0.15) against NNCF's default of the first layer
only.

A variant directory (compress/variants.py) holds `model.xml` (the graph) and `model.bin` (the
weights) plus `openvino.json` (scheme, calibration batches, overflow fix, the openvino and nncf
versions).

openvino-telemetry, which both libraries import when it is installed, sends an event to Google
Analytics at `import openvino` and at each conversion, from a child process it waits up to 3 s
for, and writes a client id under ~/intel: this module makes both libraries run as they do
without it (both import it in a try/except ImportError), so it must be imported before anything
imports openvino.
"""

from __future__ import annotations

import sys

# None in sys.modules makes `import openvino_telemetry` raise ImportError.
sys.modules.setdefault("openvino_telemetry", None)

import contextlib  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from importlib.metadata import version  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import openvino  # noqa: E402
import openvino.properties as props  # noqa: E402
import openvino.properties.hint as hints  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from trimflow.compress.onnx import OUTPUT_NAME, ExportedClassifier, export_onnx  # noqa: E402
from trimflow.evaluation.machine import has_int8_dot_product  # noqa: E402

# Element types of weights: float ones, and the integer ones NNCF stores int8 weights in.
FLOAT_TYPES = {openvino.Type.f32, openvino.Type.f16, openvino.Type.bf16}
LOW_PRECISION_TYPES = {openvino.Type.i8, openvino.Type.u8}
DECOMPRESSION_OPS = ("Subtract", "Multiply")
# NNCF's SmoothQuant inserts per-channel activation scales named so: quantization parameters.
SMOOTH_QUANT_MARK = "nncf_smooth_quant"


def _openvino_model(onnx_path: Path) -> openvino.Model:
    """The ONNX graph as an OpenVINO model, its batch and sequence axes left dynamic."""
    return openvino.convert_model(onnx_path)


def _graph_feed(batch: dict[str, Tensor], names: list[str]) -> dict[str, np.ndarray]:
    return {name: batch[name].numpy(force=True) for name in names}


def quantize_openvino_int8(
    model: openvino.Model, calibration_batches: list[dict[str, Tensor]]
) -> openvino.Model:
    """NNCF post-training int8 (transformer preset) calibrated on `calibration_batches`."""
    if not calibration_batches:
        raise ValueError("openvino_int8 needs at least one calibration batch")
    import nncf  # ~3 s to import: only where a variant is quantized
    from nncf.quantization.advanced_parameters import OverflowFix

    names = [port.any_name for port in model.inputs]
    feeds = [_graph_feed(batch, names) for batch in calibration_batches]
    nncf.set_log_level(logging.ERROR)  # "Dataset contains only N samples..." and the like
    # Its progress bars (rich, on stdout): statistics collection, SmoothQuant, bias correction.
    with contextlib.redirect_stdout(io.StringIO()):
        return nncf.quantize(
            model,
            nncf.Dataset(feeds),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(feeds),
            advanced_parameters=nncf.AdvancedQuantizationParameters(
                overflow_fix=None if has_int8_dot_product() else OverflowFix.ENABLE
            ),
        )


# The OpenVINO rows of config/schemes.py: how each turns the converted fp32 model into its own,
# given the calibration batches (None: the converted model is the variant).
OPENVINO_QUANTIZERS: dict[
    str, Callable[[openvino.Model, list[dict[str, Tensor]]], openvino.Model] | None
] = {
    "openvino_fp32": None,
    "openvino_int8": quantize_openvino_int8,
}


def save_openvino(
    model: nn.Module,
    sample: dict[str, Tensor],
    target: Path,
    scheme: str,
    calibration: list[dict[str, Tensor]],
) -> dict:
    """Export `model` to ONNX (traced on `sample`), convert it, quantize it per `scheme` (one of
    `OPENVINO_QUANTIZERS`) and save it as `target` (the .xml graph) and its .bin weights.
    Returns what was done: scheme, calibration batches, overflow fix, library versions."""
    if scheme not in OPENVINO_QUANTIZERS:
        raise ValueError(f"unknown OpenVINO scheme '{scheme}'")
    quantizer = OPENVINO_QUANTIZERS[scheme]
    with tempfile.TemporaryDirectory() as tmp:
        exported = Path(tmp) / "model.onnx"
        export_onnx(model, sample, exported)
        converted = _openvino_model(exported)
        if quantizer is not None:
            converted = quantizer(converted, calibration)
        openvino.save_model(converted, target, compress_to_fp16=False)
    return {
        "scheme": scheme,
        "calibration_batches": len(calibration) if quantizer is not None else 0,
        # NNCF's 7-bit weights: all of them where the machine that quantized had no VNNI/AMX.
        "overflow_fix": None
        if quantizer is None
        else ("first_layer_only" if has_int8_dot_product() else "enable"),
        "openvino": version("openvino"),
        "nncf": version("nncf") if quantizer is not None else None,
    }


def compile_options(num_threads: int) -> dict:
    """Settings of the compiled models: `num_threads` threads, one stream tuned for latency,
    and fp32 arithmetic (on CPUs with AMX or AVX-512 BF16 OpenVINO otherwise runs an fp32
    graph in bf16)."""
    return {
        props.inference_num_threads: num_threads,
        hints.performance_mode: hints.PerformanceMode.LATENCY,
        hints.inference_precision: openvino.Type.f32,
    }


def _consumers(node: openvino.Node) -> list[openvino.Node]:
    return [target.get_node() for target in node.output(0).get_target_inputs()]


def _decompression(weight: openvino.Node) -> tuple[np.ndarray | int, set[str]]:
    """The zero point of a low-precision weight and the names of its decompression constants.

    NNCF stores a quantized weight as Constant(int8) -> Convert -> [Subtract(zero point)] ->
    Multiply(scale); symmetric weights (its default) have no Subtract: their zero is 0.
    """
    zero: np.ndarray | int = 0
    parameters = set()
    (node,) = _consumers(weight)  # the Convert to float
    while len(steps := _consumers(node)) == 1 and steps[0].get_type_name() in DECOMPRESSION_OPS:
        constant = steps[0].input_value(1).get_node()
        while constant.get_type_name() == "Convert":  # a uint8 zero point, converted
            constant = constant.input_value(0).get_node()
        if constant.get_type_name() != "Constant":
            break
        parameters.add(constant.get_name())
        if steps[0].get_type_name() == "Subtract":
            zero = constant.get_data()
        node = steps[0]
    return zero, parameters


def weight_tensors(model: openvino.Model) -> Iterator[tuple[np.ndarray, np.ndarray | int]]:
    """Each weight of an OpenVINO model with the value that stands for zero in it.

    Weights are the float constants of rank >= 1 and the int8/uint8 constants of NNCF's
    quantized weights (each counted once, quantized). Not weights: integer index and shape
    constants, scalars, the scales and zero points that decompress a quantized weight, the
    ranges of FakeQuantize layers (activation quantization) and SmoothQuant's activation scales.
    """
    constants = [op for op in model.get_ordered_ops() if op.get_type_name() == "Constant"]
    quantized, parameters = {}, set()
    for constant in constants:
        consumers = _consumers(constant)
        if (
            constant.get_element_type() in LOW_PRECISION_TYPES
            and len(consumers) == 1
            and consumers[0].get_type_name() == "Convert"
        ):
            quantized[constant.get_name()], decompression = _decompression(constant)
            parameters |= decompression
    for constant in constants:
        name = constant.get_name()
        if name in quantized:
            yield constant.get_data(), quantized[name]
        elif not (
            constant.get_element_type() not in FLOAT_TYPES
            or len(constant.get_output_shape(0)) == 0
            or name in parameters
            or SMOOTH_QUANT_MARK in constant.get_friendly_name()
            or any(
                target.get_node().get_type_name() == "FakeQuantize" and target.get_index() > 0
                for target in constant.output(0).get_target_inputs()
            )
        ):
            yield constant.get_data(), 0


class OpenVinoClassifier(ExportedClassifier):
    """An OpenVINO IR sequence or token classifier compiled for the CPU, called like the torch
    model (see `ExportedClassifier`); `num_threads` inference threads."""

    def __init__(self, path: str | Path, num_threads: int, device: str = "cpu") -> None:
        if device != "cpu":
            raise ValueError(f"{path}: OpenVINO variants run on the CPU, not on {device}")
        self.path = Path(path)
        self.compiled = openvino.Core().compile_model(
            str(self.path), "CPU", compile_options(num_threads)
        )
        self.input_names = [port.any_name for port in self.compiled.inputs]

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """The logits of one feed, from a request of its own (requests are not thread-safe;
        one takes ~10 µs to create)."""
        return self.compiled.create_infer_request().infer(feed)[OUTPUT_NAME]

    def parameter_counts(self) -> tuple[int, int]:
        """(total, non-zero) weight elements of the IR (`weight_tensors`): a quantized weight
        counts once, its element being zero when it equals the zero point."""
        total = nonzero = 0
        for values, zero in weight_tensors(openvino.Core().read_model(str(self.path))):
            total += values.size
            nonzero += int(np.count_nonzero(values != zero))
        return total, nonzero

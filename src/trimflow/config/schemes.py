"""The quantization schemes by name: the one table that `quantize.variants.*.scheme`, the quantize
stage and the builders read.

It lives with the config, and imports nothing, because the schema takes its choices from it and
every stage loads the schema: a table importing torch or ONNX Runtime code would make every
stage depend on that code. A scheme's builder is keyed by the same name in its runtime's
module, `TORCH_SCHEMES` in compress/quantize.py, `ONNX_QUANTIZERS` in compress/onnx.py or
`OPENVINO_QUANTIZERS` in compress/openvino.py (tests/test_quantize.py checks them against this
table); the torch ones are described there.
"""

from __future__ import annotations

from dataclasses import dataclass

# What runs a variant: a quantized or cast torch module, its ONNX export in ONNX Runtime, or the
# export converted to OpenVINO IR.
RUNTIMES = ("torch", "onnxruntime", "openvino")


@dataclass(frozen=True)
class QuantizeScheme:
    """What the pipeline needs to know about a scheme, besides how its runtime builds it."""

    # One of RUNTIMES.
    runtime: str
    # Activation ranges calibrated on `quantize.calibration_batches` validation batches.
    calibrated: bool = False
    # Its kernels exist for the CPU only: evaluated there whatever `evaluate.device` says.
    cpu_only: bool = False

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime '{self.runtime}' is none of {RUNTIMES}")


QUANTIZE_SCHEMES = {
    # torch eager mode: dynamic int8 for CPUs, half precision for GPUs.
    "dynamic_int8": QuantizeScheme(runtime="torch", cpu_only=True),
    "dynamic_int8_embeddings": QuantizeScheme(runtime="torch", cpu_only=True),
    "bf16": QuantizeScheme(runtime="torch"),
    "fp16": QuantizeScheme(runtime="torch"),
    # ONNX Runtime: the exported graph as it is, dynamic int8, static (calibrated) int8.
    "onnx_fp32": QuantizeScheme(runtime="onnxruntime"),
    "onnx_dynamic_int8": QuantizeScheme(runtime="onnxruntime"),
    "onnx_static_int8": QuantizeScheme(runtime="onnxruntime", calibrated=True),
    # OpenVINO (its CPU plugin; no CUDA): the exported graph converted, NNCF int8 (calibrated).
    "openvino_fp32": QuantizeScheme(runtime="openvino", cpu_only=True),
    "openvino_int8": QuantizeScheme(runtime="openvino", calibrated=True, cpu_only=True),
}

"""The quantization schemes by name: the one table that `quantize.variants.*.scheme`, the quantize
stage and the builders read.

It lives with the config, and imports nothing, because the schema takes its choices from it and
every stage loads the schema: a table importing torch or ONNX Runtime code would make every
stage depend on that code. A scheme's builder is keyed by the same name in its runtime's
module, `TORCH_SCHEMES` in compress/quantize.py or `ONNX_QUANTIZERS` in compress/onnx.py
(tests/test_quantize.py checks both against this table); the torch ones are described there.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QuantizeScheme:
    """What the pipeline needs to know about a scheme, besides how its runtime builds it."""

    # Exported to ONNX and run by ONNX Runtime; otherwise a quantized or cast torch module.
    onnx: bool
    # Activation ranges calibrated on `quantize.calibration_batches` validation batches.
    calibrated: bool = False
    # Its kernels exist for the CPU only: evaluated there whatever `evaluate.device` says.
    cpu_only: bool = False


QUANTIZE_SCHEMES = {
    # torch eager mode: dynamic int8 for CPUs, half precision for GPUs.
    "dynamic_int8": QuantizeScheme(onnx=False, cpu_only=True),
    "dynamic_int8_embeddings": QuantizeScheme(onnx=False, cpu_only=True),
    "bf16": QuantizeScheme(onnx=False),
    "fp16": QuantizeScheme(onnx=False),
    # ONNX Runtime: the exported graph as it is, dynamic int8, static (calibrated) int8.
    "onnx_fp32": QuantizeScheme(onnx=True),
    "onnx_dynamic_int8": QuantizeScheme(onnx=True),
    "onnx_static_int8": QuantizeScheme(onnx=True, calibrated=True),
}

"""Where each variant is evaluated: the configured device, except where its kernels exist for
the CPU only (torch dynamic int8, OpenVINO) or its runtime has no GPU build installed (ONNX
Runtime without onnxruntime-gpu). Such a variant is measured on the CPU in the same run and
marked so."""

from __future__ import annotations

import logging

import onnxruntime as ort

from trimflow.config.schema import TrimflowConfig
from trimflow.config.schemes import QUANTIZE_SCHEMES
from trimflow.utils.device import resolve_device

log = logging.getLogger(__name__)


def onnx_runs_on_cuda() -> bool:
    """Whether the installed ONNX Runtime has its CUDA execution provider (onnxruntime-gpu)."""
    return "CUDAExecutionProvider" in ort.get_available_providers()


def cpu_reason(cfg: TrimflowConfig, variant: str, kind: str) -> str | None:
    """Why `variant` cannot run on a GPU, or None if it can."""
    if kind != "quantize":
        return None
    scheme_name = cfg.quantize.variants[variant].scheme
    scheme = QUANTIZE_SCHEMES[scheme_name]
    if scheme.cpu_only:
        return f"{scheme_name} kernels exist for the CPU only"
    if scheme.runtime == "onnxruntime" and not onnx_runs_on_cuda():
        return "ONNX Runtime has no CUDA provider here (install onnxruntime-gpu)"
    return None


def variant_devices(cfg: TrimflowConfig) -> dict[str, str]:
    """Each variant -> `cpu` or `cuda`, the device it is scored and timed on."""
    device = resolve_device(cfg.evaluate.device)
    devices = {}
    for variant, kind in cfg.variant_kinds().items():
        reason = cpu_reason(cfg, variant, kind) if device == "cuda" else None
        if reason:
            log.warning("%s: evaluated on the CPU: %s", variant, reason)
        devices[variant] = "cpu" if reason else device
    return devices

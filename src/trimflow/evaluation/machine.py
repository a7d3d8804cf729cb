"""The machine the numbers were measured on: CPU model and flags, core count, library versions."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

# CPU features that change training and int8 inference speed several-fold.
SPEED_FLAGS = (
    "avx2",
    "avx_vnni",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
)
# Instructions that multiply u8 by s8 and accumulate in int32 without int16 saturation.
INT8_DOT_FLAGS = ("avx_vnni", "avx512_vnni", "amx_int8")


def cpu_description(cpuinfo: str | None = None) -> dict:
    """The CPU model and its speed-relevant flags, from /proc/cpuinfo (Linux; else unknown)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {
        "cpu_model": fields.get("model name", platform.processor() or "unknown"),
        "cpu_flags": [flag for flag in SPEED_FLAGS if flag in flags],
    }


def has_int8_dot_product(cpuinfo: str | None = None) -> bool:
    """Whether the CPU has VNNI or AMX int8: without them int8 kernels sum u8*s8 pairs in int16,
    which saturates on full-range weights."""
    return any(flag in INT8_DOT_FLAGS for flag in cpu_description(cpuinfo)["cpu_flags"])


def environment() -> dict:
    """The machine and settings the numbers were measured on."""
    return {
        "machine": platform.machine(),
        **cpu_description(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "quantized_engine": torch.backends.quantized.engine,
    }

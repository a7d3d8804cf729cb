"""Which device a stage computes on, and the CUDA settings that make it fast."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def resolve_device(requested: str) -> str:
    """`cpu` or `cuda` for a configured `auto | cpu | cuda` (auto: CUDA when there is one)."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("cuda was asked for, but torch sees no CUDA device: use auto or cpu")
    return requested


def supports_bf16() -> bool:
    """Whether the current CUDA device computes in bfloat16 natively (Ampere and later)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def enable_tf32() -> bool:
    """Let fp32 matrix products use TF32 tensor cores on Ampere and later GPUs; True if so.

    TF32 keeps fp32's range with a 10-bit mantissa: the precision of bf16-mixed training's
    matmuls is unchanged (they run in bf16), fp32 ones get ~8x faster.
    """
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True

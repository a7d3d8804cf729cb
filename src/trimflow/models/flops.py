"""Model FLOPs of a training step and the model-FLOPs utilisation (MFU) of a device.

Training FLOPs of one sequence of T real tokens through an encoder of L layers, width d and
N non-embedding weights, of which N_t are trainable (Kaplan et al. 2020; Chowdhery et al. 2022,
appendix B):

    T * (4 N + 2 N_t)  +  12 L d T^2

Every weight matrix costs 2 FLOPs per token and weight forward, 2 backward for the gradient of
its input and 2 for the gradient of its weight, which frozen weights skip: 6 N per token for a
full fine-tune, down to 4 N for LoRA. Attention's two T x T products (Q K^T and A V) cost
4 L d T^2 forward and twice that backward. Padding does no useful work and is not counted.

MFU = model FLOPs per second / the device's peak (bf16 dense tensor-core peak on a GPU; on the
CPU the fp32 matmul rate measured on the machine).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable

import torch
from torch import nn

# Dense bf16 tensor-core peaks, TFLOP/s (vendor data sheets, without sparsity). Matched as
# substrings of torch.cuda.get_device_name(), first match wins: specific names come first.
GPU_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H200 NVL", 835.0),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("V100", 125.0),  # fp16: the V100 has no bf16
)


def non_embedding_counts(model: nn.Module) -> tuple[int, int]:
    """(N, N_t): the model's weights outside embedding tables, and how many of them train."""
    embedding_weights = {
        id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)
    }
    total = trainable = 0
    for parameter in model.parameters():
        if id(parameter) in embedding_weights:
            continue
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    return total, trainable


def training_flops(
    lengths: Iterable[int], params: int, trainable: int, layers: int, width: int
) -> int:
    """Model FLOPs of one training step over sequences of `lengths` real tokens (formula above)."""
    lengths = list(lengths)
    tokens = sum(lengths)
    return tokens * (4 * params + 2 * trainable) + 12 * layers * width * sum(t * t for t in lengths)


def gpu_peak_flops(name: str) -> float | None:
    """The bf16 dense peak FLOP/s of a GPU named `name`, or None for one not in the table."""
    for key, tflops in GPU_PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def measured_matmul_flops(
    device: str, dtype: torch.dtype, size: int = 1024, repeats: int = 10
) -> float:
    """The best FLOP/s of `repeats` size x size matrix products on `device` in `dtype`.

    The operands come from a generator of their own: measuring must not move the global RNG
    that dropout draws from (a resumed run must train as an uninterrupted one).
    """
    generator = torch.Generator(device).manual_seed(0)
    a, b = (torch.randn(size, size, device=device, dtype=dtype, generator=generator) for _ in "ab")
    best = float("inf")
    for _ in range(repeats + 1):  # the first product warms up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


@functools.cache
def device_peak_flops(device: str) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) of the device training runs on."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
        peak = gpu_peak_flops(name)
        if peak is not None:
            return peak, f"{name}: bf16 dense data-sheet peak"
        return measured_matmul_flops("cuda", torch.bfloat16, 8192), f"{name}: measured bf16"
    return (
        measured_matmul_flops("cpu", torch.float32),
        f"{torch.get_num_threads()} CPU threads: measured fp32 matmul",
    )

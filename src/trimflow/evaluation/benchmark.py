"""Latency and throughput of a model's forward pass on CPU, under a fixed thread count."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from trimflow.evaluation.inference import model_inputs


@contextlib.contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Run the block with `torch.set_num_threads(num_threads)`, restoring the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _timed_forwards(
    model: nn.Module,
    batches: Sequence[dict[str, Tensor]],
    warmup: int,
    repeats: int,
    num_threads: int,
) -> list[tuple[float, int]]:
    """(seconds, batch size) of `repeats` forwards cycling through `batches`, after `warmup`."""
    if not batches or repeats < 1 or warmup < 0:
        raise ValueError("need at least one batch, repeats >= 1 and warmup >= 0")
    prepared = [model_inputs(batch) for batch in batches]
    timings = []
    with torch_threads(num_threads), torch.inference_mode():
        for step in range(warmup + repeats):
            inputs = prepared[step % len(prepared)]
            start = time.perf_counter()
            model(**inputs)
            elapsed = time.perf_counter() - start
            if step >= warmup:
                timings.append((elapsed, len(inputs["input_ids"])))
    return timings


def measure_latency(
    model: nn.Module,
    inputs: Sequence[dict[str, Tensor]],
    warmup: int,
    repeats: int,
    num_threads: int,
) -> dict[str, float]:
    """Per-request latency in milliseconds (p50, p95, mean) over single-example `inputs`."""
    if any(len(example["input_ids"]) != 1 for example in inputs):
        raise ValueError("latency inputs must each hold exactly one example")
    latencies_ms = np.array(
        [
            seconds * 1e3
            for seconds, _ in _timed_forwards(model, inputs, warmup, repeats, num_threads)
        ]
    )
    return {
        "latency_ms_p50": float(np.percentile(latencies_ms, 50)),
        "latency_ms_p95": float(np.percentile(latencies_ms, 95)),
        "latency_ms_mean": float(latencies_ms.mean()),
    }


def measure_throughput(
    model: nn.Module,
    batches: Sequence[dict[str, Tensor]],
    warmup: int,
    repeats: int,
    num_threads: int,
) -> dict[str, float]:
    """Samples per second over `repeats` timed forwards cycling through `batches`."""
    timings = _timed_forwards(model, batches, warmup, repeats, num_threads)
    seconds = sum(elapsed for elapsed, _ in timings)
    samples = sum(size for _, size in timings)
    return {"throughput_sps": samples / seconds}

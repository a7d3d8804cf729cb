"""Latency and throughput of a model's forward pass on the device it lives on: wall clock on the
CPU under a fixed thread count, CUDA events on a GPU (after the queued work has finished)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from trimflow.evaluation.inference import input_device, model_inputs
from trimflow.utils.progress import progress

log = logging.getLogger(__name__)
Timing = tuple[float, int]  # (seconds, batch size)


@contextlib.contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Run the block with `torch.set_num_threads(num_threads)`, restoring the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def timed_forwards(
    model: nn.Module,
    batches: Sequence[dict[str, Tensor]],
    warmup: int,
    repeats: int,
    num_threads: int,
) -> list[Timing]:
    """(seconds, batch size) of `repeats` forwards cycling through `batches`, after `warmup`."""
    if not batches or repeats < 1 or warmup < 0:
        raise ValueError("need at least one batch, repeats >= 1 and warmup >= 0")
    device = input_device(model)
    prepared = [model_inputs(batch, device) for batch in batches]
    clock = _cuda_seconds if device.type == "cuda" else _wall_seconds
    timings = []
    with torch_threads(num_threads), torch.inference_mode():
        for step in range(warmup + repeats):
            inputs = prepared[step % len(prepared)]
            elapsed = clock(model, inputs)
            if step >= warmup:
                timings.append((elapsed, len(inputs["input_ids"])))
    return timings


def _wall_seconds(model: nn.Module, inputs: dict[str, Tensor]) -> float:
    start = time.perf_counter()
    model(**inputs)
    return time.perf_counter() - start


def _cuda_seconds(model: nn.Module, inputs: dict[str, Tensor]) -> float:
    """One forward timed by CUDA events, started once the GPU's earlier work has finished."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    model(**inputs)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def weights_mb(model) -> float:
    """MiB of a torch model's parameters and buffers (0 for an ONNX Runtime session)."""
    if not isinstance(model, nn.Module):
        return 0.0
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def latency_summary(timings: Sequence[Timing]) -> dict[str, float]:
    """p50, p95 and mean of per-call latency in milliseconds."""
    latencies_ms = np.array([seconds * 1e3 for seconds, _ in timings])
    return {
        "latency_ms_p50": float(np.percentile(latencies_ms, 50)),
        "latency_ms_p95": float(np.percentile(latencies_ms, 95)),
        "latency_ms_mean": float(latencies_ms.mean()),
    }


def throughput_summary(timings: Sequence[Timing]) -> dict[str, float]:
    """Samples per second over all timed calls."""
    seconds = sum(elapsed for elapsed, _ in timings)
    return {"throughput_sps": sum(size for _, size in timings) / seconds}


def _check_single_examples(inputs: Sequence[dict[str, Tensor]]) -> None:
    if any(len(example["input_ids"]) != 1 for example in inputs):
        raise ValueError("latency inputs must each hold exactly one example")


def measure_latency(
    model: nn.Module,
    inputs: Sequence[dict[str, Tensor]],
    warmup: int,
    repeats: int,
    num_threads: int,
) -> dict[str, float]:
    """Per-request latency in milliseconds (p50, p95, mean) over single-example `inputs`."""
    _check_single_examples(inputs)
    return latency_summary(timed_forwards(model, inputs, warmup, repeats, num_threads))


def interleaved_timings(
    models: Mapping[str, nn.Module],
    batches: Sequence[dict[str, Tensor]],
    warmup: int,
    repeats: int,
    rounds: int,
    num_threads: int,
    desc: str = "timing",
) -> tuple[dict[str, list[Timing]], dict[str, float]]:
    """Time every model in round-robin rounds, so that drift in the machine's speed during the
    measurement affects every model alike; `desc` names the progress. Returns the timings and,
    for each model on a GPU, its peak GPU memory in MiB (weights + the largest forward's
    activations).

    A model gets its `warmup` forwards in the first round only; later rounds start with one
    untimed forward, which refills the caches the other models used meanwhile.
    """
    per_round = -(-repeats // rounds)
    timings: dict[str, list[Timing]] = {name: [] for name in models}
    peaks: dict[str, float] = {}
    runs = [
        (name, model, warmup if round_ == 0 else min(warmup, 1))
        for round_ in range(rounds)
        for name, model in models.items()
    ]
    for name, model, warm in progress(runs, desc, log, unit="run"):
        on_gpu = input_device(model).type == "cuda"
        if on_gpu:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        timings[name] += timed_forwards(model, batches, warm, per_round, num_threads)
        if on_gpu:
            activations = (torch.cuda.max_memory_allocated() - before) / 2**20
            peaks[name] = max(peaks.get(name, 0.0), weights_mb(model) + activations)
    return timings, peaks


def latency_and_throughput_timings(
    models: Mapping[str, nn.Module],
    latency_inputs: Sequence[dict[str, Tensor]],
    throughput_batches: Sequence[dict[str, Tensor]],
    settings: Any,
    rounds: int,
    num_threads: int,
) -> tuple[tuple[dict[str, list[Timing]], dict[str, float]], ...]:
    """`interleaved_timings` of every model at batch 1 (`latency_inputs`), then on
    `throughput_batches`, with the warm-up and repeats of `settings` (an `evaluate` config
    section: its `latency` and `throughput`): ((latency, peaks), (throughput, peaks))."""
    return tuple(
        interleaved_timings(
            models, batches, spec.warmup, spec.repeats, rounds, num_threads, desc=desc
        )
        for desc, batches, spec in (
            ("latency", latency_inputs, settings.latency),
            ("throughput", throughput_batches, settings.throughput),
        )
    )

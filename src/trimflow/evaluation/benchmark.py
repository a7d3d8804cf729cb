"""Latency and throughput of a model's forward pass on CPU, under a fixed thread count."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from trimflow.evaluation.inference import model_inputs
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
) -> dict[str, list[Timing]]:
    """Time every model in round-robin rounds, so that drift in the machine's speed during the
    measurement affects every model alike; `desc` names the progress.

    A model gets its `warmup` forwards in the first round only; later rounds start with one
    untimed forward, which refills the caches the other models used meanwhile.
    """
    per_round = -(-repeats // rounds)
    timings: dict[str, list[Timing]] = {name: [] for name in models}
    runs = [
        (name, model, warmup if round_ == 0 else min(warmup, 1))
        for round_ in range(rounds)
        for name, model in models.items()
    ]
    for name, model, warm in progress(runs, desc, log, unit="run"):
        timings[name] += timed_forwards(model, batches, warm, per_round, num_threads)
    return timings

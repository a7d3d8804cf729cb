"""Model inputs from data/tokenized/: inference batches, and the test inputs every variant sees."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from trimflow.config.schema import EvaluateConfig, TrimflowConfig
from trimflow.data.datamodule import TokenizedDataModule
from trimflow.layout import Layout
from trimflow.utils.device import resolve_device


def inference_data(layout: Layout, batch_size: int) -> TokenizedDataModule:
    """The tokenized splits, set up, batched for inference (no shuffling, dynamic padding)."""
    data = TokenizedDataModule(
        layout.tokenized_splits,
        layout.tokenizer_dir,
        batch_size=batch_size,
        eval_batch_size=batch_size,
    )
    data.setup()
    return data


@dataclass
class TestInputs:
    """Model inputs built once from the test split and shared by every variant."""

    sorted_batches: list[dict[str, torch.Tensor]]  # length-sorted: little padding
    order: np.ndarray  # row index of each sorted example
    latency_inputs: list[dict[str, torch.Tensor]]  # batch 1
    throughput_batches: list[dict[str, torch.Tensor]]  # file order, mixed lengths


def throughput_batch_size(ev: EvaluateConfig) -> int:
    """`evaluate.throughput.batch_size`, or its default for the device evaluation runs on: 64 on
    a GPU (which a small batch leaves idle), 32 on the CPU."""
    if ev.throughput.batch_size:
        return ev.throughput.batch_size
    return 64 if resolve_device(ev.device) == "cuda" else 32


def chunks(items: Sequence, size: int) -> list[Sequence]:
    """`items` cut into consecutive pieces of `size` (the last one may be shorter)."""
    return [items[start : start + size] for start in range(0, len(items), size)]


def length_sorted_batches(
    rows: Sequence[dict], collate: Callable[[list], dict[str, torch.Tensor]], batch_size: int
) -> tuple[list[dict[str, torch.Tensor]], np.ndarray]:
    """`rows` (model inputs each) in batches of similar length, and the row index of each sorted
    example: little padding, and predictions put back in row order with `order`."""
    order = np.argsort([len(row["input_ids"]) for row in rows], kind="stable")
    return [collate([rows[int(i)] for i in part]) for part in chunks(order, batch_size)], order


def build_test_inputs(data: TokenizedDataModule, cfg: TrimflowConfig) -> TestInputs:
    """The test split as length-sorted scoring batches, batch-1 latency inputs and file-order
    throughput batches, sized by `cfg.evaluate`."""
    ev = cfg.evaluate
    test = data.splits["test"]

    def collate(rows) -> dict[str, torch.Tensor]:
        return data.collator([test[int(i)] for i in rows])

    sorted_batches, order = length_sorted_batches(test, data.collator, ev.batch_size)
    throughput_rows = chunks(np.arange(len(test)), throughput_batch_size(ev))
    return TestInputs(
        sorted_batches=sorted_batches,
        order=order,
        latency_inputs=[collate([i]) for i in range(min(ev.latency.samples, len(test)))],
        throughput_batches=[collate(rows) for rows in throughput_rows[: ev.throughput.repeats]],
    )

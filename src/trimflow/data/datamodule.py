"""LightningDataModule over the tokenized splits: dynamic padding, optional length grouping."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import datasets
import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler
from transformers import (
    AutoTokenizer,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
)

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels")
# Batches per sorted chunk: long enough to group lengths, short enough to stay random.
GROUP_CHUNK_BATCHES = 50


class SeededBatchSampler(Sampler[list[int]]):
    """Batches in a random order fixed by (seed, epoch), optionally of similar length.

    In data-parallel training each of `world_size` processes takes every `world_size`-th
    example of the same global batches of `batch_size * world_size` (interleaved, so similar
    lengths stay together): the processes see together what one process with the global batch
    size sees. A last global batch too small to give every process an example is dropped.

    Its position is part of the training state: `set_epoch` picks the epoch's order,
    `batch_done` counts the batches trained on, and `state_dict`/`load_state_dict` carry both
    through a checkpoint (`models.training.ExactResume`), so a run resumed mid-epoch continues
    on exactly the batches an uninterrupted run would have seen.
    """

    def __init__(
        self,
        lengths: list[int],
        batch_size: int,
        seed: int,
        group_by_length: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of {world_size} processes")
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.completed = 0

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its first batch."""
        self.epoch, self.completed = epoch, 0

    def batch_done(self) -> None:
        """One more batch of the current epoch was trained on."""
        self.completed += 1

    def state_dict(self) -> dict[str, int]:
        """The epoch and the batches done in it, so a resumed run continues the same order."""
        return {"epoch": self.epoch, "completed": self.completed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a saved epoch and batch."""
        self.epoch, self.completed = state["epoch"], state["completed"]

    def epoch_batches(self) -> list[list[int]]:
        """This process's share of every batch of the current epoch, in order."""
        return [
            batch[self.rank :: self.world_size]
            for batch in self.global_batches()
            if len(batch) >= self.world_size
        ]

    def global_batches(self) -> list[list[int]]:
        """Every batch of the current epoch across all processes, in order."""
        size = self.batch_size * self.world_size
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        if not self.group_by_length:
            return [order[i : i + size] for i in range(0, len(order), size)]
        chunk = size * GROUP_CHUNK_BATCHES
        batches = []
        for start in range(0, len(order), chunk):
            sorted_chunk = sorted(order[start : start + chunk], key=self.lengths.__getitem__)
            batches += [sorted_chunk[i : i + size] for i in range(0, len(sorted_chunk), size)]
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        # A generator, so the epoch and position are read at the first batch: Lightning
        # creates the loader's iterator before a resumed run's state is restored.
        yield from self.epoch_batches()[self.completed :]

    def __len__(self) -> int:
        return len(self.epoch_batches())


class TokenizedDataModule(L.LightningDataModule):
    """Serves data/tokenized/ splits to a Lightning Trainer."""

    def __init__(
        self,
        tokenized_dir: str | Path,
        tokenizer_dir: str | Path,
        batch_size: int,
        eval_batch_size: int,
        group_by_length: bool = True,
        num_workers: int = 0,
        seed: int = 0,
        pad_to_multiple_of: int | None = None,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.tokenized_dir = Path(tokenized_dir)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.group_by_length = group_by_length
        self.num_workers = num_workers
        self.seed = seed
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pin_memory = pin_memory  # page-locked batches: faster, asynchronous copies to a GPU
        self.collator: DataCollatorWithPadding | DataCollatorForTokenClassification | None = None
        self.splits: datasets.DatasetDict | None = None
        self.train_lengths: list[int] = []

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenized splits and build the collator, once."""
        if self.splits is None:
            self.splits, self.train_lengths = load_tokenized(self.tokenized_dir)
            self.collator = make_collator(
                self.tokenizer, self.splits["train"], self.pad_to_multiple_of
            )

    def train_label_counts(self, num_labels: int) -> torch.Tensor:
        """How often each label occurs in the training split (labelled tokens for NER)."""
        self.setup()
        rows = self.splits["train"].with_format(None)["labels"]
        flat = torch.tensor([x for row in rows for x in (row if isinstance(row, list) else [row])])
        return torch.bincount(flat[flat >= 0], minlength=num_labels)

    def train_dataloader(self) -> DataLoader:
        """Seeded batches of this process's share of the training split."""
        rank, world_size = self.process()
        sampler = SeededBatchSampler(
            self.train_lengths,
            self.batch_size,
            self.seed,
            self.group_by_length,
            rank=rank,
            world_size=world_size,
        )
        # Its own generator: the loader then draws no worker seed from the global RNG, which
        # a resumed run restores at its first batch (dropout must see the same stream).
        return DataLoader(
            self.splits["train"],
            batch_sampler=sampler,
            collate_fn=self.collator,
            generator=torch.Generator().manual_seed(self.seed),
            **self._loader_settings(),
        )

    def val_dataloader(self) -> DataLoader:
        """The validation split; in data-parallel training every process scores its own
        `rank::world_size` share once (no padding: the metrics sum their counts across
        processes, so they equal one process's)."""
        rank, world_size = self.process()
        if world_size == 1:
            return self.eval_loader("validation")
        split = self.splits["validation"]
        return self._loader(
            split, batch_size=self.eval_batch_size, sampler=range(rank, len(split), world_size)
        )

    def process(self) -> tuple[int, int]:
        """(rank, world size) of the trainer this module serves; (0, 1) outside training."""
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def test_dataloader(self) -> DataLoader:
        """The test split in file order."""
        return self.eval_loader("test")

    def eval_loader(self, split: str, batch_size: int | None = None) -> DataLoader:
        """Loader over a split in file order, sorted-free so predictions align with rows."""
        if self.splits is None:
            self.setup()
        return self._loader(self.splits[split], batch_size=batch_size or self.eval_batch_size)

    def _loader(self, data: datasets.Dataset, **kwargs) -> DataLoader:
        return DataLoader(data, collate_fn=self.collator, **self._loader_settings(), **kwargs)

    def _loader_settings(self) -> dict:
        """Worker processes (kept across epochs) and pinned memory, as configured."""
        return {
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": self.pin_memory,
        }


def make_collator(
    tokenizer, split: datasets.Dataset, pad_to_multiple_of: int | None
) -> DataCollatorWithPadding | DataCollatorForTokenClassification:
    """Dynamic padding; token labels (NER) are padded with -100 so the loss ignores them."""
    if isinstance(split.features["labels"], datasets.List):
        return DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)


def load_tokenized(path: str | Path) -> tuple[datasets.DatasetDict, list[int]]:
    """Load the tokenized splits as torch-formatted model inputs, plus train token lengths."""
    splits = datasets.load_from_disk(str(path))
    train_lengths = splits["train"]["length"]
    for name, split in splits.items():
        splits[name] = split.select_columns([c for c in split.column_names if c in MODEL_INPUTS])
        splits[name].set_format("torch")
    return splits, list(train_lengths)

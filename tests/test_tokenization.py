"""Tokenization (truncation counted, no padding on disk) and the data module's batching."""

from __future__ import annotations

import datasets
import pytest
import torch

from trimflow.data.datamodule import SeededBatchSampler
from trimflow.data.tokenization import tokenize_split


def test_tokenize_counts_truncation_and_does_not_pad(packaged_tokenizer):
    data = datasets.Dataset.from_dict(
        {
            "text": ["short one", "word " * 40, "a slightly longer sentence here"],
            "label_id": [0, 1, 2],
        }
    )
    tokenized, truncated = tokenize_split(data, packaged_tokenizer, max_length=16)
    assert truncated == 1
    assert tokenized["length"] == [4, 16, 7]
    assert [len(ids) for ids in tokenized["input_ids"]] == [4, 16, 7]
    assert list(tokenized["labels"]) == [0, 1, 2]
    assert tokenized[1]["input_ids"][-1] == packaged_tokenizer.sep_token_id


def test_tokenize_matches_a_raw_tokenizer_call(packaged_tokenizer):
    texts = ["oil prices rose", "wheat exports fell sharply this week"]
    data = datasets.Dataset.from_dict({"text": texts, "label_id": [0, 1]})
    tokenized, _ = tokenize_split(data, packaged_tokenizer, max_length=32)
    raw = packaged_tokenizer(texts, truncation=True, max_length=32)
    assert list(tokenized["input_ids"]) == raw["input_ids"]


@pytest.mark.parametrize("group_by_length", [True, False])
def test_seeded_sampler_covers_every_index_once_per_epoch(group_by_length):
    lengths = [(i * 37) % 101 for i in range(250)]
    sampler = SeededBatchSampler(lengths, batch_size=8, seed=5, group_by_length=group_by_length)
    epochs = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        epochs.append(list(sampler))
    for batches in epochs:
        assert sorted(i for batch in batches for i in batch) == list(range(250))
        assert len(batches) == len(sampler) == 32
    assert epochs[0] != epochs[1]  # a new order each epoch
    assert epochs[0] == list(SeededBatchSampler(lengths, 8, 5, group_by_length))


def test_seeded_sampler_resumes_at_the_batch_after_the_last_one_done():
    lengths = [(i * 37) % 101 for i in range(250)]
    sampler = SeededBatchSampler(lengths, batch_size=8, seed=5)
    sampler.set_epoch(1)
    whole_epoch = list(sampler)
    for _ in range(7):
        sampler.batch_done()
    resumed = SeededBatchSampler(lengths, batch_size=8, seed=5)
    resumed.load_state_dict(sampler.state_dict())
    assert list(resumed) == whole_epoch[7:]
    resumed.set_epoch(2)
    assert len(list(resumed)) == 32  # a new epoch starts from its first batch


@pytest.mark.parametrize("group_by_length", [True, False])
def test_ranks_split_the_global_batches_of_one_process(group_by_length):
    lengths = [(i * 37) % 101 for i in range(250)]  # 250 = 15 global batches of 16 + 10
    one = SeededBatchSampler(lengths, 16, seed=5, group_by_length=group_by_length)
    ranks = [
        SeededBatchSampler(lengths, 8, 5, group_by_length, rank=rank, world_size=2)
        for rank in (0, 1)
    ]
    shares = [list(rank) for rank in ranks]
    assert len(shares[0]) == len(shares[1]) == len(ranks[0]) == len(one) == 16
    for whole, first, second in zip(one, *shares, strict=True):
        assert sorted(first + second) == sorted(whole)
        assert first == whole[0::2] and second == whole[1::2]


def test_a_last_global_batch_smaller_than_the_ranks_is_dropped():
    lengths = list(range(17))  # one global batch of 8 x 2 and one example left over
    ranks = [SeededBatchSampler(lengths, 8, 0, rank=rank, world_size=2) for rank in (0, 1)]
    assert [len(list(rank)) for rank in ranks] == [1, 1]
    with pytest.raises(ValueError, match="rank 2 is not one of 2"):
        SeededBatchSampler(lengths, 8, 0, rank=2, world_size=2)


def test_length_grouping_reduces_padding():
    lengths = [
        int(x) for x in torch.randint(5, 200, (800,), generator=torch.Generator().manual_seed(0))
    ]
    grouped = SeededBatchSampler(lengths, batch_size=16, seed=0)

    def padded_tokens(batches):
        return sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)

    random_batches = [list(range(i, i + 16)) for i in range(0, 800, 16)]
    assert padded_tokens(grouped) < 0.7 * padded_tokens(random_batches)

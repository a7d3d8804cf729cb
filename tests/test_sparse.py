"""Sparse bitmask storage of magnitude-pruned weights."""

from __future__ import annotations

import torch

from trimflow.compress.sparse import load_sparse, save_sparse


def test_round_trip_restores_every_tensor_exactly(tmp_path):
    torch.manual_seed(0)
    sparse = torch.randn(64, 48)
    sparse[torch.rand_like(sparse) < 0.8] = 0.0
    state = {
        "sparse": sparse,
        "dense": torch.randn(10, 3),
        "ids": torch.arange(7),
        "scalar_like": torch.zeros(1),
    }
    save_sparse(state, tmp_path / "w.safetensors")
    loaded = load_sparse(tmp_path / "w.safetensors")
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor), name


def test_an_80_percent_sparse_tensor_is_stored_over_3x_smaller(tmp_path):
    torch.manual_seed(0)
    weight = torch.randn(512, 512)
    weight[weight.abs() < weight.abs().quantile(0.8)] = 0.0
    save_sparse({"w": weight}, tmp_path / "sparse.safetensors")
    save_sparse({"w": torch.randn(512, 512)}, tmp_path / "dense.safetensors")
    sparse_bytes = (tmp_path / "sparse.safetensors").stat().st_size
    dense_bytes = (tmp_path / "dense.safetensors").stat().st_size
    assert dense_bytes / sparse_bytes > 3.0
    # 0.2 * 4 bytes of values + 1/8 byte of mask per element, plus a small header
    assert sparse_bytes < 512 * 512 * (0.2 * 4 + 1 / 8) * 1.05

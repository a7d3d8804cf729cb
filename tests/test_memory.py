"""Peak memory of the training loop: the process's resident set on the CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from trimflow.utils.memory import PeakMemory

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
MIB = 2**20


def resident_mb() -> float:
    """The process's resident set now (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_cpu_peak_is_at_least_the_resident_set_and_a_reset_forgets_an_earlier_peak():
    memory = PeakMemory(torch.device("cpu"))
    memory.reset()
    assert memory.peak_mb() > resident_mb() - 10 > 0
    block = torch.ones(200 * MIB // 4)  # 200 MiB, every page touched
    with_block = memory.peak_mb()
    assert with_block >= resident_mb() >= 200
    del block
    memory.reset()
    assert memory.rss_reset
    assert memory.peak_mb() < with_block - 100


def test_without_clear_refs_the_peak_is_the_lifetime_one(monkeypatch, tmp_path):
    import trimflow.utils.memory as memory_module

    monkeypatch.setattr(memory_module, "CLEAR_REFS", tmp_path / "absent" / "clear_refs")
    block = torch.ones(200 * MIB // 4)
    with_block = resident_mb()
    del block
    memory = PeakMemory(torch.device("cpu"))
    memory.reset()
    assert not memory.rss_reset
    assert memory.peak_mb() > with_block - 10  # kernel RSS counters lag by a few pages

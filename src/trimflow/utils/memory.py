"""Peak memory over a stretch of work: CUDA's allocator on a GPU, the process's resident set
(RSS) on the CPU."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

# Linux: writing "5" to clear_refs resets the RSS high-water mark, VmHWM in status.
CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")
MIB = 2**20


class PeakMemory:
    """The peak memory on `device` since `reset`, in MiB.

    On CUDA: the tensors the caching allocator handed out (`max_memory_allocated`; not the
    CUDA context nor cached free blocks). On the CPU: the process's peak RSS, VmHWM of
    /proc/self/status after resetting it through /proc/self/clear_refs. Where clear_refs cannot
    be written (not Linux, or a locked-down container) the peak is the process's lifetime peak
    RSS, getrusage's ru_maxrss, which includes whatever ran before `reset`.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rss_reset = False

    def reset(self) -> None:
        """Start a new peak."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            CLEAR_REFS.write_text("5")
            self.rss_reset = True
        except OSError:
            self.rss_reset = False

    def current_mb(self) -> float:
        """The memory held now: allocated CUDA tensors, or the process's RSS, in MiB."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / MIB
        return _status_kib("VmRSS") * 1024 / MIB

    def peak_mb(self) -> float:
        """The peak since `reset` (see the class) in MiB."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / MIB
        if self.rss_reset:
            return _status_kib("VmHWM") * 1024 / MIB
        # ru_maxrss is in KiB on Linux, in bytes on macOS.
        unit = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / MIB


def _status_kib(field: str) -> int:
    """A `<field>: <n> kB` line of /proc/self/status, in KiB."""
    for line in STATUS.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(f"{STATUS} has no {field}")

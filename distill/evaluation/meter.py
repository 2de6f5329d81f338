"""Wall time and peak memory of one evaluation task.

Peak memory is CUDA max-allocated on a GPU and the process's peak resident set
size (VmHWM) on CPU. Linux lets a process reset its VmHWM (write "5" to
/proc/self/clear_refs), so each task reports its own peak rather than the
process's lifetime maximum; where that is not possible we fall back to
ru_maxrss, which never goes down (the figure is then an upper bound).
"""

from __future__ import annotations

import re
import resource
import sys
import time
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _reset_rss_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _rss_peak_mb() -> float:
    try:
        match = re.search(r"VmHWM:\s+(\d+)\s*kB", _STATUS.read_text())
        if match:
            return int(match.group(1)) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 1024)


class Meter:
    """`with Meter(device) as m: ...` then m.wall_s and m.peak_mem_mb."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.wall_s = 0.0
        self.peak_mem_mb = 0.0

    def __enter__(self) -> "Meter":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_rss_peak()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # queued kernels belong to this task's time
        self.wall_s = time.perf_counter() - self._start
        if self.device.type == "cuda":
            self.peak_mem_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.peak_mem_mb = _rss_peak_mb()

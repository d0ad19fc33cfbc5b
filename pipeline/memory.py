"""Peak memory of a block of work, and what is still free: shared by `acs check-model` and the
benchmarks, so both measure the same way."""

from __future__ import annotations

import os
import threading


class PeakMemory:
    """Peak memory above the level at entry: allocated device memory on CUDA, resident set on CPU.

    `ru_maxrss` is a lifetime peak (loading the weights usually set it higher than one query
    reaches), so on CPU a thread samples the current RSS instead; where /proc is missing it falls
    back to the `ru_maxrss` delta, a lower bound.
    """

    def __init__(self, device: str, interval_s: float = 0.005):
        self.cuda = str(device).startswith("cuda")
        self.device, self.interval_s = device, interval_s
        self.base = self.peak = 0
        self.method = "cuda max_memory_allocated" if self.cuda else "sampled RSS"
        self._stop = threading.Event()

    def __enter__(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self.peak = _rss()
            if self.base is None:
                self.method = "ru_maxrss delta (lower bound)"
                self.base = self.peak = _maxrss()
            else:
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, _rss() or 0)

    def __exit__(self, *exc):
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method == "sampled RSS":
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss() or 0)
        else:
            self.peak = _maxrss()

    @property
    def delta(self) -> int:
        return max(0, self.peak - self.base)


def _rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _maxrss() -> int:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def available_bytes(device: str) -> int | None:
    """Memory a batch could still take: free device memory, or MemAvailable on a CPU host."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None

"""Wall time and peak memory of a block of work: the one meter behind every ``wall_s`` and ``peak_mem_mb``."""

from __future__ import annotations

import threading
import time
from types import TracebackType

import psutil
import torch

SAMPLE_INTERVAL_S = 0.05
_MB = 2**20


class ResourceMeter:
    """Samples this process's RSS on a background thread (ru_maxrss is a lifetime peak, useless in a
    long-lived worker); on CUDA it reads the allocator's own peak instead.

    ``peak_mem_mb``: on CPU the growth above the RSS at entry, what the work itself needed on top of the
    loaded model; on CUDA the allocator's absolute peak over the block. ``max_rss_mb``: the highest RSS
    sampled, absolute.
    """

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.wall_s = 0.0
        self.peak_mem_mb = 0.0
        self.max_rss_mb = 0.0
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._baseline = 0
        self._peak = 0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def __enter__(self) -> ResourceMeter:
        self._baseline = self._peak = self._process.memory_info().rss
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.wall_s = time.perf_counter() - self._started
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._process.memory_info().rss)
        self.max_rss_mb = self._peak / _MB
        if torch.cuda.is_available():
            self.peak_mem_mb = torch.cuda.max_memory_allocated() / _MB
        else:
            self.peak_mem_mb = (self._peak - self._baseline) / _MB

    @property
    def memory_stats(self) -> dict[str, float]:
        """The two memory numbers as a method's stats report them."""
        return {"peak_mem_mb": float(self.peak_mem_mb), "max_rss_mb": float(self.max_rss_mb)}

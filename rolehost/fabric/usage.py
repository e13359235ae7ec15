"""What an instance uses: its host's CPU load, and the size of its local resources."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from pathlib import Path

import psutil
import structlog

from rolehost.fabric.disks import usage_mb

log = structlog.get_logger()
CPU_WINDOW = 30.0  # seconds of CPU samples behind the load estimate
USAGE_EVERY = 30.0  # seconds between measurements of local-resource usage


class CpuLoad:
    """A host's CPU, % of one core, over the last CPU_WINDOW seconds, from samples of its
    CPU times: the memory pass's (`record`, every MEMORY_EVERY seconds, from the one read
    of each process it makes anyway), or taken when someone asks (a status) and none is
    recent."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, float]] = deque()  # (wall, host CPU seconds)
        self._pid: int | None = None  # the host the samples are of
        # Kept: psutil.Process() reads the process's stat file to know it, a second read
        # per sample.
        self._process: psutil.Process | None = None

    def sample(self, pid: int | None, fresh_for: float = 0.0) -> float | None:
        """Sample the host `pid` (None: none runs); the load, or None while unknown. A
        sample younger than `fresh_for` seconds is not taken again: `status` reuses the
        memory pass's (N instances would else cost N reads per status)."""
        if pid is None:
            self._samples.clear()
            self._pid = self._process = None
            return None
        now = time.monotonic()
        if fresh_for and self._samples and now - self._samples[-1][0] < fresh_for and (
                self._pid == pid):
            return self._load()
        try:
            if self._process is None or self._process.pid != pid:
                self._process = psutil.Process(pid)
            times = self._process.cpu_times()
        except (psutil.Error, OSError):  # OSError: out of descriptors, say (EMFILE)
            self._process = None
            return None
        return self._add(pid, now, times.user + times.system)

    def record(self, pid: int, used: float) -> None:
        """A sample of host `pid`'s CPU seconds, `used`, read just now by the memory pass
        (fabric/memory.py): no read of its own."""
        self._add(pid, time.monotonic(), used)

    def _add(self, pid: int, now: float, used_now: float) -> float | None:
        if pid != self._pid or (self._samples and self._samples[-1][1] > used_now):
            self._samples.clear()  # a new host since the last sample
            self._pid = pid
        self._samples.append((now, used_now))
        while len(self._samples) > 2 and now - self._samples[1][0] > CPU_WINDOW:
            self._samples.popleft()
        return self._load()

    def _load(self) -> float | None:
        (first, used), (last, now_used) = self._samples[0], self._samples[-1]
        return 100.0 * (now_used - used) / (last - first) if last - first > 0.2 else None


class DiskUsage:
    """The size of each local resource, measured off the loop every USAGE_EVERY seconds
    at most; a warning when one grows over its declared size."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.used: dict[str, float] = {}  # MB, by resource
        self._measured = 0.0

    @property
    def due(self) -> bool:
        return time.monotonic() - self._measured > USAGE_EVERY

    def measure(self, resources: dict[str, tuple[Path, int]]) -> None:
        """Measure `resources` (name: (folder, size in MB)) in a worker thread."""
        self._measured = time.monotonic()

        def measure() -> None:
            for name, (folder, size_mb) in resources.items():
                used = usage_mb(folder)
                if used > size_mb and self.used.get(name, 0.0) <= size_mb:
                    log.warning("resource_over_size", instance=self.instance, resource=name,
                                used_mb=round(used, 1), size_mb=size_mb)
                self.used[name] = used

        asyncio.get_running_loop().run_in_executor(None, measure)

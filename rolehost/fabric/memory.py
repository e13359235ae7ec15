"""How much memory each instance uses: the resident memory of its host's process tree;
and, from the same read, the host's CPU time (its load: fabric/usage.py).

One pass over the processes of the machine every `MEMORY_EVERY` seconds measures every
running host of a deployment at once, off the loop: a pass per host would read all of
`/proc` once for each (psutil's `children()` does), which at hundreds of instances is
most of a core. The pass reads one file per process, `/proc/PID/stat` (parent, RSS, CPU
times): psutil read three or four per process, and a heartbeat read each host's stat file
again for its CPU (issue 23: together most of the idle controller's CPU at 500 instances).
The figure is the RSS of the host and its descendants added up, as PM2 and `ps` give
it: pages shared between them (a fork's, a library's) count once per process, so it is
an upper bound. A process that detached from the tree (it is then the controller's
child, the subreaper's) is not counted.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable
from typing import NamedTuple

import psutil
import structlog

log = structlog.get_logger()
MEMORY_EVERY = 5.0  # seconds between measurements
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class Usage(NamedTuple):
    rss: int  # bytes, the host and its descendants
    cpu: float  # seconds of CPU, user and system, of the host alone


class _Stat(NamedTuple):
    ppid: int
    rss: int
    cpu: float


def _stat(pid: str) -> _Stat | None:
    """Parent, RSS and CPU seconds of `pid` from /proc/PID/stat; None once gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            data = file.read()
    except OSError:
        return None
    # The command name is in parentheses and may hold anything, a ")" among it: the
    # fields that follow are after the last one. rest[0] is field 3 (proc(5)).
    rest = data[data.rfind(b")") + 2:].split()
    try:
        return _Stat(int(rest[1]), int(rest[21]) * _PAGE,
                     (int(rest[11]) + int(rest[12])) / _TICKS)
    except (IndexError, ValueError):
        return None


def _processes() -> dict[int, _Stat]:
    try:
        names = [entry.name for entry in os.scandir("/proc") if entry.name.isdigit()]
    except FileNotFoundError:  # not Linux: psutil, three or four reads per process
        return {p.pid: _Stat(p.info["ppid"], p.info["memory_info"].rss,
                             p.info["cpu_times"].user + p.info["cpu_times"].system)
                for p in psutil.process_iter(["ppid", "memory_info", "cpu_times"])
                if None not in (p.info["ppid"], p.info["memory_info"], p.info["cpu_times"])}
    return {int(name): stat for name in names if (stat := _stat(name)) is not None}


def tree_usage(roots: Iterable[int]) -> dict[int, Usage]:
    """The RSS in bytes of each root's tree (the root and its descendants), and the
    root's own CPU seconds, by root; a root that is gone has none."""
    stats = _processes()
    children: dict[int, list[int]] = {}
    for pid, stat in stats.items():
        children.setdefault(stat.ppid, []).append(pid)
    found = {}
    for root in roots:
        if root not in stats:
            continue
        total, todo, seen = 0, [root], {root}
        while todo:
            pid = todo.pop()
            total += stats[pid].rss if pid in stats else 0
            for child in children.get(pid, ()):
                if child not in seen:
                    seen.add(child)
                    todo.append(child)
        found[root] = Usage(total, stats[root].cpu)
    return found


class MemoryWatch:
    """Measures the trees of the hosts it watches, all in one pass, every `every` seconds,
    and tells each host's callback its figures. Runs only while it watches a host."""

    def __init__(self, every: float = MEMORY_EVERY) -> None:
        self.every = every
        self._hosts: dict[int, Callable[[Usage], None]] = {}
        self._task: asyncio.Task[None] | None = None

    def watch(self, pid: int, measured: Callable[[Usage], None]) -> None:
        self._hosts[pid] = measured
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name="memory-watch")

    def forget(self, pid: int) -> None:
        self._hosts.pop(pid, None)
        if not self._hosts and self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            try:
                sizes = await asyncio.to_thread(tree_usage, list(self._hosts))
            except (psutil.Error, OSError) as exc:  # out of descriptors, say: next time
                log.warning("memory_unmeasured", error=str(exc))
                continue
            for pid, size in sizes.items():
                if (measured := self._hosts.get(pid)) is not None:
                    try:
                        measured(size)
                    except Exception:  # a bug, which must show, and not end the watch
                        log.exception("memory_measure_failed", pid=pid)

"""How much memory each instance uses: the resident memory of its host's process tree.

One pass over the processes of the machine every `MEMORY_EVERY` seconds measures every
running host of a deployment at once, off the loop: a pass per host would read all of
`/proc` once for each (psutil's `children()` does), which at hundreds of instances is
most of a core. The figure is the RSS of the host and its descendants added up, as PM2
and `ps` give it: pages shared between them (a fork's, a library's) count once per
process, so it is an upper bound. A process that detached from the tree (it is then the
controller's child, the subreaper's) is not counted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

import psutil
import structlog

log = structlog.get_logger()
MEMORY_EVERY = 5.0  # seconds between measurements


def tree_rss(roots: Iterable[int]) -> dict[int, int]:
    """The RSS in bytes of each root's tree (the root and its descendants), by root; a
    root that is gone has none."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for process in psutil.process_iter(["ppid", "memory_info"]):
        info = process.info
        if info["memory_info"] is None or info["ppid"] is None:  # gone, or not ours to read
            continue
        rss[process.pid] = info["memory_info"].rss
        children.setdefault(info["ppid"], []).append(process.pid)
    found = {}
    for root in roots:
        if root not in rss:
            continue
        total, todo, seen = 0, [root], {root}
        while todo:
            pid = todo.pop()
            total += rss.get(pid, 0)
            for child in children.get(pid, ()):
                if child not in seen:
                    seen.add(child)
                    todo.append(child)
        found[root] = total
    return found


class MemoryWatch:
    """Measures the trees of the hosts it watches, all in one pass, every `every` seconds,
    and tells each host's callback its figure. Runs only while it watches a host."""

    def __init__(self, every: float = MEMORY_EVERY) -> None:
        self.every = every
        self._hosts: dict[int, Callable[[int], None]] = {}
        self._task: asyncio.Task[None] | None = None

    def watch(self, pid: int, measured: Callable[[int], None]) -> None:
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
                sizes = await asyncio.to_thread(tree_rss, list(self._hosts))
            except (psutil.Error, OSError) as exc:  # out of descriptors, say: next time
                log.warning("memory_unmeasured", error=str(exc))
                continue
            for pid, size in sizes.items():
                if (measured := self._hosts.get(pid)) is not None:
                    try:
                        measured(size)
                    except Exception:  # a bug, which must show, and not end the watch
                        log.exception("memory_measure_failed", pid=pid)

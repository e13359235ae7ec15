"""The run directory's keeper: a controller stays manageable when its run directory goes.

The CLI finds a controller by its run directory: the lock on `controller.pid` and the
control socket. Both are names in a folder that anyone with the user's rights can
delete (`rm -rf .rolehost` to "clean up"). The controller and its hosts run on, but no
`rolehost status` or `stop` could reach them, and a second start found nothing to tell
it a service was running.

Once a second, the keeper compares the names with what the controller holds: the pid
file's inode with the locked descriptor, the socket's with the one it bound. When
either is gone or replaced, it makes the folder again, takes the lock again, binds a
new socket, and reopens the logs (`run_dir_restored`). What went with the folder
stays gone: the package store and the instances' disks (a restart that needs them
fails; stop and start the service for a fresh copy).

If another process holds the new pid file's lock (a second `rolehost start`, which
refuses once it sees the hosts are alive: ownership.py), the keeper tries again at the
next check. If that process keeps it (it runs a service there now), this controller is
no longer reachable at all, and stops gracefully rather than run on unmanaged.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Awaitable, Callable, Iterable

import structlog

from rolehost.control.api import Server
from rolehost.fabric.rundir import RunDir
from rolehost.observability import logs
from rolehost.observability.logs import RotatingFile

log = structlog.get_logger()

CHECK_EVERY = 1.0  # seconds between checks: a stat of two names, nothing more
GIVE_UP_AFTER = 30  # checks the lock may stay another's before this controller stops


class Keeper:
    """Keeps `run_dir` this controller's while it runs: see the module's docstring."""

    def __init__(self, run_dir: RunDir, lock: int, server: Server,
                 serve: Callable[[], Awaitable[Server]],
                 logs: Callable[[], Iterable[RotatingFile]],
                 lost: Callable[[str], None]) -> None:
        self.run_dir, self.lock, self.server = run_dir, lock, server
        self._serve, self._logs, self._lost = serve, logs, lost
        self._socket = _inode(run_dir.socket)
        self._refused = 0  # checks in a row the lock was another process's
        self._failing = False  # the last restore failed (and said so)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._watch())

    async def close(self) -> None:
        """Stop checking, stop listening, and remove the socket if it is still ours."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.server.close()
        if self._socket is not None and _inode(self.run_dir.socket) == self._socket:
            self.run_dir.socket.unlink(missing_ok=True)  # not another controller's

    def intact(self) -> bool:
        """The pid file is the one locked, and the socket the one bound."""
        try:
            held = os.fstat(self.lock)
        except OSError:
            return False
        return (_inode(self.run_dir.pidfile) == (held.st_dev, held.st_ino)
                and _inode(self.run_dir.socket) == self._socket)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(CHECK_EVERY)
            if self.intact():
                continue
            try:
                await self.restore()
            except (OSError, ValueError) as exc:  # tried again at the next check
                # ValueError: rundir.Unsuitable, a folder others use put in its place.
                if not self._failing:  # once, not every second
                    log.error("run_dir_restore_failed", run_dir=str(self.run_dir.path),
                              error=getattr(exc, "strerror", None) or str(exc))
                self._failing = True
            else:
                self._failing = False

    async def restore(self) -> None:
        """Make the run directory again, and take it back."""
        self.run_dir.ensure()
        held = os.fstat(self.lock)
        if _inode(self.run_dir.pidfile) != (held.st_dev, held.st_ino):
            fd = os.open(self.run_dir.pidfile, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._held_by_another()
                return
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.close(self.lock)
            self.lock = fd
        self._refused = 0
        if _inode(self.run_dir.socket) != self._socket:
            with contextlib.suppress(OSError):  # its requests in flight end as they may
                await self.server.close(timeout=0)
            self.server = await self._serve()
            self._socket = _inode(self.run_dir.socket)
        for file in self._logs():  # the instances' output logs
            file.reopen()
        logs.reopen()
        log.warning("run_dir_restored", run_dir=str(self.run_dir.path),
                    detail="the run directory was deleted or replaced; the package store "
                           "and the instances' disks went with it")

    def _held_by_another(self) -> None:
        self._refused += 1
        holder = self.run_dir.holder()
        if self._refused == 1:
            log.warning("run_dir_taken", run_dir=str(self.run_dir.path), holder=holder,
                        detail="another process holds the run directory's lock")
        if self._refused >= GIVE_UP_AFTER:
            self._lost(f"its run directory was taken by another controller (pid {holder}): "
                       "nothing could manage this one")


def _inode(path: os.PathLike[str]) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino

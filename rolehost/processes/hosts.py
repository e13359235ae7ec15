"""The host processes: the one an instance runs its role in, spoken to over its channel
and read from its output pipes, and the one kept started on standby so that no instance
waits for an interpreter to boot."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from rolehost import protocol
from rolehost.processes import cgroups
from rolehost.processes.process import (
    KILL_GRACE,
    Lines,
    read_pipe,
    signal_tree,
    sweep,
    watch_exit,
)

if TYPE_CHECKING:
    from rolehost.processes.users import User

log = structlog.get_logger()
_ending: set[asyncio.Task[None]] = set()  # strong references: the loop keeps only weak ones


class _Stream(asyncio.Protocol):
    """Hands each chunk read from stream `name` to a callback, and b"" at its end: what is
    left of a line without its newline is the last of it."""

    def __init__(self, name: str, on_chunk: Callable[[str, bytes], None]) -> None:
        self._name, self._on_chunk = name, on_chunk

    def data_received(self, data: bytes) -> None:
        self._on_chunk(self._name, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_chunk(self._name, b"")


class HostProcess:
    """A host process: its channel, its output and its exit.

    Spawned as a standby that belongs to no instance; `assign` makes it one instance's
    host. Then `on_message` gets each decoded message and `on_output` each chunk of the
    stdout or stderr of the host and its descendants, with the stream's name, and b"" at
    the end of each. `exited` resolves to the exit code (negative: killed by that signal)
    once the tree is swept and the host reaped.
    """

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        loop = asyncio.get_running_loop()
        self.popen = popen
        self.pid = popen.pid
        self.token: str | None = None
        self.on_message: Callable[[protocol.Message], None] = lambda message: None
        self.on_output: Callable[[str, bytes], None] = lambda stream, data: None
        self.exited: asyncio.Future[int] = loop.create_future()
        # spawn's pipes: the host's output and its tree's. Two, so that a line can say
        # which stream it came on; the order of lines across them is the order they are read.
        assert popen.stdout is not None and popen.stderr is not None
        self.output_done = asyncio.gather(*(
            read_pipe(pipe, _Stream(name, lambda stream, data: self.on_output(stream, data)))
            for name, pipe in (("stdout", popen.stdout), ("stderr", popen.stderr))))
        self._reaped = watch_exit(self.pid, self._sweep)
        self._reaped.add_done_callback(self._reaped_now)
        self._transport: asyncio.Transport | None = None
        # Its own cgroup (cgroups.py), entered as a standby: killed with the host's tree.
        self.cgroup: Path | None = None

    @classmethod
    async def spawn(cls, argv: Sequence[str], env: dict[str, str], cwd: str,
                    user: User | None = None) -> HostProcess:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        try:
            popen = subprocess.Popen(
                argv,
                **(user.spawn_options() if user is not None else {}),
                env={**env, protocol.CHANNEL_FD_ENV: str(theirs.fileno())},
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self = cls(popen)

        def on_line(line: bytes) -> None:
            try:
                message = protocol.decode(line)
            except ValueError:
                return  # a host that garbles its channel is judged by its exit instead
            try:
                self.on_message(message)
            except Exception:  # raised into the transport, it would close the channel
                log.exception("message_failed", pid=self.pid, type=message.get("type"))

        transport, _ = await loop.create_connection(
            lambda: Lines(on_line, lambda: None), sock=ours
        )
        self._transport = transport
        return self

    def assign(
        self,
        context: dict[str, Any],
        env: dict[str, str],
        cwd: str,
        token: str,
        on_message: Callable[[protocol.Message], None],
        on_output: Callable[[str, bytes], None],
        heartbeat: float = protocol.HEARTBEAT_INTERVAL,
        user: User | None = None,
        peers: bytes = b"{}",
    ) -> None:
        """Make this standby the host of one instance (`env` must carry `token`), which
        sends a heartbeat every `heartbeat` seconds. With `user`, the host becomes that
        user first: a standby runs as the controller's user, whatever role it will run.
        `peers` is discovery's table, JSON already (`Discovery.table`)."""
        self.token, self.on_message, self.on_output = token, on_message, on_output
        drop = {"user": {"uid": user.uid, "gid": user.gid}} if user is not None else {}
        self.write(protocol.encode({"type": "assign", "context": context, "env": env,
                                    "cwd": cwd, "heartbeat": heartbeat, **drop},
                                   {"peers": peers}))

    def send(self, message: protocol.Message) -> None:
        self.write(protocol.encode(message))

    def write(self, line: bytes) -> None:
        """A message encoded already (`protocol.encode`): one encoding for many hosts."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(line)

    @property
    def running(self) -> bool:
        return not self.exited.done()

    @property
    def alive(self) -> bool:
        """Not exited, asking the kernel: `running` turns false only once the exit has
        been processed, and a standby must not be handed out in between."""
        if not self.running:
            return False
        try:
            return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
        except ChildProcessError:
            return False

    def kill(self) -> None:
        """SIGKILL the whole tree now (the exit is still reported through `exited`)."""
        signal_tree(self.pid, self.token, signal.SIGKILL)

    async def _sweep(self) -> None:
        # Before the reap: the zombie keeps the pid and process group from being reused.
        await asyncio.to_thread(sweep, self.pid, self.token, self.pid)
        if self.cgroup is not None:  # what left the tree, its session and its token
            await asyncio.to_thread(cgroups.remove, self.cgroup)

    def _reaped_now(self, _: asyncio.Future[int]) -> None:
        task = asyncio.ensure_future(self._finish())
        _ending.add(task)
        task.add_done_callback(_ending.discard)

    async def _finish(self) -> None:
        code = self._reaped.result()
        self.popen.returncode = code
        if self._transport is not None:
            self._transport.close()
        with contextlib.suppress(TimeoutError):  # output written just before the exit
            await asyncio.wait_for(asyncio.shield(self.output_done), KILL_GRACE)
        if not self.exited.done():  # cancelled by a waiter that was
            self.exited.set_result(code)


class Standby:
    """Keeps one host process started ahead of need, in a cgroup of its own where there
    are cgroups, so that no instance waits for an interpreter to boot or for a move into
    a cgroup: a crashed instance's replacement is one `assign` message away. Taking it
    starts the next one."""

    def __init__(self, env: dict[str, str], cwd: Path, user: User | None = None,
                 groups: cgroups.Cgroups | None = None) -> None:
        # -P: no working folder on sys.path; the role's app folder is put there on assign.
        self.argv = [sys.executable, "-P", "-m", "rolehost.host"]
        self.env, self.cwd, self.user, self.groups = env, str(cwd), user, groups
        self._next: asyncio.Task[HostProcess] | None = None
        self._closed = False

    def warm(self) -> None:
        if self._next is None and not self._closed:
            self._next = asyncio.ensure_future(self._spawn())

    async def _spawn(self) -> HostProcess:
        host = await HostProcess.spawn(self.argv, self.env, self.cwd, self.user)
        if self.groups is not None and self.groups.usable:
            # Off the loop: the move waits for an RCU grace period (cgroups.py).
            host.cgroup = await asyncio.to_thread(self.groups.place, host.pid)
        return host

    async def take(self, instance: str) -> HostProcess:
        """A standby host for `instance`, in its cgroup already: the warm one if it is
        still up, a new one otherwise."""
        ready, self._next = self._next, None
        host = None
        if ready is not None:
            with contextlib.suppress(OSError):
                host = await ready
        if host is None or not host.alive:
            host = await self._spawn()
        self.warm()
        if host.cgroup is not None:
            cgroups.label(host.cgroup, instance)
        return host

    async def close(self) -> None:
        self._closed = True
        ready, self._next = self._next, None
        if ready is None:
            return
        with contextlib.suppress(OSError):
            host = await ready
            host.send({"type": "release"})  # an unassigned standby exits on this
            try:
                await asyncio.wait_for(asyncio.shield(host.exited), KILL_GRACE)
            except TimeoutError:
                host.kill()
                await host.exited

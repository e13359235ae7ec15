"""Startup tasks: the commands the bootstrap runs before the host starts, in file order.

A task's completion marker lives on the disk its effect lives on (`once_per`):
`image` keeps it in `os/`, so a reimage that wipes the effect wipes the marker too;
`disk` keeps it beside the local resources, so only a rebuild runs the task again;
`start` keeps none: the task runs at every start, and so must be idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import structlog

from rolehost.definition import OncePer, Role, StartupTask, TaskContext, TaskType
from rolehost.fabric.disks import Disks, write_inside
from rolehost.observability import metrics
from rolehost.processes.privileges import User
from rolehost.processes.process import Lines, read_pipe, watch_exit


def role_name_of(instance_id: str) -> str:
    return instance_id.rpartition("_IN_")[0]


def describe_exit(code: int) -> str:
    """A task's end in words: `exited with 3`, or `killed by SIGKILL`."""
    if code >= 0:
        return f"exited with {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"

log = structlog.get_logger()
TAIL_LINES = 20
MARKERS = ".rolehost-markers"
# Ties each task to the controller's life: the kernel kills it if the controller dies.
_SETPRIV = shutil.which("setpriv")


@dataclass
class TaskRun:
    """One task in one boot of an instance."""

    index: int
    task: StartupTask
    state: str = "pending"  # pending, skipped, running, succeeded, failed
    exit_code: int | None = None
    reason: str = ""
    started: float | None = None
    ended: float | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    pid: int | None = None

    @property
    def label(self) -> str:
        command = self.task.command
        text = command if isinstance(command, str) else shlex.join(command)
        return f"task {self.index + 1} ({text})"

    def snapshot(self) -> dict[str, Any]:
        return {
            "index": self.index + 1,
            "command": self.task.command,
            "type": self.task.type.value,
            "once_per": self.task.once_per.value,
            "state": self.state,
            "exit_code": self.exit_code,
            "reason": self.reason,
            "seconds": round(self.ended - self.started, 3) if self.started and self.ended else None,
            "tail": list(self.tail),
        }


class TaskFailed(Exception):
    def __init__(self, run: TaskRun) -> None:
        self.run = run
        last = run.tail[-1] if run.tail else "no output"
        super().__init__(f"startup {run.label} {run.reason}: {last}")


class Tasks:
    """The startup tasks of one boot of one instance."""

    def __init__(
        self,
        instance_id: str,
        role: Role,
        disks: Disks,
        env: dict[str, str],
        on_output: Callable[[str, bytes], None],
        limited: User | None = None,
    ) -> None:
        self.log = log.bind(instance=instance_id)
        self.role = role_name_of(instance_id)
        self.disks = disks
        self.env = env
        self.on_output = on_output
        self.limited = limited  # who limited tasks run as; None: the controller's user
        self.runs = [TaskRun(i, task) for i, task in enumerate(role.startup_tasks)]
        self.ended = False  # the boot they belong to is over
        self.done = False  # run() returned: every simple task succeeded or was skipped
        self._waits: dict[int, asyncio.Future[int]] = {}

    async def run(self) -> None:
        """Run the tasks in order; TaskFailed when a simple one fails."""
        for run in self.runs:
            marker = self.marker(run.task)
            if marker is not None and marker.exists():
                run.state, run.reason = "skipped", f"marker {self._where(marker)} exists"
                self.log.info("task_skipped", task=run.label, marker=str(marker))
                continue
            exited = await self._start(run)
            if run.task.type is TaskType.simple:
                try:
                    await self._finish(run, exited, marker)
                except asyncio.CancelledError:  # the boot was cut short; kill() follows
                    run.state, run.reason = "interrupted", "the boot ended before the task did"
                    raise
                if run.state == "failed":
                    raise TaskFailed(run)
            else:
                task = asyncio.ensure_future(self._finish(run, exited, marker))
                task.add_done_callback(lambda t: t.exception())
        self.done = True

    async def _start(self, run: TaskRun) -> asyncio.Future[int]:
        task = run.task
        argv = self._argv(task)
        env, drop = {**self.env, **task.env}, {}
        if task.context is TaskContext.elevated and os.geteuid() != 0:
            self.log.warning("elevated_unavailable", task=run.label,
                        detail="the controller is not root: the task runs as the current user")
        elif task.context is TaskContext.limited and self.limited is not None:
            env |= self.limited.environment(self.disks.os)
            drop = self.limited.spawn_options()
        run.state, run.started = "running", time.time()
        loop = asyncio.get_running_loop()
        try:
            popen = subprocess.Popen(
                argv, cwd=self.disks.app, env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True, **drop,
            )
        except OSError as exc:
            failed: asyncio.Future[int] = loop.create_future()
            run.tail.append(f"cannot run {argv[0]!r}: {exc.strerror}")
            failed.set_result(127)
            return failed
        run.pid = popen.pid
        exited = watch_exit(popen.pid)
        exited.add_done_callback(lambda f: setattr(popen, "returncode", f.result()))
        assert popen.stdout is not None
        stream = f"task {run.index + 1}"  # its stdout and stderr: one pipe, in their order

        def line(data: bytes) -> None:
            run.tail.append(data.decode("utf-8", "replace"))
            self.on_output(stream, data + b"\n")

        read_pipe(popen.stdout, Lines(line, lambda: None))
        self._waits[run.index] = exited
        self.log.info("task_started", task=run.label, type=task.type.value, pid=popen.pid)
        return exited

    async def _finish(self, run: TaskRun, exited: asyncio.Future[int], marker: Path | None) -> None:
        try:
            async with asyncio.timeout(run.task.timeout):  # None: no limit
                code = await asyncio.shield(exited)
        except TimeoutError:
            self._kill(run)
            code = await exited
            run.reason = f"timed out after {run.task.timeout:g}s"
        run.ended, run.exit_code = time.time(), code
        seconds = round(run.ended - (run.started or run.ended), 3)
        metrics.TASK_SECONDS.labels(self.role, run.task.type.value).observe(seconds)
        if code == 0 and not run.reason:
            run.state, run.reason = "succeeded", "exited with 0"
            if marker is not None:  # in a folder of the limited user's: no link followed
                write_inside(marker.parent.parent, f"{MARKERS}/{marker.name}",
                             json.dumps({"command": run.task.command,
                                         "completed": datetime.now(UTC).isoformat()}))
            self.log.info("task_succeeded", task=run.label, seconds=seconds)
            return
        if self.ended and run.task.type is TaskType.background and not run.reason:
            # killed with the boot it belonged to (a restart, a stop): nothing went wrong
            run.state, run.reason = "stopped", f"ended with its boot ({describe_exit(code)})"
            self.log.info("task_stopped", task=run.label, reason=run.reason)
            return
        run.state = "failed"
        run.reason = run.reason or describe_exit(code)
        metrics.TASK_FAILURES.labels(self.role, run.task.type.value).inc()
        self.log.error("task_failed", task=run.label, reason=run.reason,
                  tail=list(run.tail)[-3:], type=run.task.type.value)

    def marker(self, task: StartupTask) -> Path | None:
        if task.once_per is OncePer.start:
            return None
        folder = self.disks.os if task.once_per is OncePer.image else self.disks.resources
        key = hashlib.sha256(
            json.dumps([task.command, task.shell, sorted(task.env.items())]).encode()
        ).hexdigest()[:16]
        return folder / MARKERS / f"{key}.done"

    def _where(self, marker: Path) -> str:
        return str(marker.relative_to(self.disks.root))

    @staticmethod
    def _argv(task: StartupTask) -> list[str]:
        command = task.command
        if task.shell:
            argv = ["/bin/sh", "-c", command if isinstance(command, str) else shlex.join(command)]
        else:
            argv = shlex.split(command) if isinstance(command, str) else list(command)
        return [_SETPRIV, "--pdeathsig", "KILL", "--", *argv] if _SETPRIV else argv

    # While the instance runs, and when its boot ends.

    @property
    def foreground(self) -> list[TaskRun]:
        return [r for r in self.runs if r.task.type is TaskType.foreground and r.state == "running"]

    async def wait_foreground(self, timeout: float) -> list[TaskRun]:
        """Wait for foreground tasks to exit; return those still running after `timeout`."""
        waits = [self._waits[r.index] for r in self.foreground]
        if waits:
            await asyncio.wait(waits, timeout=timeout)
        return self.foreground

    def kill(self) -> None:
        """SIGKILL every task of this boot that still runs, with its descendants."""
        for run in self.runs:
            if run.state in ("running", "interrupted"):
                self._kill(run)

    @staticmethod
    def _kill(run: TaskRun) -> None:
        if run.pid is None:
            return
        # The whole group first: a shell waiting on its children must not get to exit 0
        # between their death and its own (a timed-out task once reported exit code 0).
        descendants = []
        with contextlib.suppress(psutil.Error):
            descendants = psutil.Process(run.pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(run.pid, signal.SIGKILL)
        for child in descendants:  # those that left the group
            with contextlib.suppress(psutil.Error):
                child.kill()

    def snapshot(self) -> list[dict[str, Any]]:
        return [r.snapshot() for r in self.runs]


def task_path() -> str:
    """PATH for tasks and hosts: `python` is the interpreter rolehost runs on."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])

"""What respawn.py and balancer.py share: the run token, polling, process hygiene, the
rolehost controller wrapper and a few pieces of the report.

The benches are run as scripts (`python bench/respawn.py`), so this folder is on sys.path
and they import it as `common`.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psutil

from rolehost.client import Client
from rolehost.fabric.rundir import RunDir

T = TypeVar("T")

# Every process the bench starts inherits this variable; its value is unique per run.
TOKEN_ENV = "ROLEHOST_BENCH_TOKEN"
TOKEN = uuid.uuid4().hex

STOP_TIMEOUT = 60.0  # `rolehost stop`, supervisord's shutdown


class BenchError(RuntimeError):
    """One measurement could not be completed (a deadline passed, a tool failed)."""


def child_env() -> dict[str, str]:
    return {**os.environ, TOKEN_ENV: TOKEN}


def wait_until(what: str, timeout: float, check: Callable[[], T | None], every: float) -> T:
    """Poll `check` until it returns something other than None; BenchError at `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


# Process hygiene.


def ours(also: Callable[[psutil.Process], bool] | None = None) -> list[psutil.Process]:
    """Live processes of this run: everything the bench started, and theirs, by the token in
    their environment; and those `also` recognises (a process that rewrites its
    environment, as nginx does, loses the token)."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if (also is not None and also(proc)) or proc.environ().get(TOKEN_ENV) == TOKEN:
                found.append(proc)
        except psutil.Error:
            continue  # gone, or not ours to read
    return found


def kill_ours(also: Callable[[psutil.Process], bool] | None = None) -> list[str]:
    """SIGKILL whatever is left of ours after a short grace; describe what was killed."""
    # What a stopped controller, supervisord or nginx started may still be on its way out.
    deadline = time.monotonic() + 5.0
    while (left := ours(also)) and time.monotonic() < deadline:
        time.sleep(0.1)
    killed = []
    for proc in left:
        try:
            killed.append(f"{proc.pid} {' '.join(proc.cmdline())}")
            proc.kill()
        except psutil.Error:
            continue
    return killed


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """A SIGTERM to the bench runs the `finally:` blocks, so nothing it started leaks."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# rolehost.


class Controller:
    """A rolehost controller over a definition the bench generated into `root`, driven with
    the `rolehost` CLI and, for polling, the control API."""

    def __init__(self, root: Path, definition: str, client_timeout: float) -> None:
        self.root = root
        self.definition = root / "rolehost.toml"
        self.definition.write_text(definition)
        # Outside app/, so it is not deployed; short, for the Unix socket path limit.
        self.run_dir = root / "run"
        self.client = Client(RunDir.for_definition(self.definition, self.run_dir).socket,
                             client_timeout)
        self.pid: int | None = None

    def cli(self, *args: str, timeout: float) -> str:
        argv = [sys.executable, "-m", "rolehost", *args, "-f", str(self.definition),
                "--run-dir", str(self.run_dir)]
        try:
            done = subprocess.run(argv, env=child_env(), capture_output=True, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"`rolehost {' '.join(args)}` took over {timeout:g}s") from exc
        if done.returncode != 0:
            raise BenchError(f"`rolehost {' '.join(args)}` failed: {done.stderr.strip()}")
        return done.stdout

    def start(self, timeout: float) -> None:
        self.cli("start", "--detach", timeout=timeout)
        self.pid = int(self.client.status()["pid"])

    def instances(self) -> list[dict[str, Any]]:
        instances: list[dict[str, Any]] = self.client.status()["instances"]
        return instances

    def stop(self) -> None:
        """`rolehost stop`; if that fails, the controller and its hosts are killed."""
        try:
            self.cli("stop", timeout=STOP_TIMEOUT)
        except BenchError:
            if self.pid is not None and psutil.pid_exists(self.pid):
                os.kill(self.pid, signal.SIGKILL)  # its hosts see EOF and take themselves down
            raise


# Report.


def closing_sections(errors: list[str], survivors: list[str], clean: str) -> list[str]:
    """The report's last sections: the errors met, if any; then what survived the bench
    (and was killed), or `clean`, which says how everything was stopped and checked."""
    lines = ["", "## Errors", "", *(f"- {e}" for e in errors)] if errors else []
    lines += ["", "## Cleanup", ""]
    if not survivors:
        return [*lines, clean]
    return [*lines, f"**{len(survivors)} process(es) started by the bench survived and were "
            "killed:**", *(f"- `{x}`" for x in survivors)]


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("pass" if ok else "FAIL")


def machine(details: dict[str, str]) -> dict[str, str]:
    """The machine and the rolehost measured; `details`, what each bench adds, come after
    the core count."""
    from importlib.metadata import version

    return {
        "nproc": str(os.cpu_count()),
        **details,
        "rolehost": f"{version('rolehost')} ({git_revision()})",
        "platform": platform.platform(),
    }


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as the reports print them."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def leave(work: Path, keep: bool) -> None:
    """The bench's work folder: kept (and said where), or removed."""
    if keep:
        print(f"work folder kept: {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)


def git_revision() -> str:
    """The commit measured, and whether the tree had changes: runs are compared by it."""
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=10, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return "git unknown"
    return f"git {done.stdout.strip()}" if done.returncode == 0 else "git unknown"

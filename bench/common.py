"""What the benches share: the run token, polling, process hygiene, free ports and a GET,
the servers run in the foreground as contenders (nginx, HAProxy), the rolehost controller
wrapper and a few pieces of the report.

The benches are run as scripts (`python bench/respawn.py`), so this folder is on sys.path
and they import it as `common`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import psutil

from rolehost.client import Client
from rolehost.fabric.rundir import RunDir

T = TypeVar("T")
S = TypeVar("S")  # a bench's result for one size, a dataclass

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


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """User and system CPU the processes have used so far (one that is gone counts 0)."""
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


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


# Ports and HTTP.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str = "/", timeout: float = 2.0) -> tuple[int, bytes] | None:
    """GET once on a new connection: (status, body), or None if nothing answered."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


# Servers in the foreground.


class Foreground:
    """A server the bench runs in the foreground, as its child (nginx, HAProxy), from a
    config generated into `root`: its output in `root/console.log`, up once GET / on
    `port` answers 200, its processes (a master and its workers) recorded for the final
    clean-up check, stopped with its `graceful` signal, then SIGTERM and SIGKILL if it
    lingers (`timeout` bounds the start and the graceful stop)."""

    def __init__(self, name: str, root: Path, port: int, graceful: signal.Signals,
                 timeout: float) -> None:
        self.name, self.root, self.port = name, root, port
        self.graceful, self.timeout = graceful, timeout
        self.root.mkdir(parents=True)
        self.console = self.root / "console.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.pids: set[int] = set()  # every process seen, for the final clean-up check

    def check(self, argv: list[str]) -> None:
        """Run the server's check of its config; BenchError with what it said."""
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                              env=child_env())
        if done.returncode != 0:
            raise BenchError(f"`{' '.join(argv)}` failed: {done.stdout.strip()} "
                             f"{done.stderr.strip()}")

    def launch(self, argv: list[str], timeout: float | None = None, every: float = 0.1,
               slow: bool = False) -> None:
        """Start the server and wait until it answers (within `timeout`, `self.timeout`
        by default). `slow`: a server under valgrind, a session of its own, asked with
        a longer timeout per GET."""
        with open(self.console, "ab") as console:
            self.popen = subprocess.Popen(argv, env=child_env(), stdin=subprocess.DEVNULL,
                                          stdout=console, stderr=subprocess.STDOUT,
                                          start_new_session=slow)
        self.pids.add(self.popen.pid)

        def answering() -> bool | None:
            assert self.popen is not None
            if self.popen.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.popen.returncode}; "
                                 f"see {self.root}")
            answer = http_get(self.port, timeout=5.0 if slow else 2.0)
            return True if answer is not None and answer[0] == 200 else None

        wait_until(f"{self.name} to answer", timeout or self.timeout, answering, every)
        self.pids.update(p.pid for p in self.processes())

    def processes(self) -> list[psutil.Process]:
        """The master and its workers."""
        if self.popen is None:
            return []
        try:
            master = psutil.Process(self.popen.pid)
            return [master, *master.children(recursive=True)]
        except psutil.Error:
            return []

    def stop(self) -> None:
        if self.popen is None:
            return
        self.pids.update(p.pid for p in self.processes())
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(self.graceful)
        try:
            self.popen.wait(self.timeout)
        except subprocess.TimeoutExpired:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def log_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def log_since(path: Path, offset: int) -> str:
    """What was written to `path` after `offset` bytes ("" if there is no such file)."""
    if not path.exists():
        return ""
    with open(path, "rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


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


@dataclass
class Run(Generic[S]):
    """What a bench over sizes measured: each size's result, the errors that ended it
    early, and what of its processes survived (and was killed)."""
    work: Path
    results: list[S] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    survivors: list[str] = field(default_factory=list)


def over_sizes(name: str, sizes: list[int], measure: Callable[[Path, int], S],
               details: dict[str, str], keep: bool) -> Run[S]:
    """`measure(work, n)` for each size in turn, in one work folder, each result printed
    as a JSON line to stderr as it comes; an error ends the run but not the report. Then
    every process the bench started is killed, and the end's load average noted."""
    run: Run[S] = Run(Path(tempfile.mkdtemp(prefix=f"rh-{name}-", dir="/tmp")))
    with sigterm_as_exit():
        try:
            for n in sizes:
                print(f"{name}: N={n}...", file=sys.stderr)
                run.results.append(measure(run.work, n))
                print(json.dumps(asdict(run.results[-1])), file=sys.stderr)  # type: ignore[call-overload]
        except Exception as exc:
            run.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            run.survivors = kill_ours()
            details["load average at end (1/5/15 min)"] = load_average()
            leave(run.work, keep)
    return run


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

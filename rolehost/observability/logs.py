"""Logging: the controller's event log (structlog), instance output files, the console.

- Controller events are JSON lines in `logs/controller.log`, and readable lines on the
  console, from one structlog pipeline.
- Each instance's output goes to `logs/INSTANCE.log`, one line stamped with its time and
  stream per line printed (output.OutputLog), rotated by size, and to the console
  prefixed with the instance id (like honcho).
- Only files are rotated; the console, a pipe or a terminal, is only ever appended to,
  by a thread of its own: a console that blocks drops lines, one that goes away (EPIPE)
  is silenced; neither ever holds up the controller.
- A write that fails (a full disk: ENOSPC, EDQUOT) loses lines, never the controller:
  one `log_write_failed` event when it begins, and when writing works again a
  `log_write_resumed` event, and a line in the file, saying how much was lost.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import structlog

from rolehost.observability.times import clock as clock
from rolehost.observability.times import iso as iso

MAX_BYTES = 10 * 1024 * 1024
BACKUPS = 3
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})

log = structlog.get_logger()


def append(path: Path, data: bytes) -> None:
    """Append `data` to `path` whole or not at all: a write cut short (a full disk)
    is cut off again, so that the file never holds half a line. OSError if it failed."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        _write_all(fd, data, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def out_of_space(where: int | Path) -> bool:
    """True if the file system of `where` (an open descriptor or a path) has no block left
    for this process. While it has none, a short line that still fits in the last, partly
    used block of a file does not mean there is space again."""
    try:
        st = os.fstatvfs(where) if isinstance(where, int) else os.statvfs(where)
    except OSError:
        return False
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) == 0


def _write_all(fd: int, data: bytes, size: int) -> None:
    """Write all of `data` at the end of `fd`, a file `size` bytes long until now; if a
    write fails, cut the file back to `size` (best effort) and raise."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        raise


class RotatingFile:
    """An append-only file that moves itself to `.1`, `.2`, ... past `max_bytes`.

    A write that fails loses its data, never the caller: the file is cut back to its last
    whole write and the loss is counted. The first failure logs `log_write_failed`; the
    first write that works again logs `log_write_resumed` with what was lost, and (with
    `marker`) is preceded in the file by a line that says so: `[rolehost] ...`, or what
    `marker` makes of the words, for a file whose lines have a form of their own.
    """

    def __init__(self, path: Path, max_bytes: int = MAX_BYTES, backups: int = BACKUPS,
                 marker: bool | Callable[[str], bytes] = True) -> None:
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        self.marker = marker
        self.lost_lines = self.lost_bytes = 0
        self._failing_since: float | None = None
        self._error, self._errno = "", 0
        self._whole_line = True  # the file ends with a newline (or is empty)
        self._closed = False
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = None
        self._size = 0
        # If it fails, the first write opens it again, and reports the failure if it stays.
        with contextlib.suppress(OSError):
            self._open()

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._size = os.fstat(self._fd).st_size

    def write(self, data: bytes) -> None:
        if not data or self._closed:
            return
        if self._failing_since is not None and self._errno == errno.ENOSPC and out_of_space(
            self.path.parent if self._fd is None else self._fd
        ):
            self._lost(data, None)  # still full: not even tried
            return
        try:
            if self._fd is None:
                self._open()
            if self._size + len(data) > self.max_bytes and self._size > 0:
                self._rotate()
            assert self._fd is not None
            payload = self._gap() + data if self._failing_since is not None else data
            _write_all(self._fd, payload, self._size)
        except OSError as exc:
            self._lost(data, exc)
            return
        self._size += len(payload)
        self._whole_line = payload.endswith(b"\n")
        if self._failing_since is not None:
            self._resumed()

    def _gap(self) -> bytes:
        """The line that marks where lines were lost (empty without `marker`)."""
        if not self.marker:
            return b""
        lead = b"" if self._whole_line else b"\n"
        since = time.strftime("%H:%M:%S", time.localtime(self._failing_since))
        text = (f"{self.lost_lines} lines ({self.lost_bytes} bytes) of output lost here "
                f"from {since} to {time.strftime('%H:%M:%S')}: {self._error}")
        if callable(self.marker):
            return lead + self.marker(text)
        return lead + f"[rolehost] {text}\n".encode()

    def _lost(self, data: bytes, exc: OSError | None) -> None:
        self.lost_bytes += len(data)
        self.lost_lines += data.count(b"\n")
        if self._failing_since is not None or exc is None:
            return  # said once already: a full disk must not become a flood of warnings
        self._failing_since, self._errno = time.time(), exc.errno or 0
        self._error = exc.strerror or str(exc)
        # For the event log itself, this event is only kept in memory and on the console.
        log.warning("log_write_failed", file=str(self.path), error=self._error,
                    detail="lines are lost until writing works again; rolehost goes on")

    def _resumed(self) -> None:
        since, lines, lost = self._failing_since, self.lost_lines, self.lost_bytes
        self._failing_since, self.lost_lines, self.lost_bytes = None, 0, 0
        log.warning("log_write_resumed", file=str(self.path), lines_lost=lines, bytes_lost=lost,
                    since=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)),
                    error=self._error)

    def _rotate(self) -> None:
        self._close_fd()
        for n in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{n + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        self._open()
        self._whole_line = True

    def close(self) -> None:
        self._closed = True
        self._close_fd()

    def reopen(self) -> None:
        """Write to `path` again from the next write: the file open was deleted (its run
        directory with it), and lines written there would reach no one."""
        self._close_fd()

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Console:
    """The controller's terminal: event lines and prefixed instance output.

    A thread of its own writes them: a terminal paused with Ctrl-S, or a pipe that nobody
    drains (`rolehost start | less`, left on one page), blocks that thread, never the
    controller and its balancers. Past `BACKLOG` lines waiting, lines are dropped and
    counted, and the count is printed when the console moves again.
    """

    _COLORS = (36, 33, 32, 35, 34, 91, 92, 93, 94, 95, 96)
    BACKLOG = 10_000

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.color = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = True
        self.dropped = 0  # lines dropped since the last that got through
        self._width = 8
        self._palette: dict[str, int] = {}
        self._queue: queue.Queue[str | threading.Event] = queue.Queue(self.BACKLOG)
        self._writer: threading.Thread | None = None

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self._writer is None:
            self._writer = threading.Thread(target=self._write, name="console", daemon=True)
            self._writer.start()
        try:
            if self.dropped:
                self._queue.put_nowait(f"[rolehost] {self.dropped} console lines dropped: "
                                       "the console was not reading (they are in the logs)")
                self.dropped = 0
            self._queue.put_nowait(text)
        except queue.Full:
            self.dropped += 1

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait up to `timeout` for the lines given so far to be written; False if the
        console did not take them in time (a line written later, or never)."""
        if self._writer is None or not self.enabled:
            return True
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def _write(self) -> None:
        while True:
            item = self._queue.get()
            if isinstance(item, threading.Event):
                item.set()
            elif self.enabled:
                self._print(item)

    def _print(self, text: str) -> None:
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except OSError as exc:
            if exc.errno in DISK_FULL:
                return  # a console redirected to a full disk: this line is lost, not the next
            self.enabled = False  # nobody is reading: stop writing, keep serving
        except ValueError:
            self.enabled = False  # closed

    def output(self, source: str, lines: list[bytes], tag: str = "") -> None:
        """Print whole lines of `source`'s output (output.OutputLog splits them), each
        after `tag`: a startup task's `[task N] `."""
        prefix = self._prefix(source)
        for raw in lines:
            self.line(f"{prefix} {tag}{raw.decode('utf-8', 'replace').rstrip()}")

    def _prefix(self, source: str) -> str:
        self._width = max(self._width, len(source))
        prefix = f"{time.strftime('%H:%M:%S')} {source:<{self._width}} |"
        if self.color:
            code = self._palette.setdefault(source, self._COLORS[len(self._palette) % 11])
            prefix = f"\x1b[{code}m{prefix}\x1b[0m"
        return prefix

    def event(self, event: dict[str, Any]) -> None:
        self.line(f"{self._prefix('rolehost')} {describe(event)}")


class _Tee:
    """structlog's last processor: JSON to the event log, a readable line to the console."""

    def __init__(self, file: RotatingFile | None, console: Console | None) -> None:
        self.file, self.console = file, console
        # Each as its JSON line, the one the file gets: a snapshot, where a dict would keep
        # the objects the event named (a walk's progress, say) as they change later.
        self.recent: deque[tuple[int, str]] = deque(maxlen=10_000)
        self.seq = 0  # numbers every event, so a reader can ask for what came after one

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        self.seq += 1
        event = {"seq": self.seq, **event}
        line = json.dumps(event, default=str)
        self.recent.append((self.seq, line))
        if self.file is not None:
            self.file.write(line.encode() + b"\n")
        if self.console is not None:
            self.console.event(event)
        return ""


_tee: _Tee | None = None


def configure(log_dir: Path | None, console: Console | None) -> None:
    """Route structlog to `log_dir/controller.log` and the console."""
    global _tee
    # JSON lines: no marker line in it; the `log_write_resumed` event says what was lost.
    file = RotatingFile(log_dir / "controller.log", marker=False) if log_dir is not None else None
    _tee = _Tee(file, console)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _tee,
        ],
        logger_factory=structlog.ReturnLoggerFactory(),
        cache_logger_on_first_use=False,
    )


def reopen() -> None:
    """The event log writes to its path again (RotatingFile.reopen)."""
    if _tee is not None and _tee.file is not None:
        _tee.file.reopen()


def recent(after: int = 0) -> list[dict[str, Any]]:
    """Events numbered above `after`, oldest first (of the last 10,000 kept)."""
    if _tee is None:
        return []
    return [json.loads(line) for seq, line in _tee.recent if seq > after]


def tail(path: Path, lines: int) -> list[str]:
    """The last `lines` lines of a text file, reading backwards from its end."""
    if lines <= 0 or not path.exists():
        return []
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        end = f.tell()
        block, data = 8192, b""
        while end > 0 and data.count(b"\n") <= lines:
            start = max(0, end - block)
            f.seek(start)
            data = f.read(end - start) + data
            end = start
    return [line.decode("utf-8", "replace") for line in data.splitlines()[-lines:]]


_QUIET = {"event", "timestamp", "level", "instance", "seq"}


def describe(event: dict[str, Any]) -> str:
    """One event as a readable line: `web_IN_0: starting -> ready`, or `name k=v ...`."""
    name = str(event.get("event", ""))
    level = "" if event.get("level", "info") == "info" else f"[{event['level']}] "
    if name == "state":
        reason = f" ({event['reason']})" if event.get("reason") else ""
        return f"{event.get('instance')}: {event.get('previous')} -> {event.get('state')}{reason}"
    subject = f"{event['instance']}: " if "instance" in event else ""
    fields = " ".join(f"{k}={v}" for k, v in event.items() if k not in _QUIET and v is not None)
    return f"{level}{subject}{name.replace('_', ' ')} {fields}".rstrip()


def render_event(line: str) -> str:
    """A JSON line of the controller's event log, as the console showed it."""
    try:
        event = json.loads(line)
    except ValueError:
        return line
    if not isinstance(event, dict):
        return line
    return f"{clock(event.get('timestamp'))} {describe(event)}"


def follow(path: Path, on_line: Any) -> None:
    """Print lines appended to `path` as they arrive, across rotations, until interrupted.

    Woken by file events (watchdog), not by polling.
    """
    import threading

    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers import Observer

    wake = threading.Event()
    target = str(path)

    class Wake(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            if target in (event.src_path, getattr(event, "dest_path", "")):
                wake.set()

    observer = Observer()
    observer.schedule(Wake(), str(path.parent), recursive=False)
    observer.start()
    f = open(path, "rb")  # noqa: SIM115 - reopened on rotation
    f.seek(0, os.SEEK_END)
    partial = b""
    try:
        while True:
            wake.wait()
            wake.clear()
            data = f.read()
            try:
                rotated = os.stat(path).st_ino != os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                rotated = False
            if rotated:
                f.close()
                f = open(path, "rb")  # noqa: SIM115
                data += f.read()
            *lines, partial = (partial + data).split(b"\n")
            for line in lines:
                on_line(line.decode("utf-8", "replace"))
    finally:
        f.close()
        observer.stop()
        observer.join()

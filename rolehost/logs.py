"""Logging: the controller's event log (structlog), instance output files, the console.

- Controller events are JSON lines in `logs/controller.log`, and readable lines on the
  console, from one structlog pipeline.
- Each instance's merged stdout/stderr goes to `logs/INSTANCE.log`, rotated by size,
  and to the console prefixed with the instance id (like honcho).
- Only files are rotated; the console, a pipe or a terminal, is only ever appended to,
  and a console that goes away (EPIPE) silences the console, never the controller.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, BinaryIO

import structlog

MAX_BYTES = 10 * 1024 * 1024
BACKUPS = 3


class RotatingFile:
    """An append-only file that moves itself to `.1`, `.2`, ... past `max_bytes`."""

    def __init__(self, path: Path, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> None:
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO = open(path, "ab")  # noqa: SIM115 - lives as long as we do
        self._size = self._file.tell()

    def write(self, data: bytes) -> None:
        if self._size + len(data) > self.max_bytes and self._size > 0:
            self._rotate()
        try:
            self._file.write(data)
            self._file.flush()
        except OSError:
            return  # a full disk loses log lines, never the controller
        self._size += len(data)

    def _rotate(self) -> None:
        self._file.close()
        for n in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{n + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        self._file = open(self.path, "ab")  # noqa: SIM115
        self._size = 0

    def close(self) -> None:
        self._file.close()


class Console:
    """The controller's terminal: event lines and prefixed instance output."""

    _COLORS = (36, 33, 32, 35, 34, 91, 92, 93, 94, 95, 96)

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.color = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = True
        self._width = 8
        self._palette: dict[str, int] = {}
        self._partial: dict[str, bytes] = {}

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except (BrokenPipeError, ValueError, OSError):
            self.enabled = False  # nobody is reading: stop writing, keep serving

    def output(self, source: str, data: bytes) -> None:
        """Print whole lines of `source`'s output; a partial line waits for its end."""
        *lines, self._partial[source] = (self._partial.get(source, b"") + data).split(b"\n")
        for raw in lines:
            self.line(f"{self._prefix(source)} {raw.decode('utf-8', 'replace').rstrip()}")

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
        self.recent: deque[dict[str, Any]] = deque(maxlen=10_000)
        self.seq = 0  # numbers every event, so a reader can ask for what came after one

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        self.seq += 1
        event = {"seq": self.seq, **event}
        self.recent.append(event)
        if self.file is not None:
            self.file.write(json.dumps(event, default=str).encode() + b"\n")
        if self.console is not None:
            self.console.event(event)
        return ""


_tee: _Tee | None = None


def configure(log_dir: Path | None, console: Console | None) -> None:
    """Route structlog to `log_dir/controller.log` and the console."""
    global _tee
    file = RotatingFile(log_dir / "controller.log") if log_dir is not None else None
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


def recent(after: int = 0) -> list[dict[str, Any]]:
    """Events numbered above `after`, oldest first (of the last 10,000 kept)."""
    if _tee is None:
        return []
    return [e for e in _tee.recent if e["seq"] > after]


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


def clock(iso: str | None) -> str:
    """`HH:MM:SS` in local time, as the console prints it, from an ISO 8601 timestamp."""
    if not iso:
        return ""
    from datetime import datetime

    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%H:%M:%S")
    except ValueError:
        return iso


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

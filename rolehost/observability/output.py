"""An instance's output, as its log keeps it: one entry per line printed, stamped with the
stream it came on and the time it was written: when the controller had it whole, so that
the times of a file go up line after line.

The streams are the host's `stdout` and `stderr` (each a pipe of its own, shared by the
processes the role starts), a startup task's `task N` (its stdout and stderr together),
and `rolehost` for a line of rolehost's own in the log (output lost on a full disk).

    text (the default)   2026-12-07T11:02:03.123Z stdout | hello
    json                 {"time": "2026-12-07T11:02:03.123Z", "stream": "stdout",
                          "instance": "web_IN_0", "line": "hello"}   (one line in the file)

A line is written once it is whole. Each stream keeps what came after its last newline
until the rest comes, or until its pipe closes (the host and its processes are gone), or
until it holds MAX_PARTIAL bytes: a longer line is written in pieces, so that a process
that never prints a newline cannot make the controller hold its output in memory.

This runs for every chunk of output of every instance: the whole lines of a chunk are
split once, stamped once and written to the file in one write.
"""

from __future__ import annotations

import json
import time
from json.encoder import encode_basestring
from pathlib import Path

from rolehost.observability.logs import MAX_BYTES, Console, RotatingFile

MAX_PARTIAL = 64 * 1024
HOST_STREAMS = frozenset({"stdout", "stderr"})

_second = -1
_second_text = b""


def stamp() -> bytes:
    """Now, in UTC to the millisecond: `2026-12-07T11:02:03.123Z`, as the event log's."""
    global _second, _second_text
    now = time.time()
    second = int(now)
    if second != _second:  # strftime once a second, not once a chunk
        _second = second
        _second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)).encode()
    return b"%s.%03dZ" % (_second_text, int((now - second) * 1000))


class OutputLog:
    """The log file `path` of instance `instance`, in `form` (`text` or `json`), rotated
    by size; each line goes to `console` too, as it always did."""

    def __init__(self, path: Path, instance: str, form: str = "text",
                 console: Console | None = None, max_bytes: int = MAX_BYTES) -> None:
        self.instance, self.console = instance, console
        self.json_lines = form == "json"
        self.file = RotatingFile(path, max_bytes, marker=self._marker)
        self._partial: dict[str, bytearray] = {}  # by stream: a line without its end yet

    @property
    def path(self) -> Path:
        return self.file.path

    def write(self, stream: str, data: bytes) -> None:
        """A chunk read from `stream`; b"" when it has ended, to write its last line."""
        if not data:
            self._flush(stream)
            return
        lines = data.split(b"\n")
        rest = lines.pop()  # after the last newline: b"" if the chunk ends with one
        partial = self._partial.get(stream)
        if partial is not None and lines:  # the line it began ends in this chunk
            partial += lines.pop(0)
            self._flush(stream)
            partial = None
        if lines:
            self._write(stream, lines, stamp())
        if rest:
            if partial is None:
                partial = self._partial[stream] = bytearray()
            partial += rest
            if len(partial) >= MAX_PARTIAL:
                self._flush(stream)

    def close(self) -> None:
        for stream in list(self._partial):
            self._flush(stream)
        self.file.close()

    def _flush(self, stream: str) -> None:
        """Write what `stream` holds of a line, as a line."""
        partial = self._partial.pop(stream, None)
        if partial:
            self._write(stream, [bytes(partial)], stamp())

    def _write(self, stream: str, lines: list[bytes], when: bytes) -> None:
        self.file.write(self._format(stream, lines, when))
        if self.console is not None:
            self.console.output(self.instance, lines,
                                "" if stream in HOST_STREAMS else f"[{stream}] ")

    def _format(self, stream: str, lines: list[bytes], when: bytes) -> bytes:
        if self.json_lines:
            head = (f'{{"time": "{when.decode()}", "stream": {json.dumps(stream)}, '
                    f'"instance": {json.dumps(self.instance)}, "line": ')
            # One decode per chunk ("\n" is never part of a UTF-8 sequence), and the C
            # string encoder: json.dumps builds an encoder at every call with ensure_ascii off.
            texts = b"\n".join(lines).decode("utf-8", "replace").split("\n")
            return "".join([f"{head}{encode_basestring(text)}}}\n" for text in texts]).encode()
        prefix = b"%s %s | " % (when, stream.encode())
        return prefix + (b"\n" + prefix).join(lines) + b"\n"

    def _marker(self, text: str) -> bytes:
        """The file's line for output it lost, in the file's format."""
        return self._format("rolehost", [text.encode()], stamp())


def render(line: str) -> str:
    """A line of an instance log as `rolehost logs` prints it: the text form, whichever
    form the file has. A line of neither (a log from an older rolehost) is left as it is."""
    if not line.startswith("{"):
        return line
    try:
        entry = json.loads(line)
    except ValueError:
        return line
    if not isinstance(entry, dict) or not isinstance(entry.get("line"), str):
        return line
    return f"{entry.get('time', '')} {entry.get('stream', '')} | {entry['line']}"


def render_all(text: str) -> str:
    """A whole instance log, each line as `render` gives it."""
    return "\n".join(render(line) for line in text.split("\n"))

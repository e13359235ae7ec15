"""The history of management operations: one JSON line per change, in the run directory.

Every operation (a maintenance command, a walk) is written when it begins, again when
it touches more instances (a walk reaching a domain) or halts, and when it ends, so the
file survives the controller: an operation that began and never ended was interrupted,
and the next controller says so (one that had halted had failed already: it says that).

Each line is the whole operation as it stands, and the last line of an operation wins.
So a write that fails (a full disk) loses nothing for good while the controller runs:
the operation stays in memory (and in the API), one `history_write_failed` event says
so, and the next write that works appends what is missing first
(`history_write_resumed`).
"""

from __future__ import annotations

import errno
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pydantic
import structlog

from rolehost.observability import logs, metrics

log = structlog.get_logger()
# Operations kept in memory, for `rolehost ops` and the success rate; the file keeps all.
# Without a bound the controller grew by about 0.4 KB an operation, for as long as it ran.
KEPT = 1000
# Why a halted walk ended without an `abort`: its controller stopped, or was killed.
HALTED_AT_STOP = "the controller stopped while the walk was halted"


@dataclass
class Operation:
    kind: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    started: float = field(default_factory=time.time)
    ended: float | None = None
    # running, halted (a walk waiting for `abort`), succeeded, failed, aborted, interrupted
    outcome: str = "running"
    error: str | None = None
    instances: list[str] = field(default_factory=list)


class History:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.operations: dict[str, Operation] = {}
        self._unwritten: dict[str, Operation] = {}  # changed since their last line was written
        self._failing_since: float | None = None
        self._full = False  # the last write failed for want of space
        self.skipped = 0  # lines of the file that were not an operation's
        self._load()

    def _load(self) -> None:
        lines = read(self.path)
        self.operations, self.skipped = lines.operations, lines.skipped
        _skipped(self.path, self.skipped)
        for operation in self.operations.values():
            if operation.ended is None:
                _left_by_a_dead_controller(operation)
                operation.ended = time.time()
                self._write(operation)
        self._forget()

    def begin(self, kind: str, arguments: dict[str, Any], instances: list[str]) -> Operation:
        operation = Operation(kind, arguments, instances=instances)
        self.operations[operation.id] = operation
        self._forget()
        self._write(operation)
        log.info("operation_began", operation=operation.id, kind=kind, instances=instances)
        return operation

    def touched(self, operation: Operation, instances: list[str]) -> None:
        """`operation`, still running, now touches `instances` too: written at once, so
        that an operation a killed controller interrupts lists what it had touched."""
        operation.instances += [i for i in instances if i not in operation.instances]
        self._write(operation)

    def halted(self, operation: Operation, error: str) -> None:
        """`operation` (a walk) stopped short and waits for a person: not ended, but no
        longer running either. Written at once, so that `ops` and the success rate count
        it while it waits, and the next controller knows it had failed if this one dies."""
        operation.outcome, operation.error = "halted", error
        self._write(operation)
        log.info("operation_halted", operation=operation.id, kind=operation.kind, error=error)

    def end(self, operation: Operation, outcome: str, error: str | None = None) -> None:
        operation.outcome, operation.error, operation.ended = outcome, error, time.time()
        self._write(operation)
        metrics.OPERATIONS.labels(operation.kind.split()[0], outcome).inc()
        log.info("operation_ended", operation=operation.id, kind=operation.kind,
                 outcome=outcome, error=error)

    def _write(self, operation: Operation) -> None:
        """Append the operation's line, after those that could not be written before."""
        behind = list(self._unwritten)  # operations with a line that could not be written
        self._unwritten[operation.id] = operation
        if self._full and logs.out_of_space(self.path.parent):
            return  # still full: not even tried
        lines = "".join(json.dumps(asdict(o)) + "\n" for o in self._unwritten.values())
        try:
            logs.append(self.path, lines.encode())
        except OSError as exc:  # a full disk delays history lines, never the controller
            self._full = exc.errno == errno.ENOSPC
            if self._failing_since is None:  # once, not at every operation
                self._failing_since = time.time()
                log.error("history_write_failed", file=str(self.path),
                          error=exc.strerror or str(exc),
                          detail="operations are kept in memory and written once there is space")
            return
        self._unwritten.clear()
        self._full = False
        if self._failing_since is not None:
            since, self._failing_since = self._failing_since, None
            log.warning("history_write_resumed", file=str(self.path), caught_up=behind,
                        since=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)))

    def _forget(self) -> None:
        """Drop the oldest ended operations past KEPT (a running or halted one is never
        dropped; one whose line is still unwritten stays in `_unwritten` until it is
        written)."""
        excess = len(self.operations) - KEPT
        if excess <= 0:
            return
        ended = [key for key, o in self.operations.items() if o.ended is not None]
        for key in ended[:excess]:
            del self.operations[key]

    def summary(self) -> dict[str, Any]:
        return _summary(list(self.operations.values()), self.skipped)


class _Line(pydantic.BaseModel):
    """One line of the file, as `_write` writes it: anything else is not a line of it.
    Strict: `"started": "1796640868"`, `null`, `1e400` or `"instances": null` crashed
    `rolehost ops` further on, and a non-finite number came out of `ops --json` as
    `Infinity`, which is not JSON. A field this version does not know is ignored (a
    newer rolehost's line keeps what it shares)."""

    model_config = pydantic.ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")

    kind: str
    arguments: dict[str, Any]
    id: str
    started: float
    # As Operation's defaults: a line written for a test, or by hand, may leave them out.
    ended: float | None = None
    outcome: str = "running"
    error: str | None = None
    instances: list[str] = []

    @pydantic.field_validator("arguments")
    @classmethod
    def _finite(cls, arguments: dict[str, Any]) -> dict[str, Any]:
        json.dumps(arguments, allow_nan=False)  # ValueError for a non-finite number
        return arguments


@dataclass
class Lines:
    """The operations of a history file, each as its last line left it, and how many
    lines were skipped (cut short by a crash or a full disk, or not an operation's)."""

    operations: dict[str, Operation]
    skipped: int = 0


def read(path: Path) -> Lines:
    """The operations of a history file. A bad line is skipped and counted, never the
    end of the file: the good lines around it are all read. Each line is parsed by
    pydantic's parser, which has a depth limit: a 100,000-deep line is one bad line,
    not a RecursionError that ended the start."""
    lines = Lines({})
    if not path.exists():
        return lines
    for line in path.read_text(errors="replace").splitlines():
        try:
            operation = Operation(**_Line.model_validate_json(line).model_dump())
        except pydantic.ValidationError:
            lines.skipped += 1
            continue
        lines.operations[operation.id] = operation
    return lines


def _skipped(path: Path, count: int) -> None:
    if count:
        log.warning("history_lines_skipped", file=str(path), count=count,
                    detail="lines that are not an operation's were left out")


def summary_without_controller(path: Path) -> dict[str, Any]:
    """What a controller's `summary` would say of the history at `path`, for when none
    runs. The file is only read: the next controller records the interruptions."""
    lines = read(path)
    operations = list(lines.operations.values())[-KEPT:]
    for operation in operations:
        if operation.ended is None:
            _left_by_a_dead_controller(operation)
    return _summary(operations, lines.skipped)


def _left_by_a_dead_controller(operation: Operation) -> None:
    """What an operation the controller never ended becomes. A running one was cut
    short: interrupted. A halted one had failed already (a domain did not come back) and
    only waited for `abort`, which would have recorded it failed: so is it, its halt's
    error kept."""
    if operation.outcome == "halted":
        operation.outcome = "failed"
        operation.error = f"{operation.error}; {HALTED_AT_STOP}"
    else:
        operation.outcome = "interrupted"
        operation.error = "the controller stopped before the operation ended"


def _summary(operations: list[Operation], skipped: int) -> dict[str, Any]:
    # A halted operation counts: it has not succeeded, and an `abort` ends it failed.
    counted = [o for o in operations if o.outcome != "running"]
    succeeded = sum(1 for o in counted if o.outcome == "succeeded")
    return {
        "operations": [asdict(o) for o in operations],
        "success_rate": round(succeeded / len(counted), 3) if counted else None,
        "skipped_lines": skipped,
    }

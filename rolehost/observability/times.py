"""How times are written: ISO 8601 in the API and the event log, `HH:MM:SS` on the console.
Apart from `logs` (structlog) so that the command line's tables print them without
importing the logging pipeline (issue 23: `rolehost status`'s start)."""

from __future__ import annotations

from datetime import UTC, datetime


def iso(timestamp: float | None) -> str | None:
    """A time as the API and the event log write it: ISO 8601, UTC, ms, ending in `Z`."""
    if timestamp is None:
        return None
    stamp = datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def clock(stamp: str | None) -> str:
    """`HH:MM:SS` in local time, as the console prints it, from an ISO 8601 timestamp."""
    if not stamp:
        return ""
    try:
        return datetime.fromisoformat(stamp).astimezone().strftime("%H:%M:%S")
    except ValueError:
        return stamp

"""Controller <-> host messages: newline-delimited JSON objects over a socket pair.

Every message is an object with a `type`. Host to controller:

- `state`     `{"state": "starting" | "busy" | "ready" | "stopping", "reason": str}`
- `recycle`   `{"reason": str}`: the host is about to exit to be recycled
- `error`     `{"where": str, "traceback": str, "timed_out": bool}`: user code failed;
              `timed_out` when it was the stop, cut short by the host's own bound on it
              (`host_stop_bound`), just before the controller's deadline
- `heartbeat` `{}`: sent every `heartbeat` seconds (from `assign`) by a thread no user
              code runs on
- `changing_result` `{"cancel": bool}`

Controller to host: first `assign` `{"context": {...}, "env": {...}, "cwd": str,
"heartbeat": float, "peers": {id: record, ...}}` (`peers`: every instance's record, the
table the host starts with, encoded once per change by the controller), which
makes a standby host the host of one instance (see `processes/hosts.Standby`); then `stop`
`{"reason": str}`, `status_check` `{}`, `changing` `{"changes": [...]}`,
`changed` `{"settings": {...}}` or `{"topology": {role: [id, ...]}, "topology_changed":
[role]}`, and `peers` `{"instances": [record, ...]}`: the controller's new records of
instances (id, role, index, update_domain, endpoints, ready) whenever one changes; a host
raises `changed` for one whose endpoints moved, if its role's instances list it.

This module is imported by the host process, so it must stay cheap to import.
"""

from __future__ import annotations

import json
from enum import IntEnum

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

CHANNEL_FD_ENV = "ROLEHOST_CHANNEL_FD"
TOKEN_ENV = "ROLEHOST_INSTANCE_TOKEN"

# `[service] heartbeat_interval`'s default, and a host's if `assign` gives none.
HEARTBEAT_INTERVAL = 2.0

# The controller owns a stop's deadline: `stop_timeout` after it sends `stop`, it kills
# the host's tree (docs/design.md, "Who owns which timeout"). The host keeps an inner,
# best-effort bound a little inside it, derived from the same value: time enough to say
# what overran (on_start, or the stopping handlers and on_stop) and exit on its own.
STOP_REPORT_MARGIN = 0.5


def host_stop_bound(stop_timeout: float) -> float:
    """How long the host gives its own stop before it reports the overrun and exits."""
    return stop_timeout - min(STOP_REPORT_MARGIN, stop_timeout / 4)


Message = dict[str, "Any"]


class ExitCode(IntEnum):
    """How a host process ended; the messages before it carry the details."""

    STOPPED = 0  # a requested stop completed
    CRASHED = 1  # an unhandled exception (Python's own exit status for one)
    RECYCLE = 75  # on_start returned False, run returned, or request_recycle()
    BOOT_FAILED = 76  # the entry point could not be imported or constructed
    ORPHANED = 77  # the controller went away; the host took its tree down


def encode(message: Message, encoded: dict[str, bytes] | None = None) -> bytes:
    """`message` as a line; `encoded`'s fields, JSON already, are added as they are (a
    table the controller keeps encoded, not serialised again for each host)."""
    data = json.dumps(message, separators=(",", ":"), default=str).encode()
    if encoded:
        data = data[:-1] + b"".join(b"," + json.dumps(name).encode() + b":" + value
                                    for name, value in encoded.items()) + b"}"
    return data + b"\n"


# A heartbeat as `encode` writes it: most of what hosts send (at 500 instances, 250 a
# second), known without a JSON parse.
_HEARTBEAT = encode({"type": "heartbeat"}).rstrip(b"\n")


def decode(line: bytes) -> Message:
    if line == _HEARTBEAT:
        return {"type": "heartbeat"}
    message = json.loads(line)
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ValueError(f"not a rolehost message: {line[:200]!r}")
    return message

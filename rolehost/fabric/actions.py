"""What `Lifecycle` asks its adapter to do: the actions its events return. Each is a
plain value, so that a scripted history of events can be checked against the actions it
gives, with no process, timer or balancer (tests/test_lifecycle_events.py);
`rolehost.fabric.instance.Instance` carries them out in order."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from rolehost.fabric.lifecycle import State

# What a Kill is for.
HOST, TASKS = "host", "tasks"
# The instance's timers: each one's expiry is an event of its own.
READY_DEADLINE, SILENT, STOP = "ready deadline", "silent", "stop"


class Enter(NamedTuple):
    """Change the state (the adapter's `_set`: rotation, observers, the operation)."""

    state: State
    reason: str = ""


class Send(NamedTuple):
    """A message to the host over its channel."""

    message: dict[str, Any]


class Kill(NamedTuple):
    """SIGKILL the host's tree (HOST) or this boot's startup tasks (TASKS), if running."""

    target: str


class Schedule(NamedTuple):
    """Start (or start again) the named timer; 0 or less: it expires now."""

    timer: str
    delay: float


class Drain(NamedTuple):
    """Out of rotation, and let the requests in flight finish, before the host is asked
    to stop; then feed the lifecycle `drained`."""

    reason: str


class Rotate(NamedTuple):
    """Work the rotation out again, with no change of state: the host went silent, or
    was heard again (the balancers, whether the instance is back, its waiters)."""


class Interrupt(NamedTuple):
    """Wake the supervisor: a stop or an operation wants the host down (or, `recycle`,
    the host asked to be stopped and recycled)."""

    recycle: bool = False


class Sample(NamedTuple):
    """A heartbeat: measure the host's local resources when due."""


class Answer(NamedTuple):
    """The host's answer to a `changing`: whether its handlers cancelled the change."""

    cancel: bool


class Log(NamedTuple):
    """An event for the controller's log (`level` is structlog's)."""

    level: str
    event: str
    fields: dict[str, Any]


Action = Enter | Send | Kill | Schedule | Drain | Rotate | Interrupt | Sample | Answer | Log

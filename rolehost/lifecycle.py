"""The rules of one instance's lifecycle, apart from any process, socket or clock.

The states and the transitions between them, when an instance is back, when an
operation on it is over, the crash back-off, the ready deadline shared by the boots of
a crash loop, and whether a stop was cut short. Each is a plain function of what it is
given (times included), so that scripted histories test them with no process and no
event loop; `rolehost.instance.Instance` carries out what they decide.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class State(StrEnum):
    CREATED = "created"
    BOOTSTRAPPING = "bootstrapping"
    STARTING = "starting"
    BUSY = "busy"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    RECYCLING = "recycling"
    FAILED = "failed"


S = State
TRANSITIONS: dict[State, frozenset[State]] = {
    S.CREATED: frozenset({S.BOOTSTRAPPING, S.STOPPED}),
    S.BOOTSTRAPPING: frozenset({S.STARTING, S.RECYCLING, S.FAILED, S.STOPPING, S.STOPPED}),
    S.STARTING: frozenset({S.BUSY, S.READY, S.STOPPING, S.RECYCLING, S.FAILED, S.STOPPED}),
    S.BUSY: frozenset({S.READY, S.STOPPING, S.RECYCLING, S.FAILED, S.STOPPED}),
    # FAILED: ready, but not back in rotation within the ready deadline (a probe failing).
    S.READY: frozenset({S.BUSY, S.STOPPING, S.RECYCLING, S.FAILED, S.STOPPED}),
    S.STOPPING: frozenset({S.STOPPED, S.RECYCLING, S.FAILED, S.BOOTSTRAPPING}),
    S.RECYCLING: frozenset({S.BOOTSTRAPPING, S.STOPPED}),
    S.STOPPED: frozenset({S.BOOTSTRAPPING}),
    S.FAILED: frozenset({S.BOOTSTRAPPING, S.STOPPED}),
}
RUNNING = frozenset({S.STARTING, S.BUSY, S.READY})  # a host runs the role
# Where an operation on the instance can end: back (ready, in rotation) or not.
SETTLED = frozenset({S.READY, S.FAILED, S.RECYCLING, S.STOPPED})


class IllegalTransition(RuntimeError):
    """A bug in supervision: a change of state the lifecycle does not have."""


def check_transition(instance: str, old: State, new: State) -> None:
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"{instance}: no transition {old} -> {new}")


def is_back(state: State, rotation: Iterable[bool]) -> bool:
    """Back: ready, and in rotation on every input endpoint it serves. What every
    operation that took an instance out waits for (docs/walks.md)."""
    return state is S.READY and all(rotation)


def settled(state: State, back: bool) -> bool:
    """An operation on the instance is over: back, or ended otherwise (failed,
    recycling, stopped). Ready but not yet in rotation is not an end: the ready
    deadline decides that."""
    return back if state is S.READY else state in SETTLED


@dataclass
class Backoff:
    """Crash back-off: doubling from `initial` up to `maximum`, and none again once a
    boot stayed ready for `stable_after` (a crash an hour after a good start is not a
    loop)."""

    initial: float
    maximum: float
    stable_after: float
    failures: int = 0  # in a row: the exponent, and `status`'s `attempt`

    def next_delay(self, now: float, ready_since: float | None) -> float:
        """The wait before the next boot, for a boot that just ended at `now`."""
        if ready_since is not None and now - ready_since >= self.stable_after:
            self.failures = 0
            return 0.0
        self.failures += 1
        return float(min(self.initial * 2 ** (self.failures - 1), self.maximum))

    def reset(self) -> None:
        """Someone acted (an operation): the next failure starts the back-off over."""
        self.failures = 0


@dataclass
class ReadyDeadline:
    """The boots since the instance was last back share one ready deadline: a crash
    loop that never gets there ends failed ("waiting for host") instead of recycling
    for good."""

    seconds: float
    unready_since: float | None = None  # when the first unready boot began
    boots: int = 0  # boots since then

    def begin_boot(self, now: float) -> float:
        """A boot begins: the seconds left of the deadline (0 or less: missed now)."""
        if self.unready_since is None:
            self.unready_since, self.boots = now, 0
        self.boots += 1
        return self.unready_since + self.seconds - now

    def clear(self) -> None:
        """Met (the instance is back), or someone acted (an operation): the next boot
        starts a fresh deadline."""
        self.unready_since = None

    def missed(self, where: str, last_error: str) -> str:
        """Why the instance fails: where its boot was, and for a loop what it last did."""
        if self.boots <= 1:
            return (f"waiting for host: not ready within the ready deadline "
                    f"({self.seconds:g}s); it was {where}")
        return (f"waiting for host: not ready within the ready deadline ({self.seconds:g}s) "
                f"in {self.boots} boots; it was {where}; last error: {last_error}")


@dataclass
class StopOutcome:
    """Whether the instance's final stop was cut short: an on_stop or a foreground task
    that overran stop_timeout, or a stop forced by a second signal. Overruns of the
    restarts before that stop are not its own."""

    overruns: int = 0  # every stop's, since the instance was created
    _at_final_stop: int | None = None
    forced: str | None = None  # why the stop was forced, if it was

    def overran(self) -> None:
        self.overruns += 1

    def final_stop_begins(self) -> None:
        if self._at_final_stop is None:
            self._at_final_stop = self.overruns

    def force(self, why: str) -> None:
        self.final_stop_begins()
        self.forced = self.forced or why

    @property
    def cut_short(self) -> bool:
        return self.forced is not None or (
            self._at_final_stop is not None and self.overruns > self._at_final_stop)

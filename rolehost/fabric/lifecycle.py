"""The rules of one instance's lifecycle, apart from any process, socket or clock.

The states and the transitions between them, rotation on each endpoint and when an
instance is back, when an operation on it is over, the crash back-off, the ready
deadline shared by the boots of a crash loop, and whether a stop was cut short.
`Lifecycle` holds them for one instance, sans-IO: it is fed what happened (a boot, the
host started, a message, the host's exit, a timer's expiry, a stop, a force, a probe's
result, the end of a boot), with the time, and returns the actions that follow
(`rolehost.fabric.actions`); `rolehost.fabric.instance.Instance` is the adapter that feeds
it and carries them out with processes, timers and balancers. Scripted histories test it
with no process and no event loop (tests/test_lifecycle_rules.py,
tests/test_lifecycle_events.py). See docs/design.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, NamedTuple

from rolehost.fabric.actions import (
    HOST,
    READY_DEADLINE,
    SILENT,
    STOP,
    TASKS,
    Action,
    Answer,
    Drain,
    Enter,
    Interrupt,
    Kill,
    Log,
    Rotate,
    Sample,
    Schedule,
    Send,
)
from rolehost.protocol import HEARTBEAT_INTERVAL, ExitCode, Message

if TYPE_CHECKING:
    from rolehost.definition import Endpoint


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


# A host sends a heartbeat every `[service] heartbeat_interval`, and any message counts
# as one. Silent for MISSED intervals, it missed one: frozen (SIGSTOP, a C extension
# holding the GIL, a machine swapping), it answers no request, so it leaves rotation until
# it is heard again. Silent for UNRESPONSIVE, it is not coming back: it is killed.
MISSED = 1.5
UNRESPONSIVE = 15  # 30 s at the default interval of 2 s


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


class ProbeResult(NamedTuple):
    """Where a probed endpoint stands after a probe."""

    healthy: bool
    seen: str  # what the last probe saw: "HTTP 503", "connected", ...
    passes: int  # passes in a row (of the probe's `healthy` that make it healthy)


class After(StrEnum):
    """What follows a boot."""

    STOP = "stop"  # the final stop: stopped once the boot has ended
    OPERATION = "operation"  # an operation's boot, at once
    FAIL = "fail"  # failed, until someone acts
    RECYCLE = "recycle"  # another boot, after the back-off


class Next(NamedTuple):
    """What follows a boot, why, the actions to carry out before the end of the boot is
    awaited, and a recycle's back-off."""

    what: After
    reason: str = ""
    actions: tuple[Action, ...] = ()
    delay: float = 0.0


@dataclass
class Lifecycle:
    """One instance's state and every rule that decides it. Each method takes an event
    (with the time it happened, where that matters) and returns the actions that follow;
    none does I/O."""

    instance: str
    backoff: Backoff
    deadline: ReadyDeadline
    since: float  # when the state began
    heartbeat: float = HEARTBEAT_INTERVAL  # seconds between the host's heartbeats
    state: State = S.CREATED
    reason: str = ""
    stop: StopOutcome = field(default_factory=StopOutcome)
    ready_since: float | None = None  # this boot's first `ready`
    back: bool = False  # ready, and in rotation on every input endpoint
    back_since: float | None = None  # this boot's first time back: its deadline is met
    boot_began: float = 0.0
    draining: str | None = None  # why, while the instance drains
    silent: str | None = None  # why, while its host is not heard (a heartbeat missed)
    probes: dict[str, ProbeResult] = field(default_factory=dict)  # by endpoint
    # How this boot is ending, as far as it is known: the host asked to be recycled
    # (why), the ready deadline failed it (why), the error it reported last.
    recycle_reason: str | None = None
    failed_reason: str | None = None
    run_error: str | None = None
    stop_by: float | None = None  # when the stop under way must be over: its one deadline
    overrun_reported: bool = False  # the host said its stop overran (its own bound), this stop
    # What `status` shows of the boots so far.
    last_error: str | None = None
    last_traceback: str | None = None
    recycled_for: str = ""  # the last recycle's reason (on_start False sets no error)
    next_try: float | None = None  # when the boot after a recycle's back-off begins
    stop_reason: str | None = None  # the final stop's, once asked

    def change(self, state: State, reason: str, now: float, force: bool = False) -> bool:
        """Enter `state`; False if it is the state already. IllegalTransition for one
        the table has not (`force`: a supervisor's crash, which must end failed)."""
        if state == self.state:
            return False
        if not force:
            check_transition(self.instance, self.state, state)
        self.state, self.reason, self.since = state, reason, now
        if state is S.READY and self.ready_since is None:
            self.ready_since = now
        return True

    def reported(self, state: State) -> State | None:
        """The state a host's report moves the instance to, or None: a host reports
        `busy`, `ready` and `stopping` only while it runs the role, and a late report
        (the instance stopping or down already) is not news."""
        if self.state in RUNNING and state in (S.BUSY, S.READY, S.STOPPING):
            return state
        return None

    def boot_begins(self, now: float) -> None:
        """A boot: not ready, not back, nothing probed or drained yet, no end known."""
        self.ready_since = self.back_since = None
        self.recycle_reason = self.failed_reason = self.run_error = None
        self.draining = self.silent = None
        self.probes.clear()
        self.boot_began = now

    def deadline_starts(self, now: float) -> float:
        """The host's time to ready begins: the seconds left (0 or less: missed now)."""
        self.boot_began = now
        return self.deadline.begin_boot(now)

    def operation_begins(self) -> None:
        """Someone acted: a fresh ready deadline and back-off."""
        self.deadline.clear()
        self.backoff.reset()

    def stop_begins(self, now: float, stop_timeout: float) -> float:
        """A stop begins (the host is asked to stop, or its boot ends without one): its
        deadline, `stop_timeout` from now, is the one the controller keeps for all of it:
        the host gone, then its foreground tasks. The seconds left of it (a stop under
        way keeps its own)."""
        if self.stop_by is None:
            self.stop_by = now + stop_timeout
        return self.stop_by - now

    def stop_overran(self, stop_timeout: float) -> str | None:
        """The stop's deadline passed with the host still there: it is killed, and the
        stop was cut short. What the instance's last error says, unless the host said
        first what overran (and was on its way out)."""
        if self.overrun_reported:
            return None
        self.stop.overran()
        self.run_error = f"did not stop within stop_timeout ({stop_timeout:g}s); killed"
        return self.run_error

    def stop_over(self) -> None:
        """Nothing of the stop is left to wait for: the next one has its own deadline."""
        self.stop_by = None
        self.overrun_reported = False

    def boot_ended(self, now: float) -> float:
        """A boot ended that will be followed by another: the back-off before it."""
        return self.backoff.next_delay(now, self.ready_since)

    def probed(self, name: str, result: ProbeResult) -> bool:
        """Keep a probe's result; False when it cannot move the instance in or out of
        rotation, nor change why it is out: healthy before and after. That is every
        served instance's steady state, a result per probe interval each, and the
        balancer and the waiters need not hear of it."""
        before = self.probes.get(name)
        self.probes[name] = result
        return not (result.healthy and before is not None and before.healthy)

    def rotation(self, name: str, endpoint: Endpoint) -> tuple[bool, str]:
        """Whether the instance takes traffic on endpoint `name`, and if not why."""
        if self.draining is not None:
            return False, f"draining: {self.draining}"
        if self.silent is not None:
            return False, f"silent: {self.silent}"
        if self.state is S.BUSY and not endpoint.ignore_status:
            return False, f"busy: {self.reason}" if self.reason else "busy"
        if self.state not in (S.READY, S.BUSY):
            return False, self.state.value
        if endpoint.probe is not None:
            result = self.probes.get(name)
            if result is None:
                return False, "probe failing: no probe result yet"
            return result.healthy, "" if result.healthy else f"probe failing: {result.seen}"
        return True, ""

    def update_back(self, endpoints: Mapping[str, Endpoint], now: float) -> bool:
        """Work out `back` again from the rotation on `endpoints` (those the instance
        serves behind a balancer); True if it changed. The first time a boot is back,
        its ready deadline is met."""
        # Silent, it serves nothing: not back, with or without an endpoint (run-instance's
        # /ready has none behind a balancer).
        back = self.silent is None and is_back(
            self.state, (self.rotation(n, e)[0] for n, e in endpoints.items()))
        if back == self.back:
            return False
        self.back = back
        if back and self.back_since is None:
            self.back_since = now
            self.deadline.clear()
        return True

    def why_not_back(self, endpoints: Mapping[str, Endpoint]) -> str:
        """Why the instance is not back, as `status` says it ("" while it is)."""
        if self.back:
            return ""
        if self.state is not S.READY:
            return self.state.value
        out = []
        for name, endpoint in endpoints.items():
            in_rotation, why = self.rotation(name, endpoint)
            if in_rotation:
                continue
            result = self.probes.get(name)
            if why.startswith("probe failing") and result is not None and endpoint.probe:
                why = (f"probe failing ({result.passes}/{endpoint.probe.healthy} healthy): "
                       f"{result.seen}")
            out.append(f"{name}: {why}")
        if not out and self.silent is not None:
            out.append(f"silent: {self.silent}")
        return ("out of rotation: " if self.back_since is not None else "not yet in rotation: ") + \
            "; ".join(out)

    @property
    def settled(self) -> bool:
        """An operation on the instance is over: see `settled`."""
        return settled(self.state, self.back)

    # Events in, actions out: what the adapter feeds and carries out.

    @property
    def stopping_for_good(self) -> bool:
        """The final stop was asked: no boot follows this one."""
        return self.stop_reason is not None

    def host_started(self, pid: int) -> list[Action]:
        """The boot's host runs the role: it must speak within MISSED heartbeat
        intervals. A stop that ended with the last host (an agent update's) is over."""
        self.stop_over()
        return [Enter(S.STARTING, f"host process {pid} started"),
                Schedule(SILENT, MISSED * self.heartbeat)]

    def message(self, message: Message) -> list[Action]:
        """What the host said; any message proves it is not frozen, and a silent host is
        heard again: back in rotation, in the same process."""
        actions: list[Action] = [Schedule(SILENT, MISSED * self.heartbeat)]
        if self.silent is not None:
            self.silent = None
            actions += [Log("info", "host_heard", {}), Rotate()]
        kind = message["type"]
        if kind == "state":
            state, reason = State(message["state"]), str(message.get("reason") or "")
            if (new := self.reported(state)) is not None:
                actions.append(Enter(new, reason))
        elif kind == "recycle":
            self.recycle_reason = str(message.get("reason", "recycle requested"))
            if message.get("graceful"):  # stop me, as a stop the controller begins
                actions.append(Interrupt(recycle=True))
        elif kind == "error":
            where, text = str(message.get("where")), str(message.get("traceback", ""))
            self.last_traceback = text
            summary = text.strip().splitlines()[-1] if text.strip() else "failed"
            self.last_error = self.run_error = f"{where}: {summary}"
            actions.append(Log("error", "role_error", {"where": where, "error": summary}))
            if message.get("timed_out") and not self.overrun_reported:  # its own bound
                self.overrun_reported = True
                self.stop.overran()
        elif kind == "changing_result":
            actions.append(Answer(bool(message.get("cancel"))))
        elif kind == "heartbeat":
            actions.append(Sample())
        return actions

    def heartbeat_missed(self) -> list[Action]:
        """The SILENT timer expired. The first time (MISSED intervals of silence), the
        host is out of rotation until it is heard again; the second (UNRESPONSIVE), it is
        frozen for good, and killed (a crash)."""
        if self.silent is None:
            missed = MISSED * self.heartbeat
            self.silent = f"no heartbeat for {missed:.1f}s"
            return [Log("warning", "host_silent", {"silent_for": round(missed, 1)}), Rotate(),
                    Schedule(SILENT, (UNRESPONSIVE - MISSED) * self.heartbeat)]
        unresponsive = UNRESPONSIVE * self.heartbeat
        self.run_error = f"host unresponsive: silent for {unresponsive:g}s"
        return [Log("error", "host_unresponsive", {"silent_for": round(unresponsive, 1)}),
                Kill(HOST)]

    def memory_measured(self, size: int, limit: int | None, shown: str | None) -> list[Action]:
        """The host's tree uses `size` bytes. Over the role's max_memory (`limit`; `shown`
        as the definition says it), it is recycled gracefully, as a host that asks for it
        (once: a recycle asked already goes on)."""
        if limit is None or size <= limit or self.recycle_reason is not None:
            return []
        self.last_error = self.recycle_reason = (
            f"max_memory: the host's processes use {size / 2**20:.0f}MB, over {shown}")
        return [Log("warning", "memory_recycle",
                    {"rss_mb": round(size / 2**20, 1), "max_memory": shown}),
                Interrupt(recycle=True)]

    def ready_deadline_begins(self, now: float) -> list[Action]:
        """The boot's time to ready begins, with what is left of the deadline of the boots
        since the instance was last back: spent in earlier boots, it is missed now."""
        return [Schedule(READY_DEADLINE, self.deadline_starts(now))]

    def deadline_missed(self, running: Sequence[str],
                        endpoints: Mapping[str, Endpoint]) -> list[Action]:
        """Not back within the ready deadline: the boot ends failed, its tasks (`running`)
        and host killed. The reason says where the boot was."""
        where = self.state.value
        if self.state is S.BOOTSTRAPPING and running:
            where += f", running {', '.join(running)}"
        elif self.state is S.READY:  # not back: the deadline runs until it is in rotation
            where += f", {self.why_not_back(endpoints)}"
        self.failed_reason = self.deadline.missed(where, self.last_error or self.recycled_for)
        self.last_error = self.run_error = self.failed_reason
        return [Log("error", "ready_deadline_missed", {"state": self.state.value}),
                Kill(TASKS), Kill(HOST)]

    def stop_asked(self, reason: str) -> list[Action]:
        """The final stop: the host goes down gracefully, and no boot follows."""
        self.stop_reason = reason
        self.stop.final_stop_begins()
        return [Interrupt()]

    def force(self, reason: str, tasks_ended: bool) -> list[Action]:
        """Cut the stop short (a second signal): asked first, so that the host's death is
        taken for the stop it is, not for a crash to recycle from; then the host's tree,
        and the tasks of a boot whose end waits on them, are killed now."""
        actions = self.stop_asked(self.stop_reason or reason)  # one under way keeps its own
        self.stop.force(reason)
        return [*actions, *([Kill(TASKS)] if tasks_ended else []), Kill(HOST)]

    @property
    def forced(self) -> bool:
        return self.stop.forced is not None

    def host_must_stop(self, operation: str | None) -> list[Action]:
        """A stop, an operation (`kind: cause`) or the host itself wants its host down
        while it runs: out of rotation first (the rotation event of STOPPING says why),
        then the drain."""
        reason = self.stop_reason or operation or self.recycle_reason or "stop requested"
        self.draining = reason
        return [*([Enter(S.STOPPING, reason)] if self.state in RUNNING else []),
                Drain(reason)]

    def drained(self, reason: str, now: float, stop_timeout: float) -> list[Action]:
        """The drain is over: the host is asked to stop, and the stop's one deadline
        begins (a forced stop asks nothing: the host is killed)."""
        if self.forced:
            return [Kill(HOST)]
        return [Send({"type": "stop", "reason": reason}),
                Schedule(STOP, self.stop_begins(now, stop_timeout))]

    def stop_overdue(self, pid: int, stop_timeout: float) -> list[Action]:
        """The stop's deadline passed with the host still there: it is killed."""
        self.last_error = self.stop_overran(stop_timeout) or self.last_error
        return [Log("error", "stop_timeout", {"pid": pid, "waited": stop_timeout}), Kill(HOST)]

    def exited(self, pid: int, code: int, outcome: str) -> list[Action]:
        """The host is gone. Unless it stopped as asked or asked to be recycled, that is
        the error (the one it reported, if any)."""
        if code != ExitCode.STOPPED and not self.recycle_reason:
            self.last_error = self.run_error or f"host {outcome}"
        return [Log("info", "host_exited", {"pid": pid, "outcome": outcome})]

    def boot_over(self, now: float, operation_pending: bool) -> Next:
        """The boot is over (its host gone, or it never started): what follows. A final
        stop; an operation, which begins a boot of its own; failed, at the ready deadline;
        or a recycle after the back-off."""
        if self.stop_reason is not None:
            return Next(After.STOP, self.stop_reason)
        if operation_pending:
            return Next(After.OPERATION)
        if self.failed_reason is not None:
            return Next(After.FAIL, self.failed_reason, (Enter(S.FAILED, self.failed_reason),))
        reason = self.recycled_for = self.recycle_reason or self.last_error or "host exited"
        delay = self.boot_ended(now)
        self.next_try = now + delay
        return Next(After.RECYCLE, reason,
                    (Enter(S.RECYCLING, f"{reason}; next try in {delay:g}s"),), delay)

    def tasks_overran(self, labels: Sequence[str], stop_timeout: float) -> list[Action]:
        """Foreground tasks killed at the stop's deadline: killed half done, as an on_stop
        that overran, so the stop was cut short; the final stop's last error says so."""
        actions: list[Action] = []
        for label in labels:
            actions.append(Log("error", "foreground_task_killed",
                               {"task": label, "waited": stop_timeout}))
            self.stop.overran()
            if self.stop_reason is not None:
                self.last_error = (f"foreground {label} did not end within stop_timeout "
                                   f"({stop_timeout:g}s); killed")
        return actions

    def ends_operation(self, started: bool) -> bool:
        """Whether the operation under way is over now: once it began (or the instance
        stopped before it could), back or ended otherwise."""
        return (started or self.state is S.STOPPED) and self.settled

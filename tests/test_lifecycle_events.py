"""The lifecycle's events and the actions they give, in scripted histories: no process,
no event loop, no timer, no clock but the times each step gives. `Script` plays the
adapter's part that the rules need (an `Enter` changes the state); every other action is
returned for the test to check. Then the disk table of docs/concepts.md, row by row: what
each maintenance event does to the folders (on files in tmp_path, no process) and whether
the host gets its graceful stop. The process-level tests of the same rules are in
test_lifecycle.py, test_maintenance.py and faults/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rolehost import definition
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
from rolehost.fabric.disks import Disks, Maintenance, apply
from rolehost.fabric.lifecycle import (
    MISSED,
    UNRESPONSIVE,
    After,
    Backoff,
    Lifecycle,
    Next,
    ReadyDeadline,
    State,
)
from rolehost.protocol import HEARTBEAT_INTERVAL

S = State
HEARD = Schedule(SILENT, MISSED * HEARTBEAT_INTERVAL)  # any message: the host is not frozen
STOP_TIMEOUT = 2.0


class Script:
    """One instance's lifecycle, fed events as the adapter feeds them."""

    def __init__(self, deadline: float = 30.0) -> None:
        self.life = Lifecycle("web_IN_0", Backoff(1.0, 8.0, stable_after=60.0),
                              ReadyDeadline(deadline), since=0.0)
        self.now = 0.0
        self.sent: list[Action] = []  # every action but Enter, in order

    def do(self, actions: list[Action]) -> list[Action]:
        rest = []
        for action in actions:
            if isinstance(action, Enter):  # as `Instance._set`: the rotation follows
                self.life.change(action.state, action.reason, self.now)
                self.life.update_back({}, self.now)
            else:
                if isinstance(action, Rotate):
                    self.life.update_back({}, self.now)
                rest.append(action)
        self.sent += rest
        return rest

    def at(self, now: float) -> Script:
        self.now = now
        return self

    def boot(self, reason: str = "deployment started") -> list[Action]:
        self.life.boot_begins(self.now)
        self.life.change(S.BOOTSTRAPPING, reason, self.now)
        return self.do(self.life.ready_deadline_begins(self.now))

    def started(self, pid: int = 100) -> list[Action]:
        return self.do(self.life.host_started(pid))

    def says(self, kind: str, **fields: Any) -> list[Action]:
        return self.do(self.life.message({"type": kind, **fields}))

    def ready(self, pid: int = 100) -> None:
        self.boot()
        self.started(pid)
        self.says("state", state="ready")
        assert self.life.state is S.READY

    def stop_host(self, operation: str | None = None) -> list[Action]:
        """The host is interrupted while it runs: the drain, then the stop."""
        actions = self.do(self.life.host_must_stop(operation))
        (drain,) = actions
        assert isinstance(drain, Drain)
        return self.do(self.life.drained(drain.reason, self.now, STOP_TIMEOUT))

    def exited(self, code: int, outcome: str, pid: int = 100) -> list[Action]:
        return self.do(self.life.exited(pid, code, outcome))

    def over(self, operation_pending: bool = False) -> Next:
        after = self.life.boot_over(self.now, operation_pending)
        self.do(list(after.actions))
        return after


def test_a_boot_to_ready() -> None:
    s = Script()
    assert s.boot() == [Schedule(READY_DEADLINE, 30.0)]
    assert s.at(1.0).started(pid=4242) == [HEARD]
    assert (s.life.state, s.life.reason) == (S.STARTING, "host process 4242 started")
    assert s.at(2.0).says("state", state="busy", reason="warming") == [HEARD]
    assert (s.life.state, s.life.reason) == (S.BUSY, "warming")
    assert s.at(3.0).says("state", state="ready") == [HEARD]
    assert s.life.state is S.READY and s.life.ready_since == 3.0
    assert s.says("heartbeat") == [HEARD, Sample()]
    assert s.says("changing_result", cancel=True) == [HEARD, Answer(True)]


def test_a_graceful_stop_drains_then_asks_the_host_with_one_deadline() -> None:
    s = Script()
    s.ready()
    assert s.do(s.life.stop_asked("the controller is stopping")) == [Interrupt()]
    assert s.life.stopping_for_good
    assert s.do(s.life.host_must_stop("restart: requested")) == [
        Drain("the controller is stopping")]  # the final stop's reason wins
    assert s.life.state is S.STOPPING and s.life.draining == "the controller is stopping"
    assert s.at(5.0).do(s.life.drained("the controller is stopping", 5.0, STOP_TIMEOUT)) == [
        Send({"type": "stop", "reason": "the controller is stopping"}),
        Schedule(STOP, STOP_TIMEOUT)]
    assert s.says("state", state="ready") == [HEARD]  # a late report is not news
    assert s.exited(0, "exited with 0 (stopped)") == [
        Log("info", "host_exited", {"pid": 100, "outcome": "exited with 0 (stopped)"})]
    assert s.life.last_error is None
    assert s.over() == Next(After.STOP, "the controller is stopping")
    assert not s.life.stop.cut_short


def test_the_stop_deadline_is_the_controllers_and_kills_the_host() -> None:
    s = Script()
    s.ready()
    s.do(s.life.stop_asked("stop requested"))
    assert s.at(10.0).stop_host() == [Send({"type": "stop", "reason": "stop requested"}),
                                      Schedule(STOP, STOP_TIMEOUT)]
    assert s.at(12.0).do(s.life.stop_overdue(100, STOP_TIMEOUT)) == [
        Log("error", "stop_timeout", {"pid": 100, "waited": STOP_TIMEOUT}), Kill(HOST)]
    s.exited(-9, "killed by SIGKILL")
    assert s.life.last_error == "did not stop within stop_timeout (2s); killed"
    assert s.over().what is After.STOP and s.life.stop.cut_short


def test_foreground_tasks_get_what_is_left_of_the_stops_deadline() -> None:
    s = Script()
    s.ready()
    s.do(s.life.stop_asked("stop requested"))
    s.at(10.0).stop_host()
    s.at(10.5).exited(0, "exited with 0 (stopped)")
    assert s.life.stop_begins(10.5, STOP_TIMEOUT) == 1.5  # the end of the boot
    assert s.do(s.life.tasks_overran(["startup task 2 (sleep 300)"], STOP_TIMEOUT)) == [
        Log("error", "foreground_task_killed",
            {"task": "startup task 2 (sleep 300)", "waited": STOP_TIMEOUT})]
    assert s.life.last_error == (
        "foreground startup task 2 (sleep 300) did not end within stop_timeout (2s); killed")
    assert s.life.stop.cut_short
    s.life.stop_over()
    assert s.life.stop_begins(30.0, STOP_TIMEOUT) == STOP_TIMEOUT  # a stop of its own


def test_a_task_killed_at_a_restarts_end_is_no_final_error() -> None:
    s = Script()
    s.ready()
    s.do(s.life.tasks_overran(["startup task 1 (x)"], STOP_TIMEOUT))
    assert s.life.last_error is None and s.life.stop.overruns == 1
    s.do(s.life.stop_asked("stop requested"))
    assert not s.life.stop.cut_short  # the restart's overrun is not the final stop's


def test_the_host_reports_its_own_overrun_just_inside_the_deadline() -> None:
    s = Script()
    s.ready()
    s.do(s.life.stop_asked("stop requested"))
    s.stop_host()
    text = "stopping handlers and on_stop did not finish within stop_timeout (2s)\n"
    assert s.says("error", where="on_stop", traceback=text, timed_out=True) == [
        HEARD, Log("error", "role_error", {"where": "on_stop", "error": text.strip()})]
    # Its exit not yet seen at the deadline (a loaded machine): killed all the same, and
    # what it said overran is kept, counted once.
    assert s.do(s.life.stop_overdue(100, STOP_TIMEOUT))[-1] == Kill(HOST)
    s.exited(-9, "killed by SIGKILL")
    assert s.life.last_error == f"on_stop: {text.strip()}" and s.life.stop.cut_short
    assert s.life.stop.overruns == 1


def test_an_agent_updates_stop_ends_with_its_host() -> None:
    s = Script()
    s.ready()
    s.at(10.0).stop_host("agent-update: walk")
    assert s.life.stop_by == 10.0 + STOP_TIMEOUT
    s.boot("agent-update: walk")  # its tasks done, they are not run again
    s.started(pid=101)  # the boot's host: the last host's stop is over
    assert s.life.stop_by is None


@pytest.mark.parametrize("tasks_ended", [False, True])
def test_a_forced_stop_kills_now_and_keeps_the_stops_reason(tasks_ended: bool) -> None:
    s = Script()
    s.ready()
    s.do(s.life.stop_asked("SIGTERM"))
    s.do(s.life.host_must_stop(None))
    assert s.do(s.life.force("SIGINT", tasks_ended)) == [
        Interrupt(), *([Kill(TASKS)] if tasks_ended else []), Kill(HOST)]
    assert s.life.forced and s.life.stop_reason == "SIGTERM"
    assert s.do(s.life.drained("SIGTERM", 1.0, STOP_TIMEOUT)) == [Kill(HOST)]  # no `stop`
    s.exited(-9, "killed by SIGKILL")
    assert s.over() == Next(After.STOP, "SIGTERM") and s.life.stop.cut_short


def test_a_crash_recycles_after_the_back_off_without_a_stop() -> None:
    s = Script()
    s.ready()
    assert s.at(4.0).exited(1, "exited with 1") == [
        Log("info", "host_exited", {"pid": 100, "outcome": "exited with 1"})]
    assert s.life.last_error == "host exited with 1"
    assert s.over() == Next(After.RECYCLE, "host exited with 1", (
        Enter(S.RECYCLING, "host exited with 1; next try in 1s"),), 1.0)
    assert s.life.state is S.RECYCLING and s.life.next_try == 5.0
    assert not [a for a in s.sent if isinstance(a, Send)]  # no `stopping`, no on_stop


def test_the_errors_of_a_crash_loop_and_its_back_off() -> None:
    s = Script()
    delays = []
    for n in range(5):
        s.at(10.0 * n).boot()
        s.started()
        s.says("error", where="on_start", traceback="Traceback...\nRuntimeError: boom\n")
        s.exited(1, "exited with 1")
        assert s.life.last_error == "on_start: RuntimeError: boom"  # its own, not the exit
        after = s.over()
        assert after.reason == "on_start: RuntimeError: boom"
        delays.append(after.delay)
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0]


def test_a_crash_after_a_stable_run_restarts_at_once() -> None:
    s = Script()
    s.ready()
    s.at(100.0).exited(1, "exited with 1")
    after = s.over()
    assert after.delay == 0.0 and after.actions == (
        Enter(S.RECYCLING, "host exited with 1; next try in 0s"),)


def test_on_start_false_recycles_with_its_reason_and_no_error() -> None:
    s = Script()
    s.boot()
    s.started()
    assert s.says("recycle", reason="on_start returned False") == [HEARD]  # not graceful
    s.exited(75, "exited with 75 (recycle)")
    assert s.life.last_error is None
    assert s.over().reason == "on_start returned False"


def test_a_recycle_the_role_asks_for_is_a_graceful_stop() -> None:
    s = Script()
    s.ready()
    assert s.says("recycle", reason="request_recycle() called", graceful=True) == [
        HEARD, Interrupt(recycle=True)]
    assert s.stop_host() == [Send({"type": "stop", "reason": "request_recycle() called"}),
                             Schedule(STOP, STOP_TIMEOUT)]
    s.exited(75, "exited with 75 (recycle)")
    after = s.over()
    assert (after.what, after.reason) == (After.RECYCLE, "request_recycle() called")


def test_a_silent_host_leaves_rotation_until_heard_then_is_killed() -> None:
    s = Script()
    s.at(1.0).ready()
    assert s.life.back
    # Its first missed heartbeat: out of rotation (not back), in the same state.
    assert s.at(4.0).do(s.life.heartbeat_missed()) == [
        Log("warning", "host_silent", {"silent_for": 3.0}), Rotate(),
        Schedule(SILENT, (UNRESPONSIVE - MISSED) * HEARTBEAT_INTERVAL)]
    assert (s.life.state, s.life.back, s.life.silent) == (
        S.READY, False, "no heartbeat for 3.0s")
    assert s.life.why_not_back({}) == "out of rotation: silent: no heartbeat for 3.0s"
    # Heard again: back, in the same boot.
    assert s.at(5.0).says("heartbeat") == [HEARD, Log("info", "host_heard", {}), Rotate(),
                                           Sample()]
    assert s.life.back and s.life.silent is None and s.life.back_since is not None
    # Silent again, for good this time: killed, and it recycles.
    s.at(8.0).do(s.life.heartbeat_missed())
    assert s.at(35.0).do(s.life.heartbeat_missed()) == [
        Log("error", "host_unresponsive", {"silent_for": 30.0}), Kill(HOST)]
    s.exited(-9, "killed by SIGKILL")
    assert s.life.last_error == "host unresponsive: silent for 30s"
    assert s.over().what is After.RECYCLE
    s.boot()  # a new boot is heard
    assert s.life.silent is None


def test_the_ready_deadline_fails_the_boot_where_it_was() -> None:
    s = Script(deadline=5.0)
    s.boot()
    assert s.at(5.0).do(s.life.deadline_missed(["startup task 1 (sleep 600)"], {})) == [
        Log("error", "ready_deadline_missed", {"state": "bootstrapping"}),
        Kill(TASKS), Kill(HOST)]
    reason = ("waiting for host: not ready within the ready deadline (5s); it was "
              "bootstrapping, running startup task 1 (sleep 600)")
    assert s.life.last_error == reason
    assert s.over() == Next(After.FAIL, reason, (Enter(S.FAILED, reason),))
    assert s.life.state is S.FAILED and s.life.settled


def test_a_deadline_spent_by_earlier_boots_is_missed_at_once() -> None:
    s = Script(deadline=5.0)
    s.boot()
    s.started()
    s.at(2.0).exited(1, "exited with 1")
    s.over()
    (expired,) = s.at(6.0).boot()  # the adapter carries out a delay of 0 or less now
    assert expired.timer == READY_DEADLINE and expired.delay == -1.0


def test_an_operation_takes_the_host_down_and_boots_at_once() -> None:
    s = Script()
    s.ready()
    assert s.stop_host("restart: host-os walk")[0] == Send(
        {"type": "stop", "reason": "restart: host-os walk"})
    s.exited(0, "exited with 0 (stopped)")
    assert s.over(operation_pending=True) == Next(After.OPERATION)
    assert not s.life.ends_operation(started=False)  # it has not begun yet
    s.life.operation_begins()
    s.boot("restart: host-os walk")
    s.started(101)
    s.says("state", state="ready")
    assert s.life.ends_operation(started=True)


def test_an_instance_stopped_before_its_operation_began_ends_it() -> None:
    s = Script()
    s.do([Enter(S.STOPPED, "stopped before it started")])
    assert s.life.ends_operation(started=False)


# The disk table (docs/concepts.md, "Disks: what each event keeps"): the folders, whether
# the startup tasks run again, and whether the host is stopped gracefully first.

APP_V1, APP_V2 = "v1", "v2"
# event: (resources kept, clean_on_recycle resources kept, os kept, app)
DISKS = {
    Maintenance.RECYCLE: (True, False, True, "kept"),
    Maintenance.RESTART: (True, False, True, "re-deployed"),
    Maintenance.REIMAGE: (True, False, False, "re-deployed"),
    Maintenance.REBUILD: (False, False, False, "re-deployed"),
    Maintenance.AGENT_UPDATE: (True, True, True, "kept"),
    Maintenance.DEPLOY: (True, True, True, "new version"),
}


def disks_of(tmp_path: Path, version: str) -> tuple[Disks, definition.Role]:
    app = tmp_path / version
    app.mkdir(exist_ok=True)
    (app / "role.py").write_text(version)
    parsed = definition.parse({"service": {"name": "s"}, "roles": {"web": {
        "entry_point": "role:Role", "app": str(app),
        "local_resources": {"keep": {"clean_on_recycle": False}, "scratch": {}}}}},
        tmp_path / "rolehost.toml")
    return Disks(tmp_path / "instance"), parsed.roles["web"]


@pytest.mark.parametrize("event", DISKS, ids=[e.value for e in DISKS])
def test_each_event_does_to_the_disks_what_the_table_says(tmp_path: Path,
                                                          event: Maintenance) -> None:
    disks, role = disks_of(tmp_path, APP_V1)
    apply(Maintenance.START, disks, role, tmp_path)
    for folder in (disks.resource("keep"), disks.resource("scratch"), disks.os, disks.app):
        (folder / "mark").write_text("before")
    if event is Maintenance.DEPLOY:
        _, role = disks_of(tmp_path, APP_V2)
    apply(event, disks, role, tmp_path)
    resources, clean, os_kept, app = DISKS[event]
    assert (disks.resource("keep") / "mark").exists() is resources
    assert (disks.resource("scratch") / "mark").exists() is clean
    assert (disks.os / "mark").exists() is os_kept
    assert (disks.app / "mark").exists() is (app == "kept")
    assert (disks.app / "role.py").read_text() == (APP_V2 if app == "new version" else APP_V1)
    assert event.reruns_tasks is (event is not Maintenance.AGENT_UPDATE)


@pytest.mark.parametrize("event", [e for e in DISKS if e is not Maintenance.RECYCLE],
                         ids=[e.value for e in DISKS if e is not Maintenance.RECYCLE])
def test_each_operation_stops_the_host_gracefully_first(event: Maintenance) -> None:
    s = Script()
    s.ready()
    actions = s.stop_host(f"{event.value}: requested")
    assert actions[0] == Send({"type": "stop", "reason": f"{event.value}: requested"})


def test_a_recycle_stops_gracefully_unless_it_crashed() -> None:
    """The table's recycle row: `stopping` and on_stop run for request_recycle() and a
    returned run() (the graceful recycle above), not for a crash."""
    crashed, asked = Script(), Script()
    crashed.ready()
    crashed.exited(1, "exited with 1")
    assert crashed.over().what is After.RECYCLE
    assert not [a for a in crashed.sent if isinstance(a, Send)]
    asked.ready()
    asked.says("recycle", reason="run() returned", graceful=True)
    asked.stop_host()
    asked.exited(75, "exited with 75 (recycle)")
    assert asked.over().what is After.RECYCLE
    assert Send({"type": "stop", "reason": "run() returned"}) in asked.sent


def test_a_host_over_max_memory_is_recycled_gracefully_once() -> None:
    s = Script()
    s.ready()
    assert s.do(s.life.memory_measured(100 * 2**20, 200 * 2**20, "200MB")) == []
    assert s.do(s.life.memory_measured(300 * 2**20, None, None)) == []  # no max_memory
    assert s.do(s.life.memory_measured(300 * 2**20, 200 * 2**20, "200MB")) == [
        Log("warning", "memory_recycle", {"rss_mb": 300.0, "max_memory": "200MB"}),
        Interrupt(recycle=True)]
    reason = "max_memory: the host's processes use 300MB, over 200MB"
    assert s.life.last_error == reason
    assert s.do(s.life.memory_measured(400 * 2**20, 200 * 2**20, "200MB")) == []  # asked
    s.stop_host()
    s.exited(0, "exited with 0 (stopped)")
    assert (s.over().what, s.life.recycled_for) == (After.RECYCLE, reason)


def test_an_instance_back_at_time_zero_had_been_back() -> None:
    # back_since is a time, and 0.0 is one: "out of", not "not yet in", rotation.
    s = Script()
    s.at(0.0).ready()
    assert s.life.back_since == 0.0
    s.at(3.0).do(s.life.heartbeat_missed())
    assert s.life.why_not_back({}) == "out of rotation: silent: no heartbeat for 3.0s"

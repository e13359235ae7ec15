"""The lifecycle's rules, driven by scripted histories: no process, no event loop, no
clock but the times each step gives. The process-level tests of the same rules are in
test_lifecycle.py, test_rotation.py and faults/."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from rolehost.definition import Endpoint
from rolehost.fabric.lifecycle import (
    RUNNING,
    SETTLED,
    TRANSITIONS,
    Backoff,
    IllegalTransition,
    Lifecycle,
    ProbeResult,
    ReadyDeadline,
    State,
    StopOutcome,
    check_transition,
    is_back,
    settled,
)

S = State

# A boot as the platform runs it, then each way it can end, as (state, ...) paths that
# every instance must be able to take.
HISTORIES = {
    "a boot to ready": [S.CREATED, S.BOOTSTRAPPING, S.STARTING, S.READY],
    "busy, then ready": [S.CREATED, S.BOOTSTRAPPING, S.STARTING, S.BUSY, S.READY, S.BUSY,
                         S.READY],
    "a graceful stop": [S.CREATED, S.BOOTSTRAPPING, S.STARTING, S.READY, S.STOPPING,
                        S.STOPPED],
    "a crash, back-off, a new boot": [S.CREATED, S.BOOTSTRAPPING, S.STARTING, S.READY,
                                      S.RECYCLING, S.BOOTSTRAPPING],
    "a restart (stop, then boot)": [S.READY, S.STOPPING, S.BOOTSTRAPPING, S.STARTING,
                                    S.READY],
    "a failed startup task": [S.CREATED, S.BOOTSTRAPPING, S.RECYCLING, S.BOOTSTRAPPING],
    "the deadline missed in a task": [S.BOOTSTRAPPING, S.FAILED, S.BOOTSTRAPPING],
    "the deadline missed in on_start": [S.STARTING, S.FAILED, S.STOPPED],
    "ready, never in rotation": [S.STARTING, S.READY, S.FAILED],
    "stopped before it started": [S.CREATED, S.STOPPED],
    "started again after a stop": [S.STOPPED, S.BOOTSTRAPPING],
}


@pytest.mark.parametrize("history", HISTORIES.values(), ids=HISTORIES.keys())
def test_every_history_of_the_platform_is_a_path_of_transitions(history: list[State]) -> None:
    for old, new in itertools.pairwise(history):
        check_transition("web_IN_0", old, new)


@pytest.mark.parametrize(("old", "new"), [
    (S.CREATED, S.READY),  # never ready without a boot
    (S.RECYCLING, S.READY),  # a recycle boots again first
    (S.STOPPED, S.READY),
    (S.FAILED, S.READY),  # failed stays failed until an operation boots it
    (S.READY, S.STARTING),
    (S.STOPPED, S.STOPPING),
])
def test_a_transition_the_lifecycle_has_not_is_refused(old: State, new: State) -> None:
    with pytest.raises(IllegalTransition, match=f"web_IN_0: no transition {old} -> {new}"):
        check_transition("web_IN_0", old, new)


def test_the_table_is_closed_and_every_state_can_stop() -> None:
    assert set(TRANSITIONS) == set(State)
    for state, targets in TRANSITIONS.items():
        assert targets <= set(State)
        if state is not S.STOPPED:
            assert S.STOPPED in targets or S.STOPPING in targets, state
    assert {S.STARTING, S.BUSY, S.READY} == RUNNING
    assert S.READY in SETTLED and S.BUSY not in SETTLED


def test_back_is_ready_and_in_rotation_on_every_endpoint() -> None:
    assert is_back(S.READY, [])  # no input endpoint: ready is back
    assert is_back(S.READY, [True, True])
    assert not is_back(S.READY, [True, False])  # one endpoint's probe still failing
    assert not is_back(S.BUSY, [True])  # ignore_status keeps it in rotation: not ready
    assert not is_back(S.STARTING, [])


@pytest.mark.parametrize(("state", "back", "over"), [
    (S.READY, True, True),
    (S.READY, False, False),  # ready, not yet in rotation: the deadline decides
    (S.FAILED, False, True),
    (S.RECYCLING, False, True),
    (S.STOPPED, False, True),
    (S.BUSY, False, False),
    (S.STARTING, False, False),
    (S.BOOTSTRAPPING, False, False),
    (S.STOPPING, False, False),
])
def test_an_operation_is_over_once_back_or_ended(state: State, back: bool, over: bool) -> None:
    assert settled(state, back) is over


def test_backoff_doubles_up_to_its_cap_and_resets_after_a_stable_run() -> None:
    backoff = Backoff(initial=1.0, maximum=5.0, stable_after=60.0)
    # Crashes at t=10, 11, ...: ready for a second each time, never stable.
    delays = [backoff.next_delay(now=10.0 + n, ready_since=9.5 + n) for n in range(5)]
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert backoff.failures == 5
    # Ready for 60 s before the next crash: not a loop, no wait, and the count starts over.
    assert backoff.next_delay(now=200.0, ready_since=140.0) == 0.0
    assert backoff.failures == 0
    assert backoff.next_delay(now=201.0, ready_since=None) == 1.0  # never ready: a failure


def test_an_operation_resets_the_backoff() -> None:
    backoff = Backoff(initial=1.0, maximum=300.0, stable_after=60.0)
    for n in range(4):
        backoff.next_delay(now=float(n), ready_since=None)
    backoff.reset()
    assert backoff.next_delay(now=10.0, ready_since=None) == 1.0


def test_the_boots_of_a_crash_loop_share_one_ready_deadline() -> None:
    deadline = ReadyDeadline(seconds=30.0)
    assert deadline.begin_boot(now=100.0) == 30.0
    assert deadline.begin_boot(now=110.0) == 20.0  # the second boot gets what is left
    assert deadline.begin_boot(now=131.0) == -1.0  # spent: missed at once
    assert deadline.missed("bootstrapping", "on_start: boom") == (
        "waiting for host: not ready within the ready deadline (30s) in 3 boots; it was "
        "bootstrapping; last error: on_start: boom")


def test_a_deadline_met_or_an_operation_starts_a_fresh_one() -> None:
    deadline = ReadyDeadline(seconds=30.0)
    deadline.begin_boot(now=0.0)
    deadline.clear()  # back in rotation at some point
    assert deadline.begin_boot(now=500.0) == 30.0
    assert deadline.missed("ready, not yet in rotation: http: probe failing", "") == (
        "waiting for host: not ready within the ready deadline (30s); it was ready, not "
        "yet in rotation: http: probe failing")


def test_a_stop_is_cut_short_by_its_own_overrun_only() -> None:
    outcome = StopOutcome()
    outcome.overran()  # a restart's on_stop overran, long before the final stop
    assert not outcome.cut_short
    outcome.final_stop_begins()
    assert not outcome.cut_short
    outcome.final_stop_begins()  # asked twice (a second `stop`): counted from the first
    outcome.overran()
    assert outcome.cut_short and outcome.forced is None


def test_a_forced_stop_is_cut_short_and_keeps_its_first_reason() -> None:
    outcome = StopOutcome()
    outcome.force("SIGINT")
    outcome.force("SIGTERM")
    assert outcome.cut_short and outcome.forced == "SIGINT"


def test_an_instance_changes_state_only_along_the_table(tmp_path: Path) -> None:
    """`Instance._set`, the one place a state changes, holds to the table: a bug that
    asks for a transition the lifecycle has not is refused, and the state stays."""
    from rolehost import definition
    from rolehost.fabric.deployment import Deployment
    from rolehost.fabric.instance import Instance

    parsed = definition.parse({"service": {"name": "s"},
                               "roles": {"web": {"entry_point": "m:C", "app": "."}}},
                              tmp_path / "rolehost.toml")
    deployment = Deployment.prepare(parsed.service, tmp_path, None)
    instance = Instance(deployment, "web", parsed.roles["web"], 0)
    try:
        with pytest.raises(IllegalTransition):
            instance._set(S.READY)
        assert instance.state is S.CREATED
        instance._set(S.STOPPED, "stopped before it started")
        assert (instance.state, instance.reason) == (S.STOPPED, "stopped before it started")
    finally:
        instance.output.close()


# `Lifecycle`: one instance's state, fed the events of a history with their times.

def endpoint(probe: bool = True, ignore_status: bool = False, healthy: int = 2) -> Endpoint:
    return Endpoint.model_validate({
        "port": 8080, "ignore_status": ignore_status,
        **({"probe": {"path": "/healthz", "healthy": healthy}} if probe else {})})


def lifecycle(deadline: float = 30.0) -> Lifecycle:
    return Lifecycle("web_IN_0", Backoff(1.0, 60.0, 60.0), ReadyDeadline(deadline), since=0.0)


def boot(life: Lifecycle, now: float) -> float:
    """A boot up to `starting`, as the adapter runs one: the deadline's seconds left."""
    life.boot_begins(now)
    life.change(S.BOOTSTRAPPING, "boot", now)
    left = life.deadline_starts(now)
    life.change(S.STARTING, "host started", now)
    return left


def test_a_probed_instance_is_back_once_the_probe_lets_it_in() -> None:
    life, http = lifecycle(), {"http": endpoint()}
    boot(life, 0.0)
    assert life.reported(S.READY) is S.READY
    life.change(S.READY, "", 1.0)
    assert not life.update_back(http, 1.0) and not life.back and not life.settled
    assert life.rotation("http", http["http"]) == (False, "probe failing: no probe result yet")
    life.probes["http"] = ProbeResult(False, "HTTP 503", 1)
    assert life.why_not_back(http) == (
        "not yet in rotation: http: probe failing (1/2 healthy): HTTP 503")
    life.probes["http"] = ProbeResult(True, "HTTP 200", 2)
    assert life.update_back(http, 4.0) and life.back and life.settled
    assert (life.ready_since, life.back_since) == (1.0, 4.0)
    assert life.deadline.unready_since is None  # met: the next boot gets a fresh one
    # The probe fails later: out of rotation, not back, and it says it was back before.
    life.probes["http"] = ProbeResult(False, "HTTP 500", 0)
    assert life.update_back(http, 9.0) and not life.back
    assert life.why_not_back(http).startswith("out of rotation: http: probe failing (0/2")
    assert life.back_since == 4.0


def test_busy_is_not_back_even_where_the_endpoint_ignores_status() -> None:
    life = lifecycle()
    served = {"http": endpoint(probe=False, ignore_status=True)}
    boot(life, 0.0)
    life.change(S.BUSY, "a status check reported busy", 1.0)
    assert life.rotation("http", served["http"]) == (True, "")  # it serves all the same
    assert not life.update_back(served, 1.0) and not life.back
    assert life.why_not_back(served) == "busy"
    life.change(S.READY, "", 2.0)
    assert life.update_back(served, 2.0) and life.back


def test_a_drain_takes_the_instance_out_before_it_stops() -> None:
    life, http = lifecycle(), {"http": endpoint(probe=False)}
    boot(life, 0.0)
    life.change(S.READY, "", 1.0)
    assert life.update_back(http, 1.0)
    life.draining = "restart: requested"
    assert life.rotation("http", http["http"]) == (False, "draining: restart: requested")
    assert life.update_back(http, 2.0) and not life.back
    assert life.reported(S.STOPPING) is S.STOPPING
    life.change(S.STOPPING, "restart: requested", 2.0)
    life.change(S.STOPPED, "stopped", 3.0)
    assert life.reported(S.READY) is None  # a late report of a host that ran
    assert life.settled


def test_a_silent_host_is_out_of_rotation_until_heard_again() -> None:
    life, http = lifecycle(), {"http": endpoint(probe=False)}
    boot(life, 0.0)
    life.change(S.READY, "", 1.0)
    assert life.update_back(http, 1.0)
    life.silent = "no heartbeat for 3.0s"  # a heartbeat missed (`heartbeat_missed`)
    assert life.rotation("http", http["http"]) == (False, "silent: no heartbeat for 3.0s")
    assert life.update_back(http, 4.0) and not life.back and life.state is S.READY
    assert life.why_not_back(http) == "out of rotation: http: silent: no heartbeat for 3.0s"
    life.silent = None  # heard again: back, in the same boot
    assert life.update_back(http, 5.0) and life.back and life.back_since == 1.0
    life.silent = "no heartbeat for 3.0s"  # with no endpoint (run-instance): not back
    assert life.update_back({}, 5.5) and not life.back
    assert life.why_not_back({}) == "out of rotation: silent: no heartbeat for 3.0s"
    life.silent = None
    assert life.update_back({}, 5.7) and life.back
    life.silent = "no heartbeat for 3.0s"
    life.change(S.RECYCLING, "host unresponsive: silent for 30s", 6.0)
    boot(life, 7.0)  # a new boot is not silent
    assert life.silent is None


def test_a_crash_loop_shares_one_deadline_and_backs_off() -> None:
    life = lifecycle(deadline=10.0)
    delays = []
    for n in range(3):  # on_start raises, three boots 3 s apart
        left = boot(life, 3.0 * n)
        assert left == 10.0 - 3.0 * n
        life.change(S.RECYCLING, "on_start: RuntimeError", 3.0 * n + 0.5)
        assert life.settled  # an operation waiting on it is over: it did not come back
        delays.append(life.boot_ended(3.0 * n + 0.5))
    assert delays == [1.0, 2.0, 4.0]
    assert boot(life, 11.0) == -1.0  # the fourth boot: missed at once
    life.change(S.FAILED, life.deadline.missed("starting", "on_start: RuntimeError"), 11.0)
    assert "in 4 boots" in life.reason
    life.operation_begins()  # `rolehost restart`: a fresh deadline and back-off
    assert boot(life, 12.0) == 10.0 and life.boot_ended(13.0) == 1.0


def test_a_boot_starts_with_nothing_of_the_last_one() -> None:
    life, http = lifecycle(), {"http": endpoint()}
    boot(life, 0.0)
    life.change(S.READY, "", 1.0)
    life.probes["http"] = ProbeResult(True, "HTTP 200", 2)
    life.update_back(http, 1.0)
    life.draining = "restart"
    life.change(S.STOPPING, "restart", 2.0)
    life.update_back(http, 2.0)
    boot(life, 3.0)
    assert (life.ready_since, life.back_since, life.draining, life.probes) == (
        None, None, None, {})
    assert life.reason == "host started" and life.since == 3.0


def test_ready_but_never_in_rotation_ends_failed_and_that_settles_it() -> None:
    life, http = lifecycle(deadline=5.0), {"http": endpoint()}
    boot(life, 0.0)
    life.change(S.READY, "", 1.0)
    life.probes["http"] = ProbeResult(False, "HTTP 503", 0)
    assert not life.settled
    reason = life.deadline.missed(f"ready, {life.why_not_back(http)}", "")
    life.change(S.FAILED, reason, 5.0)
    assert life.settled and life.state is S.FAILED
    assert life.reason.endswith("it was ready, not yet in rotation: http: probe failing "
                                "(0/2 healthy): HTTP 503")


def test_a_healthy_probe_of_a_healthy_endpoint_is_not_news() -> None:
    """The steady state of every served instance: a result per probe interval, none of
    which can change rotation. Only a change of health, or any failing result (its
    reason may change), asks for the rotation to be worked out again."""
    life = lifecycle()
    assert life.probed("http", ProbeResult(False, "connection refused", 0))
    assert life.probed("http", ProbeResult(False, "HTTP 503", 0))  # why_out changes
    assert life.probed("http", ProbeResult(True, "HTTP 200", 1))  # in
    assert not life.probed("http", ProbeResult(True, "HTTP 200", 2))
    assert life.probes["http"].passes == 2  # kept all the same: status shows it
    assert life.probed("http", ProbeResult(False, "HTTP 500", 0))  # out


def test_a_stop_has_one_deadline_for_its_host_and_its_tasks() -> None:
    life = lifecycle()
    assert life.stop_begins(10.0, stop_timeout=2.0) == 2.0  # the host is sent `stop`
    assert life.stop_begins(11.5, stop_timeout=2.0) == 0.5  # its tasks get what is left
    assert life.stop_overran(2.0) == "did not stop within stop_timeout (2s); killed"
    assert life.run_error == "did not stop within stop_timeout (2s); killed"
    assert life.stop.overruns == 1
    life.stop_over()
    assert life.stop_begins(20.0, stop_timeout=2.0) == 2.0  # the next stop's own

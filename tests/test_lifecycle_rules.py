"""The lifecycle's rules, driven by scripted histories: no process, no event loop, no
clock but the times each step gives. The process-level tests of the same rules are in
test_lifecycle.py, test_rotation.py and faults/."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from rolehost.lifecycle import (
    RUNNING,
    SETTLED,
    TRANSITIONS,
    Backoff,
    IllegalTransition,
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
    from rolehost.instance import Deployment, Instance

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

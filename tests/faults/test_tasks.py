"""Fault 10: startup tasks that fail, hang, crash in the background, or hold a stop."""

from __future__ import annotations

import json
import os
import signal
import time

from rolehost.testing import wait_until
from support.faults import FAST, Bystander, instance_pids, role, state_events, wait_gone, wait_pids
from support.roles import IDLE
from support.service import MakeService

ROLE = role(IDLE)


def only_instance_0(script: str, **options: str) -> str:
    """A task that runs `script` in instance 0 and does nothing in instance 1."""
    command = ["sh", "-c", f'[ "$ROLEHOST_INDEX" != 0 ] && exit 0; {script}']
    lines = ["[[roles.web.startup_tasks]]",
             f"command = {json.dumps(command)}",  # a JSON string is a TOML basic string
             *(f"{key} = {value}" for key, value in options.items())]
    return "\n".join(lines) + "\n"


def test_simple_task_exits_non_zero(make_service: MakeService) -> None:
    service = make_service(ROLE, instances=2, service=FAST, extra=only_instance_0(
        "echo loading; echo no such table >&2; exit 3"))
    with service.harness() as h:
        bystander = Bystander(h)
        row = h.wait_state("web/0", "recycling", 10)
        assert row["last_error"].endswith("exited with 3: no such table")
        assert row["pid"] is None  # the host never started
        (task,) = row["tasks"]
        assert task["state"] == "failed" and task["exit_code"] == 3
        assert task["tail"] == ["loading", "no such table"]
        assert "Z task 1 | no such table\n" in h.logs("web/0")
        wait_until(lambda: len(state_events(h, "web_IN_0", "recycling")) >= 3, 10,
                   "retries with back-off")
        assert not state_events(h, "web_IN_0", "starting")  # no host, ever
        bystander.check()


def test_simple_task_hangs_past_its_timeout(make_service: MakeService) -> None:
    service = make_service(ROLE, instances=2, service=FAST, extra=only_instance_0(
        "trap '' TERM; sleep 600 & wait", timeout='"500ms"'))
    with service.harness() as h:
        bystander = Bystander(h)
        hung = wait_pids(h, "web/0", 2)  # the shell and its sleep
        row = h.wait_state("web/0", "recycling", 10)
        assert row["last_error"].endswith("timed out after 0.5s: no output")
        assert row["tasks"][0]["state"] == "failed"
        assert row["tasks"][0]["reason"] == "timed out after 0.5s"
        wait_gone(hung)
        bystander.check()


def test_background_task_crashes(make_service: MakeService) -> None:
    service = make_service(ROLE, instances=2, service=FAST, extra=only_instance_0(
        "sleep 0.3; echo lost the queue >&2; kill -SEGV $$", type='"background"'))
    with service.harness() as h:
        bystander = Bystander(h)
        row = h.wait_state("web/0", "ready", 30)
        event = h.wait_event(lambda e: e["event"] == "task_failed", 10, "the task to fail")
        assert event["instance"] == "web_IN_0" and event["type"] == "background"
        assert event["reason"] == "killed by SIGSEGV" and event["tail"] == ["lost the queue"]
        # the instance is not affected: a background task is the role's own business
        after = h.instance("web/0")
        assert (after["state"], after["pid"], after["restarts"]) == ("ready", row["pid"], 0)
        assert after["tasks"][0]["state"] == "failed"
        bystander.check()


def test_foreground_task_never_exits_during_a_stop(make_service: MakeService) -> None:
    service = make_service(ROLE, instances=2, service=FAST, role={"stop_timeout": "1s"},
                           extra=only_instance_0("trap '' TERM; while :; do sleep 0.1; done",
                                                 type='"foreground"'))
    with service.harness() as h:
        bystander = Bystander(h)
        h.wait_state("web/0", "ready", 30)
        task = wait_pids(h, "web/0", 2) - {h.instance("web/0")["pid"]}
        began = time.monotonic()
        h.restart("web/0")  # the boot ends: the foreground task holds it up to stop_timeout
        took = time.monotonic() - began
        assert 1 <= took < 1 + 4, f"the restart took {took:.1f}s with stop_timeout 1s"
        killed = h.wait_event(lambda e: e["event"] == "foreground_task_killed", 5)
        assert killed["instance"] == "web_IN_0" and killed["waited"] == 1
        wait_gone(task)
        assert not task & instance_pids(h, "web/0")
        bystander.check()


HOLDING = "trap '' TERM; while :; do sleep 0.1; done"  # a foreground task that holds a stop


def test_a_foreground_task_holding_a_restart_is_not_the_next_boots_deadline(
        make_service: MakeService) -> None:
    """The wait for the last boot's foreground task (up to stop_timeout) does not count
    against the next boot's ready deadline. Before, the deadline passed in that wait, the
    boot went on to ready all the same, and the next exit of its host crashed the
    instance's supervision (`no transition ready -> failed`)."""
    service = make_service(ROLE, instances=2, service={**FAST, "ready_deadline": "2s"},
                           role={"stop_timeout": "3s"},
                           extra=only_instance_0(HOLDING, type='"foreground"'))
    with service.harness() as h:
        bystander = Bystander(h)
        h.wait_state("web/0", "ready", 30)
        h.restart("web/0")  # its end waits 3 s for the task: past a 2 s deadline
        row = h.instance("web/0")
        assert (row["state"], row["last_error"]) == ("ready", None)
        assert not any(e["event"] == "ready_deadline_missed" for e in h.events())
        os.kill(row["pid"], signal.SIGKILL)
        wait_until(lambda: h.instance("web/0")["pid"] not in (None, row["pid"])
                   and h.instance("web/0")["state"] == "ready", 20, "web/0 ready again")
        assert not any(e["event"] == "supervisor_crashed" for e in h.events())
        bystander.check()


def test_a_host_that_dies_leaves_rotation_before_its_foreground_tasks_end(
        make_service: MakeService) -> None:
    """A dead host's instance is recycling at once, not ready (and in rotation) while the
    end of its boot waits for a foreground task up to stop_timeout."""
    service = make_service(ROLE, instances=2, service=FAST, role={"stop_timeout": "8s"},
                           extra=only_instance_0(HOLDING, type='"foreground"'))
    with service.harness() as h:
        bystander = Bystander(h)
        row = h.wait_state("web/0", "ready", 30)
        killed = time.monotonic()
        os.kill(row["pid"], signal.SIGKILL)
        h.wait_state("web/0", "recycling", 5)
        assert time.monotonic() - killed < 3, "still ready while the task held the boot"
        h.wait_event(lambda e: e["event"] == "foreground_task_killed", 15)
        wait_until(lambda: h.instance("web/0")["state"] == "ready", 20, "web/0 ready again")
        bystander.check()


def test_a_foreground_task_killed_at_the_stop_cuts_the_stop_short(
        make_service: MakeService) -> None:
    """The controller's stop waits up to stop_timeout for a foreground task, then kills
    it half done: as for an on_stop that overran, `rolehost start` exits 3 and says so."""
    service = make_service(ROLE, service=FAST, role={"stop_timeout": "1s"},
                           extra=only_instance_0(HOLDING, type='"foreground"'))
    with service.harness() as h:
        h.wait_state("web/0", "ready", 30)
        h.signal_controller(signal.SIGTERM)
        assert h.wait_controller_exit(30) == 3
        assert "web_IN_0: foreground task 1 (" in h.run_dir.console_log.read_text()

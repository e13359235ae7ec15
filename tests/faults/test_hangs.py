"""Faults 5-7 and 6b: a role that hangs where a deadline applies, or will not hear signals."""

from __future__ import annotations

import os
import signal
import time

from rolehost.testing import LoadProbe, wait_until
from support.faults import (
    FAST,
    HANGING_ON_STOP,
    Bystander,
    endpoint,
    instance_pids,
    role,
    state_events,
    wait_gone,
    wait_pids,
)
from support.net import free_port, get
from support.service import MakeService


def test_on_start_hangs_past_the_ready_deadline(make_service: MakeService) -> None:
    service = make_service(role(
        """
        class Role(RoleEntryPoint):
            def on_start(self):
                if faulty():
                    self.child = subprocess.Popen(["sleep", "600"])
                    probe("on_start:hanging")
                    time.sleep(600)
                return True
        """), instances=2, service={**FAST, "ready_deadline": "2s"})
    with service.harness() as h:
        bystander = Bystander(h)
        service.wait_probe("on_start:hanging web_IN_0")
        old = wait_pids(h, "web/0", 2)
        row = h.wait_state("web/0", "failed", 10)
        assert row["reason"] == row["last_error"] == (
            "waiting for host: not ready within the ready deadline (2s); it was starting")
        assert row["pid"] is None and row["next_try"] is None
        wait_gone(old)
        (failed,) = state_events(h, "web_IN_0", "failed")
        assert failed["previous"] == "starting"
        assert any(e["event"] == "ready_deadline_missed" for e in h.events())
        assert service.count("on_start:hanging") == 1  # failed is final: no retry
        bystander.check()


def test_on_stop_hangs_past_stop_timeout(make_service: MakeService) -> None:
    service = make_service(role(HANGING_ON_STOP), instances=2, service=FAST,
                           role={"stop_timeout": "1s"})
    with service.harness() as h:
        bystander = Bystander(h)
        h.wait_state("web/0", "ready", 30)
        old = instance_pids(h, "web/0")
        began = time.monotonic()
        h.restart("web/0", wait=False)
        service.wait_probe("on_stop:hanging web_IN_0")
        wait_gone(old, timeout=10)
        ended = time.monotonic() - began
        assert ended < 1 + 3, f"the stop took {ended:.1f}s with stop_timeout 1s"
        row = h.wait_state("web/0", "ready", 30)  # and the restart carries on
        assert row["last_error"] == (
            "on_stop: stopping handlers and on_stop did not finish within stop_timeout (1s); "
            "the instance is terminated")
        assert "did not finish within stop_timeout (1s)" in h.logs("web/0")
        bystander.check()


def test_a_host_frozen_in_on_stop_is_killed_at_stop_timeout(make_service: MakeService) -> None:
    """The controller owns the stop's deadline: a host that cannot end its own stop
    (frozen whole, its own bound on the stop with it) is killed at stop_timeout, not
    later. Without the controller's deadline it would stay frozen for good."""
    service = make_service(role(
        """
        class Role(RoleEntryPoint):
            def on_stop(self):
                if faulty() and once("stop"):
                    probe("on_stop:freezing")
                    os.kill(os.getpid(), signal.SIGSTOP)
        """), instances=2, service=FAST, role={"stop_timeout": "1s"})
    with service.harness() as h:
        bystander = Bystander(h)
        h.wait_state("web/0", "ready", 30)
        old = instance_pids(h, "web/0")
        h.restart("web/0", wait=False)
        service.wait_probe("on_stop:freezing web_IN_0")
        frozen = time.monotonic()  # the stop was sent just before
        wait_gone(old, timeout=10, what="the frozen host")
        waited = time.monotonic() - frozen
        assert 0.5 < waited < 1 + 1.2, f"killed {waited:.1f}s into a stop_timeout of 1s"
        killed = h.wait_event(lambda e: e["event"] == "stop_timeout", 5)
        assert killed["instance"] == "web_IN_0" and killed["waited"] == 1
        row = h.wait_state("web/0", "ready", 30)  # and the restart carries on
        assert row["last_error"] == "did not stop within stop_timeout (1s); killed"
        bystander.check()


def test_role_ignoring_and_blocking_signals_still_stops(make_service: MakeService) -> None:
    service = make_service(role(
        """
        class Role(RoleEntryPoint):
            def on_start(self):
                if faulty():
                    signal.signal(signal.SIGTERM, signal.SIG_IGN)
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
                    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT,
                                                              signal.SIGHUP, signal.SIGUSR1})
                    # a child that inherits the blocked mask and ignores TERM itself too
                    self.child = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 600"])
                return True
            def on_stop(self):
                probe("on_stop")
        """), instances=2, service=FAST, role={"stop_timeout": "20s"})
    with service.harness() as h:
        bystander = Bystander(h)
        h.wait_state("web/0", "ready", 30)
        old = wait_pids(h, "web/0", 3)  # host, sh, sleep
        began = time.monotonic()
        h.restart("web/0")  # waits until ready again
        took = time.monotonic() - began
        # graceful through the channel, not cut by stop_timeout (20 s)
        assert took < 8, f"the restart took {took:.1f}s"
        assert service.probes().count("on_stop web_IN_0") == 1
        wait_gone(old)
        row = h.instance("web/0")
        assert row["state"] == "ready" and row["last_error"] is None
        stop = wait_until(lambda: [e for e in h.events() if e["event"] == "host_exited"
                                   and e["instance"] == "web_IN_0"], 5, "the host's exit")
        assert stop[0]["outcome"] == "exited with 0 (stopped)"
        bystander.check()
        h.stop(timeout=30)  # the controller's own stop, too, gets past the blocked signals
        assert service.probes().count("on_stop web_IN_0") == 2


def test_a_stopped_host_leaves_rotation_at_its_first_missed_heartbeat(
        make_service: MakeService) -> None:
    port = free_port()
    service = make_service(role("", web=True), instances=2, extra=endpoint(port),
                           service={**FAST, "heartbeat_interval": "400ms"})
    with service.harness() as h:
        bystander = Bystander(h)
        h.wait_ready(30)
        pid = h.instance("web/0")["pid"]
        with LoadProbe(f"http://127.0.0.1:{port}/", clients=4) as load:
            load.wait_requests(100)
            os.kill(pid, signal.SIGSTOP)
            began = time.monotonic()
            try:
                row = wait_until(lambda: r if not (r := h.instance("web/0"))["back"] else None,
                                 10, "web/0 to leave rotation")
                left = time.monotonic() - began
                # Silent for 1.5 intervals (0.6 s), give or take a busy machine; before, a
                # stopped host stayed in rotation for 30 s, and was then killed.
                assert left < 2.5, f"web/0 left rotation {left:.1f}s after SIGSTOP"
                assert (row["state"], row["pid"]) == ("ready", pid), row
                assert row["why_not_back"].startswith(
                    "out of rotation: http: silent: no heartbeat for "), row
                # The load's clients each wait on a request the frozen host took before it
                # left; new requests go to the other instance meanwhile.
                for _ in range(20):
                    assert get(port, timeout=5) == (200, b"web_IN_1")
            finally:
                os.kill(pid, signal.SIGCONT)
            h.wait_ready(10)
            load.wait_requests(load.requests + 100)
        # The requests the frozen host held when it stopped were answered once it went on.
        assert load.failures == [], load.report()
        row = h.instance("web/0")  # heard again: back in the same host, not recycled
        assert (row["state"], row["pid"], row["restarts"]) == ("ready", pid, 0), row
        names = [e["event"] for e in h.events() if e.get("instance") == "web_IN_0"]
        assert "host_silent" in names and "host_heard" in names, names
        assert "host_unresponsive" not in names
        bystander.check()

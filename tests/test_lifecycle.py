"""The lifecycle rules of docs/concepts.md, with a real controller and real host processes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from datetime import datetime

import pytest

from rolehost.testing import wait_until
from support.roles import HOLDS_ITS_STOP, IDLE, OVERRUNS_ITS_STOP
from support.service import MakeService

FAST = {"backoff_initial": "200ms", "backoff_max": "1s"}


def test_instances_reach_ready_with_identity(make_service: MakeService) -> None:
    service = make_service(
        """
        class Role(RoleEntryPoint):
            def on_start(self):
                me = RoleEnvironment.current_instance
                probe(f"start:{me.role}:{me.index}:{me.update_domain}:{RoleEnvironment.deployment_id}")
                return True
        """,
        instances=3,
    )
    with service.harness() as h:
        status = h.wait_ready(30)
        rows = {i["id"]: i for i in status["instances"]}
        assert sorted(rows) == ["web_IN_0", "web_IN_1", "web_IN_2"]
        for index in range(3):
            row = rows[f"web_IN_{index}"]
            assert row["role"] == "web" and row["index"] == index
            assert row["update_domain"] == index % 2
            assert row["state"] == "ready" and row["restarts"] == 0 and row["last_error"] is None
            assert isinstance(row["pid"], int) and datetime.fromisoformat(row["ready_since"])
            assert f"start:web:{index}:{index % 2}:{status['deployment_id']} web_IN_{index}" in (
                service.probes()
            )
        assert {p.pid for p in h.processes()} >= {r["pid"] for r in rows.values()}


def test_on_start_false_recycles_with_growing_backoff(make_service: MakeService) -> None:
    service = make_service(
        """
        class Role(RoleEntryPoint):
            def on_start(self):
                probe("on_start")
                return False
            def on_stop(self):
                probe("on_stop")
        """,
        service=FAST,
    )
    with service.harness() as h:
        wait_until(lambda: service.count("on_start") >= 5, 30, "five starts")
        recycles = [e for e in h.events() if e["event"] == "state" and e["state"] == "recycling"]
        delays = [float(re.search(r"next try in ([\d.]+)s", e["reason"])[1]) for e in recycles]
        assert delays[:4] == [0.2, 0.4, 0.8, 1.0]  # doubling from backoff_initial, capped
        assert "on_start returned False" in recycles[0]["reason"]
        row = h.instance("web/0")
        assert row["restarts"] >= 4 and row["attempt"] >= 4
        assert service.count("on_stop") == 0  # on_start False recycles without a stop


def test_on_start_raising_recycles_with_its_traceback(make_service: MakeService) -> None:
    service = make_service(
        """
        class Role(RoleEntryPoint):
            def on_start(self):
                raise RuntimeError("cache warm-up failed")
        """,
        service=FAST,
    )
    with service.harness() as h:
        row = h.wait_state("web/0", "recycling", 30)
        assert row["last_error"] == "on_start: RuntimeError: cache warm-up failed"
        assert "Traceback" in h.logs("web/0") and "cache warm-up failed" in h.logs("web/0")
        assert row["next_try"] is not None


def test_run_returning_recycles_gracefully(make_service: MakeService) -> None:
    service = make_service(
        """
        class Role(RoleEntryPoint):
            def on_start(self):
                RoleEnvironment.on_stopping(lambda: probe("stopping"))
                return True
            def run(self):
                probe("run")
                time.sleep(0.3)
            def on_stop(self):
                probe("on_stop")
        """,
        service=FAST,
    )
    with service.harness() as h:
        wait_until(lambda: service.count("run") >= 2, 30, "a second run")
        first = service.probes()[:3]
        assert first == ["run web_IN_0", "stopping web_IN_0", "on_stop web_IN_0"]
        states = [e["state"] for e in h.events() if e["event"] == "state"]
        assert states[:6] == ["bootstrapping", "starting", "ready", "stopping", "recycling",
                              "bootstrapping"]
        recycling = next(e for e in h.events() if e.get("state") == "recycling")
        assert recycling["reason"].startswith("run() returned")


def test_run_raising_recycles_without_stop(make_service: MakeService) -> None:
    service = make_service(
        """
        class Role(RoleEntryPoint):
            def on_start(self):
                RoleEnvironment.on_stopping(lambda: probe("stopping"))
                return True
            def run(self):
                probe("run")
                raise ValueError("poison message")
            def on_stop(self):
                probe("on_stop")
        """,
        service=FAST,
    )
    with service.harness() as h:
        wait_until(lambda: service.count("run") >= 2, 30, "a second run")
        assert service.count("stopping") == 0 and service.count("on_stop") == 0
        recycling = next(e for e in h.events() if e.get("state") == "recycling")
        assert "run: ValueError: poison message" in recycling["reason"]


def test_on_stop_past_stop_timeout_is_cut_short(make_service: MakeService) -> None:
    service = make_service(
        """
        class Role(RoleEntryPoint):
            def on_stop(self):
                probe("on_stop")
                time.sleep(600)
        """,
        role={"stop_timeout": "1s"},
    )
    with service.harness() as h:
        h.wait_ready(30)
        began = time.monotonic()
        h.stop(timeout=60)
        elapsed = time.monotonic() - began
        assert service.count("on_stop") == 1
        # Cut short, against on_stop's 600 s (a bound of 6 s measured the machine's pace).
        assert elapsed < 60, f"stop took {elapsed:.1f}s with stop_timeout 1s"
        log = h.logs("web/0")
        assert "did not finish within stop_timeout (1s)" in log


def test_host_ignoring_stop_is_killed_after_stop_timeout(make_service: MakeService) -> None:
    # The host process itself hangs (SIGSTOP): only the controller can end it.
    service = make_service(IDLE, role={"stop_timeout": "1s"})
    with service.harness() as h:
        h.wait_ready(30)
        h.kill("web/0", signal.SIGSTOP)
        h.stop(timeout=60)  # a frozen host never ends by itself: the stop's end is enough
        killed = h.run_dir.logs / "controller.log"
        assert '"stop_timeout"' in killed.read_text()


def test_ready_deadline_missed_marks_failed(make_service: MakeService) -> None:
    service = make_service(
        """
        class Role(RoleEntryPoint):
            def on_start(self):
                probe("on_start")
                time.sleep(600)
                return True
        """,
        service={"ready_deadline": "1500ms"},
    )
    with service.harness() as h:
        row = h.wait_state("web/0", "failed", 30)
        assert "ready deadline (1.5s)" in row["last_error"] and "waiting for host" in row["reason"]
        assert row["pid"] is None
        # the controller and its standby host, nothing of the instance
        wait_until(lambda: len(h.processes()) == 2, 10, "only the controller left")
        assert service.count("on_start") == 1  # failed is final: no retry


def test_async_role_runs_and_stop_cancels_run(make_service: MakeService) -> None:
    service = make_service(
        """
        class Role(RoleEntryPoint):
            async def on_start(self):
                await asyncio.sleep(0.01)
                RoleEnvironment.on_stopping(self.stopping)
                probe("on_start")
                return True
            async def stopping(self):
                probe("stopping")
            async def run(self):
                probe("run")
                try:
                    await asyncio.sleep(600)
                except asyncio.CancelledError:
                    await asyncio.sleep(0.3)  # cleanup that takes a while: on_stop waits
                    probe("cancelled")
                    raise
            async def on_stop(self):
                probe("on_stop")
        """
    )
    with service.harness() as h:
        h.wait_ready(30)
        service.wait_probe("run web_IN_0")
        h.stop()
        assert service.probes() == ["on_start web_IN_0", "run web_IN_0", "stopping web_IN_0",
                                    "cancelled web_IN_0", "on_stop web_IN_0"]


def test_request_recycle(make_service: MakeService) -> None:
    service = make_service(
        """
        class Role(RoleEntryPoint):
            def run(self):
                probe("run")
                if not os.path.exists(RoleEnvironment.get_setting("probe") + ".once"):
                    open(RoleEnvironment.get_setting("probe") + ".once", "w").close()
                    RoleEnvironment.request_recycle()
                RoleEnvironment.wait_for_stop()
            def on_stop(self):
                probe("on_stop")
        """,
        service=FAST,
    )
    with service.harness() as h:
        wait_until(lambda: service.count("run") == 2, 30, "the recycled instance to run")
        h.wait_ready(30)
        assert service.probes()[:3] == ["run web_IN_0", "on_stop web_IN_0", "run web_IN_0"]
        recycling = next(e for e in h.events() if e.get("state") == "recycling")
        assert recycling["reason"].startswith("request_recycle() called")


def test_a_stop_during_on_start_waits_for_it_before_on_stop(make_service: MakeService) -> None:
    """Lifecycle methods never overlap: a stop that comes during on_start waits for it to
    return (wait_for_stop() tells it to hurry), then runs `stopping` and on_stop. Before,
    on_stop ran beside on_start."""
    service = make_service(
        """
        class Role(RoleEntryPoint):
            def on_start(self):
                probe("on_start")
                RoleEnvironment.on_stopping(lambda: probe("stopping"))
                if RoleEnvironment.wait_for_stop(timeout=20):
                    time.sleep(0.5)  # the rest of a warm-up, cut short
                    probe("on_start-returns")
                return True
            def on_stop(self):
                probe("on_stop")
        """,
        service=FAST,
    )
    with service.harness() as h:
        service.wait_probe("on_start web_IN_0")
        h.restart("web/0", wait=False)
        service.wait_probe("on_stop web_IN_0")
        assert service.probes()[:4] == ["on_start web_IN_0", "on_start-returns web_IN_0",
                                        "stopping web_IN_0", "on_stop web_IN_0"]


def test_a_stop_during_an_on_start_that_does_not_return_is_bounded(
        make_service: MakeService) -> None:
    """An on_start that ignores the stop holds it up to stop_timeout; then the host is
    terminated, without on_stop (nothing had started), and the reason says so."""
    service = make_service(
        """
        class Role(RoleEntryPoint):
            def on_start(self):
                probe("on_start")
                if not os.path.exists(RoleEnvironment.get_setting("probe") + ".once"):
                    open(RoleEnvironment.get_setting("probe") + ".once", "w").close()
                    time.sleep(60)
                return True
            def on_stop(self):
                probe("on_stop")
        """,
        service=FAST, role={"stop_timeout": "1s"},
    )
    with service.harness() as h:
        service.wait_probe("on_start web_IN_0")
        began = time.monotonic()
        h.restart("web/0")
        assert time.monotonic() - began < 30  # cut short, against on_start's 60 s
        row = h.instance("web/0")
        assert row["last_error"].startswith(
            "on_stop: on_start did not return within stop_timeout (1s) of the stop")
        assert "on_stop web_IN_0" not in service.probes()


def test_crash_of_a_stable_instance_restarts_at_once(make_service: MakeService) -> None:
    service = make_service(
        IDLE,
        service={"stable_after": "500ms", "backoff_initial": "30s", "backoff_max": "60s"},
    )
    with service.harness() as h:
        h.wait_ready(30)
        time.sleep(0.6)  # be ready longer than stable_after: that is the condition under test
        old = h.kill("web/0")
        row = h.wait_replaced("web/0", old, 10)  # back-off would have been 30 s
        assert row["restarts"] == 1
        assert row["last_error"] == "host killed by SIGKILL"
        recycling = next(e for e in h.events() if e.get("state") == "recycling")
        assert "next try in 0s" in recycling["reason"]


def test_controller_sigterm_stops_every_instance_gracefully(make_service: MakeService) -> None:
    service = make_service(
        """
        class Role(RoleEntryPoint):
            def on_stop(self):
                time.sleep(0.2)
                probe("on_stop")
        """,
        instances=3,
    )
    with service.harness() as h:
        h.wait_ready(30)
        h.signal_controller(signal.SIGTERM)
        assert h.wait_controller_exit(30) == 0
        assert sorted(service.probes()) == [f"on_stop web_IN_{i}" for i in range(3)]
        # In parallel, not one after another: every stop began before any ended. Told by
        # the controller's order of events, not by a duration (6.5 s under load, for a
        # bound of 5 s meant to tell 0.2 s from 3 x 0.2 s).
        events = [json.loads(line) for line in
                  (h.run_dir.logs / "controller.log").read_text().splitlines()]
        states = [e["state"] for e in events if e["event"] == "state"]
        began = [n for n, state in enumerate(states) if state == "stopping"]
        ended = [n for n, state in enumerate(states) if state == "stopped"]
        assert len(began) == len(ended) == 3 and max(began) < min(ended), states


@pytest.mark.parametrize("overrun", ["host-bounds-it", "host-frozen"])
def test_a_controller_stop_cut_short_by_stop_timeout_exits_3(make_service: MakeService,
                                                             overrun: str) -> None:
    """`rolehost start` exited 0 though on_stop was killed half done; systemd, or whoever
    runs it, must see what run-instance's exit 3 tells: the cleanup may be incomplete.
    The host cuts on_stop short itself; a frozen host is killed by the supervisor."""
    service = make_service(OVERRUNS_ITS_STOP, role={"stop_timeout": "1s"},
                           settings={"overrun": overrun})
    with service.harness() as h:
        h.wait_ready(30)
        h.signal_controller(signal.SIGTERM)
        assert h.wait_controller_exit(30) == 3
        assert service.probes() == ["on_stop web_IN_0"]
        assert ("the stop was cut short; cleanup may be incomplete:\n"
                "  web_IN_0: ") in (
            h.run_dir.console_log.read_text())
        log = (h.run_dir.logs / "controller.log").read_text()
        assert '"event": "controller_stop_cut_short"' in log


def test_an_overrun_before_the_stop_is_not_the_stops(make_service: MakeService) -> None:
    """Only the stop's own overruns count: an instance restarted earlier, whose on_stop
    overran then, stops gracefully now, and the controller exits 0."""
    service = make_service("""
        class Role(RoleEntryPoint):
            def on_stop(self):
                probe("on_stop")
                if os.path.exists(RoleEnvironment.get_setting("probe") + ".slow"):
                    time.sleep(60)
        """, role={"stop_timeout": "1s"})
    slow = service.probe.with_name(service.probe.name + ".slow")
    slow.touch()
    with service.harness() as h:
        h.wait_ready(30)
        h.restart("web/0")
        assert "did not finish within stop_timeout" in (h.instance("web/0")["last_error"] or "")
        slow.unlink()
        h.signal_controller(signal.SIGTERM)
        assert h.wait_controller_exit(30) == 0
        assert service.count("on_stop") == 2


@pytest.mark.parametrize("during", ["on_stop", "foreground-task"])
def test_a_second_signal_ends_the_controllers_stop_at_once(make_service: MakeService,
                                                           during: str) -> None:
    """A second SIGTERM (or Ctrl-C) killed the hosts, but a foreground task still held
    the stop up to stop_timeout, and the controller exited 0. Now everything ends at
    once (hosts, their children, every task), nothing is left, and the exit is 3."""
    stop_timeout = 300.0  # what an unforced stop would wait for, as do the tasks' sleeps
    service = make_service(HOLDS_ITS_STOP, settings={"during": during},
                           role={"stop_timeout": f"{stop_timeout:g}s"},
        extra="""
        [[roles.web.startup_tasks]]
        command = ["sleep", "300"]
        type = "background"
        """ + ("""
        [[roles.web.startup_tasks]]
        command = ["sleep", "300"]
        type = "foreground"
        """ if during == "foreground-task" else ""))
    with service.harness() as h:
        h.wait_ready(30)
        h.signal_controller(signal.SIGTERM)
        if during == "on_stop":
            service.wait_probe("on_stop web_IN_0")
        else:
            h.wait_event(lambda e: e["event"] == "waiting_for_foreground_tasks", 30)
        began = time.monotonic()
        h.signal_controller(signal.SIGINT if during == "on_stop" else signal.SIGTERM)
        # At once, measured against what it would else wait for (stop_timeout, the tasks'
        # sleeps), not in seconds of a machine: after the kill, the controller's exit (its
        # standby's release, the sweep, the interpreter's end) is not instant under load.
        assert h.wait_controller_exit(stop_timeout / 5) == 3
        assert time.monotonic() - began < stop_timeout / 5
        h.assert_no_processes()
        assert service.count("on_stop") == 1
        log = (h.run_dir.logs / "controller.log").read_text()
        assert '"event": "task_stopped"' in log  # the background task: ended with its boot
        assert "forced by a second signal (SIG" in h.run_dir.console_log.read_text()


def test_controller_sigkill_leaves_no_process(make_service: MakeService) -> None:
    service = make_service(
        """
        class Role(RoleEntryPoint):
            def on_start(self):
                # a child, and a grandchild that detaches into a session of its own
                self.child = subprocess.Popen(["sleep", "600"])
                subprocess.Popen(["setsid", "sleep", "600"])
                return True
        """,
        instances=2,
    )
    with service.harness() as h:
        h.wait_ready(30)
        assert len(h.processes()) == 1 + 1 + 2 * 3  # controller, standby, 2 x (host + 2)
        began = time.monotonic()
        h.signal_controller(signal.SIGKILL)
        h.wait_controller_exit(10)
        wait_until(lambda: not h.processes(), 5, "every process to be gone",
                   lambda: str([p.cmdline() for p in h.processes()]))
        assert time.monotonic() - began < 2.5


@pytest.mark.parametrize("ending", ["stop", "crash"])
def test_grandchildren_end_with_their_instance(make_service: MakeService, ending: str) -> None:
    service = make_service(
        """
        class Role(RoleEntryPoint):
            def on_start(self):
                subprocess.Popen(["sleep", "600"])
                # double fork + setsid: the grandchild is orphaned at once
                subprocess.Popen(["sh", "-c", "setsid sleep 600 & exit 0"]).wait()
                return True
            def run(self):
                RoleEnvironment.wait_for_stop()
        """,
        service=FAST,
    )
    with service.harness() as h:
        h.wait_ready(30)
        sleeps = {p.pid for p in h.processes() if p.name() == "sleep"}
        assert len(sleeps) == 2
        if ending == "crash":
            h.wait_replaced("web/0", h.kill("web/0"), 30)
        else:
            h.stop()
        # Signalled with their instance's end; a loaded machine lists a killed process
        # until the kernel has run it to act on the signal, so gone within a bound.
        wait_until(lambda: not {p.pid for p in h.processes()} & sleeps, 5,
                   "the ended instance's grandchildren to be gone")


def test_status_check_busy_and_back(make_service: MakeService) -> None:
    service = make_service(
        """
        class Role(RoleEntryPoint):
            def on_start(self):
                RoleEnvironment.on_status_check(self.check)
                return True
            def check(self, status):
                flag = RoleEnvironment.get_setting("probe") + ".busy"
                if os.path.exists(flag):
                    status.busy()
        """,
        role={"status_check_interval": "200ms"},
    )
    with service.harness() as h:
        h.wait_ready(30)
        flag = service.probe.with_name("probe.txt.busy")
        flag.touch()
        row = h.wait_state("web/0", "busy", 10)
        assert row["reason"] == "a status check reported busy"
        flag.unlink()
        h.wait_state("web/0", "ready", 10)


def test_missing_setting_names_the_role_and_known_settings(make_service: MakeService) -> None:
    service = make_service(
        """
        class Role(RoleEntryPoint):
            def on_start(self):
                RoleEnvironment.get_setting("greting")
        """,
        settings={"greeting": "hi"},
        service=FAST,
    )
    with service.harness() as h:
        row = h.wait_state("web/0", "recycling", 30)
        assert row["last_error"] == (
            "on_start: rolehost.environment.SettingNotFound: role 'web' has no setting "
            "'greting' (known settings: greeting, probe)"
        )


def test_a_standby_host_waits_and_is_replaced_when_used(make_service: MakeService) -> None:
    service = make_service(IDLE, service={"backoff_initial": "100ms"})
    with service.harness() as h:
        status = h.wait_ready(30)

        def standbys() -> set[int]:
            hosts = {i["pid"] for i in h.status()["instances"]} | {status["pid"]}
            return {p.pid for p in h.processes() if p.pid not in hosts
                    and "rolehost.host" in p.cmdline()}

        first = wait_until(standbys, 10, "a standby host")
        replaced = h.wait_replaced("web/0", h.kill("web/0"), 30)
        assert replaced["pid"] in first  # the crash was served by the standby
        second = wait_until(standbys, 10, "a new standby host")
        assert not second & first
        for pid in second:  # a standby killed from outside is simply replaced
            os.kill(pid, signal.SIGKILL)
        h.wait_replaced("web/0", h.kill("web/0"), 30)
        assert h.instance("web/0")["restarts"] == 2


def test_the_role_sees_its_app_folder_first_on_sys_path(make_service: MakeService) -> None:
    service = make_service(
        """
        class Role(RoleEntryPoint):
            def on_start(self):
                app = str(RoleEnvironment.app_dir)
                run_dir = os.environ["ROLEHOST_RUN_DIR"]
                probe(f"first={sys.path[0] == app} "
                      f"run_dir={any(p.startswith(run_dir) and p != app for p in sys.path)}")
                return True
        """
    )
    with service.harness() as h:
        h.wait_ready(30)
        assert service.probes() == ["first=True run_dir=False web_IN_0"]


def test_a_status_check_on_demand(make_service: MakeService) -> None:
    service = make_service(
        """
        class Role(RoleEntryPoint):
            def on_start(self):
                RoleEnvironment.on_status_check(self.check)
                return True
            def check(self, status):
                if os.path.exists(RoleEnvironment.get_setting("probe") + ".busy"):
                    status.busy()
        """,
        role={"status_check_interval": "1h"},  # only on demand, within this test
    )
    with service.harness() as h:
        h.wait_ready(30)
        service.probe.with_name("probe.txt.busy").touch()
        h.client.check_status("web/0")
        assert h.wait_state("web/0", "busy", 5)["reason"] == "a status check reported busy"


def test_a_signal_after_the_controllers_stop_does_not_decide_its_exit(
        make_service: MakeService) -> None:
    """Ctrl-C twice on a service that stops fast: the second signal, landing after the
    instances had stopped and while the process exited, found the default action back
    and ended it with 130 or 143. Signals are sent every few milliseconds until it has
    exited: each lands before the stop ended (forced, 3) or after (ignored, 0)."""
    service = make_service(IDLE, instances=2)
    with service.harness() as h:
        h.wait_ready(30)
        assert h.controller is not None
        h.signal_controller(signal.SIGINT)
        for n in range(5000):  # a deadline: 5000 times at most 2 ms
            if h.controller.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                h.signal_controller(signal.SIGTERM if n % 2 else signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                h.controller.wait(0.002)
        assert h.wait_controller_exit(10) in (0, 3)

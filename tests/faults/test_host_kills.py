"""Faults 1-4 and 8: the instance's processes are killed, or escape, at each stage."""

from __future__ import annotations

import json
import os
import signal
import time

from rolehost.testing import wait_until
from support.faults import (
    FAST,
    HANGING_ON_STOP,
    Bystander,
    alive,
    instance_pids,
    role,
    state_events,
    wait_gone,
    wait_pids,
)
from support.roles import IDLE
from support.service import MakeService

# Instance 0 sleeps in its first startup task, the first time only; instance 1 does not.
SLEEPY_SCRIPT = ('if [ "$ROLEHOST_INDEX" = 0 ] && [ ! -e "$ROLEHOST_OS_DIR/slept" ]; '
                 'then touch "$ROLEHOST_OS_DIR/slept"; exec sleep 600; fi')
SLEEPY_TASK = f"""
[[roles.web.startup_tasks]]
command = {json.dumps(["sh", "-c", SLEEPY_SCRIPT])}
"""


def test_sigkill_during_startup_tasks(make_service: MakeService) -> None:
    # There is no host process while the tasks run: the instance's only process is its
    # task, and that is what gets the SIGKILL.
    service = make_service(role(IDLE), instances=2,
                           service=FAST, extra=SLEEPY_TASK)
    with service.harness() as h:
        bystander = Bystander(h)

        def sleeping_task() -> set[int]:
            return {p.pid for p in h.processes() if p.pid in instance_pids(h, "web/0")
                    and p.name() == "sleep"}

        task = wait_until(sleeping_task, 30, "instance 0's task to sleep")
        row = h.instance("web/0")
        assert row["state"] == "bootstrapping" and row["pid"] is None
        assert row["tasks"][0]["state"] == "running"
        for pid in task:
            os.kill(pid, signal.SIGKILL)
        row = h.wait_state("web/0", "ready", 30)  # the next boot's task does not sleep
        assert row["restarts"] == 1
        recycling = state_events(h, "web_IN_0", "recycling")
        assert len(recycling) == 1
        assert str(recycling[0]["reason"]).startswith(
            "startup task 1 (sh -c 'if [ \"$ROLEHOST_INDEX\" = 0 ]")
        assert "killed by SIGKILL" in str(recycling[0]["reason"])
        assert "startup task 1" in row["last_error"] and "killed by SIGKILL" in row["last_error"]
        wait_gone(task)
        bystander.check()


def test_sigkill_during_on_start(make_service: MakeService) -> None:
    service = make_service(role(
        """
        class Role(RoleEntryPoint):
            def on_start(self):
                if faulty() and once("start"):
                    self.child = subprocess.Popen(["sleep", "600"])
                    probe("on_start:hanging")
                    time.sleep(600)
                return True
            def on_stop(self):
                probe("on_stop")
        """), instances=2, service=FAST)
    with service.harness() as h:
        bystander = Bystander(h)
        service.wait_probe("on_start:hanging web_IN_0")
        assert h.instance("web/0")["state"] == "starting"
        old = wait_pids(h, "web/0", 2)  # the host and its child
        row = h.wait_replaced("web/0", h.kill("web/0"), 30)
        assert row["restarts"] == 1 and row["last_error"] == "host killed by SIGKILL"
        (recycling,) = state_events(h, "web_IN_0", "recycling")
        assert recycling["previous"] == "starting"
        assert str(recycling["reason"]).startswith("host killed by SIGKILL; next try in")
        wait_gone(old)
        assert service.count("on_stop") == 0  # a killed host gets no graceful stop
        bystander.check()


def test_sigkill_during_run(make_service: MakeService) -> None:
    service = make_service(role(
        """
        class Role(RoleEntryPoint):
            def on_start(self):
                RoleEnvironment.on_stopping(lambda: probe("stopping"))
                self.child = subprocess.Popen(["sleep", "600"])
                return True
            def run(self):
                probe("run")
                RoleEnvironment.wait_for_stop()
            def on_stop(self):
                probe("on_stop")
        """), instances=2, service=FAST)
    with service.harness() as h:
        bystander = Bystander(h)
        h.wait_state("web/0", "ready", 30)
        service.wait_probe("run web_IN_0")
        old = instance_pids(h, "web/0")
        assert len(old) == 2
        row = h.wait_replaced("web/0", h.kill("web/0"), 30)
        assert row["restarts"] == 1 and row["last_error"] == "host killed by SIGKILL"
        (recycling,) = state_events(h, "web_IN_0", "recycling")
        assert recycling["previous"] == "ready"
        wait_gone(old)
        assert service.count("stopping") == 0 and service.count("on_stop") == 0
        bystander.check()


def test_sigkill_during_on_stop(make_service: MakeService) -> None:
    service = make_service(role(HANGING_ON_STOP), instances=2, service=FAST,
                           role={"stop_timeout": "60s"})
    with service.harness() as h:
        bystander = Bystander(h)
        h.wait_state("web/0", "ready", 30)
        old = instance_pids(h, "web/0")
        h.restart("web/0", wait=False)
        service.wait_probe("on_stop:hanging web_IN_0")
        assert h.instance("web/0")["state"] == "stopping"
        began = time.monotonic()
        row = h.wait_replaced("web/0", h.kill("web/0"), 30)
        assert time.monotonic() - began < 10, "the restart waited for stop_timeout"
        assert row["restarts"] == 1 and row["last_error"] == "host killed by SIGKILL"
        assert row["operation"] is None
        boots = [e for e in h.events() if e["event"] == "boot" and e["instance"] == "web_IN_0"]
        assert [b["kind"] for b in boots] == ["start", "restart"]  # the restart went on
        wait_gone(old)
        bystander.check()


def test_detached_grandchildren_then_crash(make_service: MakeService) -> None:
    service = make_service(role(
        """
        class Role(RoleEntryPoint):
            def run(self):
                if faulty() and once("detach"):
                    # double fork + setsid through a shell, and setsid's own fork
                    subprocess.Popen(["sh", "-c", "setsid sleep 600 & exit 0"]).wait()
                    subprocess.Popen(["setsid", "-f", "sleep", "601"]).wait()
                    # a python double fork: the grandchild leads a session of its own
                    subprocess.Popen([sys.executable, "-c",
                        "import os, time\\n"
                        "if os.fork() == 0:\\n"
                        "    os.setsid()\\n"
                        "    if os.fork() == 0:\\n"
                        "        time.sleep(602)\\n"
                        "    os._exit(0)\\n"]).wait()
                    probe("detached")
                    while not flag("crash"):
                        time.sleep(0.02)
                    raise RuntimeError("crash after detaching")
                RoleEnvironment.wait_for_stop()
        """), instances=2, service=FAST)
    with service.harness() as h:
        bystander = Bystander(h)
        service.wait_probe("detached web_IN_0")
        host = h.instance("web/0")["pid"]
        detached = wait_pids(h, "web/0", 4) - {host}  # three detached grandchildren
        for pid in detached:  # none of them is still the host's descendant
            assert os.getsid(pid) != os.getsid(host)
        (service.probe.parent / "probe.txt.crash").touch()
        row = h.wait_replaced("web/0", host, 30)
        assert row["restarts"] == 1
        assert row["last_error"] == "run: RuntimeError: crash after detaching"
        wait_gone(detached | {host}, what="the detached grandchildren")
        assert not [p for p in detached if alive(p)]
        bystander.check()

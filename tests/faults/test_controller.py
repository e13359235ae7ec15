"""Faults 15b, 15c, 18, 20, 20b and 26: what a killed controller leaves behind; a second
controller on the same run directory; an instance that floods its output; a console that
nobody reads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from rolehost import protocol
from rolehost.client import Client
from rolehost.fabric.memory import MEMORY_EVERY
from rolehost.observability import logs
from rolehost.testing import ServiceHarness, run_dir_processes, wait_until
from support.faults import Bystander, role, timed_status
from support.roles import IDLE
from support.service import MakeService

# A startup task that detaches a child into a session of its own, then hangs.
DETACHES = ("import subprocess, sys, time; "
            "child = subprocess.Popen(['sleep', '300'], start_new_session=True); "
            "open(sys.argv[1], 'w').write(str(child.pid)); time.sleep(300)")


def gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_killed_controller_leftovers_are_swept_at_the_next_start(
        make_service: MakeService, tmp_path: Path) -> None:
    pidfile = tmp_path / "detached.pid"
    service = make_service(role(IDLE), extra=f"""
        [[roles.web.startup_tasks]]
        command = ["python", "-c", "{DETACHES}", "{pidfile}"]
        """)
    with service.harness() as h:
        wait_until(lambda: pidfile.exists() and pidfile.read_text() != "", 30, "the task")
        detached = psutil.Process(int(pidfile.read_text()))
        h.signal_controller(signal.SIGKILL)
        h.wait_controller_exit(10)
        # The task dies with its controller (parent-death signal); what it detached does
        # not: no host runs yet to take the tree down, and its subreaper is gone.
        wait_until(lambda: [p.pid for p in h.processes()] == [detached.pid], 10,
                   "the task to follow the controller", lambda: str(h.processes()))
        pidfile.unlink()
        with ServiceHarness(service.toml, run_dir=h.run_dir.path) as second:
            wait_until(lambda: gone(detached), 10, "the next start to sweep the leftover")
            log = (second.run_dir.logs / "controller.log").read_text()
            swept = [line for line in log.splitlines() if "leftovers_swept" in line]
            assert len(swept) == 1 and f"{detached.pid} sleep 300" in swept[0], swept
            # The instance boots again, as after any start: its task runs again.
            wait_until(pidfile.exists, 30, "the task to run again")
            assert second.instance("web/0")["state"] == "bootstrapping"


def test_a_host_frozen_when_its_controller_was_killed_is_swept_at_the_next_start(
        make_service: MakeService) -> None:
    """A stopped (SIGSTOP) host cannot see its controller go. Its instance variables
    came in `assign`, so its environment as the kernel shows it holds the run directory
    and the channel, not a token: the sweep knows a host by those."""
    service = make_service(role(IDLE))
    with service.harness() as h:
        h.wait_ready(30)
        host = psutil.Process(h.instance("web/0")["pid"])
        host.suspend()
        h.signal_controller(signal.SIGKILL)
        h.wait_controller_exit(10)
        try:
            with ServiceHarness(service.toml, run_dir=h.run_dir.path) as second:
                wait_until(lambda: gone(host), 10, "the next start to sweep the frozen host")
                log = (second.run_dir.logs / "controller.log").read_text()
                swept = [line for line in log.splitlines() if "leftovers_swept" in line]
                assert len(swept) == 1 and f"{host.pid} " in swept[0], swept
                second.wait_ready(30)
        finally:
            if not gone(host):
                host.kill()


def test_a_controller_out_of_descriptors_keeps_its_instances(
        make_service: MakeService) -> None:
    """With no descriptor left, the memory pass's reads of /proc fail (a heartbeat's CPU
    sample did too, when heartbeats took one). An error raised while a host's message is
    handled used to close that host's channel, and the host, seeing its controller gone,
    took itself down (exit 77)."""
    service = make_service(role(IDLE))
    with service.harness() as h:
        h.wait_ready(30)
        host = psutil.Process(h.instance("web/0")["pid"])
        assert h.controller is not None
        controller = psutil.Process(h.controller.pid)
        limits = controller.rlimit(psutil.RLIMIT_NOFILE)
        # A new descriptor takes the lowest free number; under the limit, none is left.
        used = {int(fd) for fd in os.listdir(f"/proc/{controller.pid}/fd")}
        lowest_free = min(set(range(len(used) + 1)) - used)
        controller.rlimit(psutil.RLIMIT_NOFILE, (lowest_free, limits[1]))
        try:  # the host must outlive two heartbeats and a memory pass: watched throughout
            until = time.monotonic() + max(2 * protocol.HEARTBEAT_INTERVAL, MEMORY_EVERY) + 1
            while time.monotonic() < until:
                assert host.is_running() and host.status() != psutil.STATUS_ZOMBIE
                time.sleep(0.1)
        finally:
            controller.rlimit(psutil.RLIMIT_NOFILE, limits)
        row = h.instance("web/0")
        assert (row["state"], row["pid"], row["restarts"]) == ("ready", host.pid, 0), row


def test_second_controller_on_the_same_run_directory(make_service: MakeService) -> None:
    service = make_service(role(IDLE), instances=2)
    with service.harness() as h:
        h.wait_ready(30)
        bystander = Bystander(h, "web/0")
        assert h.controller is not None
        second = subprocess.run(
            [sys.executable, "-m", "rolehost", "start", "-f", str(service.toml),
             "--run-dir", str(h.run_dir.path), "--no-console"],
            capture_output=True, text=True, timeout=30, check=False,
        )
        assert second.returncode == 1, second
        assert second.stderr.strip() == (
            f"rolehost: another controller (pid {h.controller.pid}) is already running on "
            f"{h.run_dir.path}"), second.stderr
        # The first one never noticed: same instances, same socket, same lock.
        bystander.check()
        assert h.status()["pid"] == h.controller.pid
        assert h.run_dir.holder() == h.controller.pid
        assert h.controller.poll() is None


FLOOD = """
class Role(RoleEntryPoint):
    def run(self):
        if not faulty():
            return RoleEnvironment.wait_for_stop()
        line = b"x" * 1023 + b"\\n"
        block = line * 1024  # 1 MiB
        written, began = 0, time.monotonic()
        while not RoleEnvironment.is_stopping:
            os.write(1, block)
            written += len(block)
            # about 100 MB/s: ahead of schedule, wait
            ahead = written / 100e6 - (time.monotonic() - began)
            if ahead > 0:
                time.sleep(ahead)
            if written % (50 * len(block)) == 0:
                with open(RoleEnvironment.get_setting("probe") + ".written", "w") as f:
                    f.write(str(written))
"""


@pytest.mark.slow
def test_output_flood(make_service: MakeService) -> None:
    service = make_service(role(FLOOD), instances=2, role={"stop_timeout": "5s"})
    written = service.probe.parent / "probe.txt.written"
    with service.harness() as h:
        bystander = Bystander(h)
        h.wait_state("web/0", "ready", 30)
        wait_until(written.exists, 10, "the flood to begin")
        assert h.controller is not None
        controller = psutil.Process(h.controller.pid)
        start = int(written.read_text())
        baseline, rss, latencies = controller.memory_info().rss, [], []
        began = time.monotonic()

        def flooded() -> int:
            return int(written.read_text()) - start

        # 5 s, and a volume rather than a rate: the writer's pace is the machine's, but
        # 150 MB is past the four log files' 40 MB whatever it is, and a controller that
        # stopped draining the pipe would hold the writer and never let it get there.
        while time.monotonic() - began < 5 or flooded() < 150e6:
            assert time.monotonic() - began < 60, f"the flood stalled at {flooded()} bytes"
            rss.append(controller.memory_info().rss)
            latencies.append(timed_status(h))
            time.sleep(0.1)
        rate = flooded() / (time.monotonic() - began) / 1e6
        print(f"flood {rate:.0f} MB/s, controller RSS {baseline / 1e6:.0f} MB then up to "
              f"{max(rss) / 1e6:.0f} MB, status max {max(latencies) * 1000:.1f} ms")
        grown = (max(rss) - baseline) / 1e6
        assert grown < 50, f"the controller's RSS grew by {grown:.0f} MB"
        assert max(latencies) < 1.0, f"a status call took {max(latencies) * 1000:.0f} ms"
        log = Path(h.instance("web/0")["log"])
        files = sorted(log.parent.glob(log.name + "*"))
        assert [f.name for f in files] == [log.name + s for s in ("", ".1", ".2", ".3")]
        for f in files:  # one write past the limit at most: rotation happens before one
            assert f.stat().st_size <= logs.MAX_BYTES + 1024 * 1024, f
        bystander.check()


CHATTY = """
class Role(RoleEntryPoint):
    def run(self):
        line = "y" * 199
        while not RoleEnvironment.is_stopping:
            for _ in range(50):
                print(line)
            sys.stdout.flush()
            time.sleep(0.01)  # about 1 MB/s
"""


@pytest.mark.slow
def test_console_nobody_reads(make_service: MakeService, tmp_path: Path) -> None:
    """`rolehost start | less`, left on its first page: the pipe fills, and the console's
    writes block. They block the console's own thread, never the controller."""
    service = make_service(role(CHATTY))
    run_dir = tmp_path / "run"
    controller = subprocess.Popen(
        [sys.executable, "-m", "rolehost", "start", "-f", str(service.toml),
         "--run-dir", str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    client = Client(run_dir / "control.sock", timeout=5)
    log = run_dir / "logs" / "web_IN_0.log"
    try:
        wait_until(lambda: log.exists() and log.stat().st_size > 4 * 1024 * 1024, 30,
                   "4 MB of output: the pipe (64 kB) and the console's backlog are full")
        began, size = time.monotonic(), log.stat().st_size
        # A controller stalled on its console would stay so (nobody reads the pipe): the
        # client's timeout (5 s) fails that, where a bound of a second failed a loaded
        # machine's slow answers.
        while time.monotonic() - began < 2:
            assert client.status()["instances"][0]["state"] == "ready"
            time.sleep(0.1)
        assert log.stat().st_size > size, "instance output stopped reaching the log"
        # The reader comes back: the console resumes and says how much it dropped.
        assert controller.stdout is not None
        seen, deadline = b"", time.monotonic() + 30
        while b"console lines dropped" not in seen:  # the role never stops printing
            assert time.monotonic() < deadline, "no word of the dropped lines"
            seen = seen[-4096:] + controller.stdout.read1(65536)
        client.shutdown()
        rest = controller.communicate(timeout=60)[0]
        assert controller.returncode == 0
        assert rest.splitlines()[-1].endswith(b"controller stopped"), rest[-300:]
    finally:
        if controller.poll() is None:
            controller.kill()
            controller.communicate(timeout=10)
        wait_until(lambda: not run_dir_processes(run_dir), 10, "the service to be gone")

"""Child exits seen without pidfd_open: Linux before 5.3, valgrind, a seccomp profile
that denies it. The controller then sees them on SIGCHLD, with the same semantics: the
exit code, and the tree swept while the exited child is still a zombie."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import structlog

from rolehost.processes import process
from rolehost.testing import run_dir_processes, wait_until
from support.service import MakeService

# Put first on PYTHONPATH, this makes every interpreter of the service (controller,
# hosts) see pidfd_open fail as on a kernel without it. The interpreter has no
# sitecustomize of its own here; if one had, it still runs: this one loads it.
SITECUSTOMIZE = '''
import errno, importlib.machinery, importlib.util, os, sys

def pidfd_open(pid, flags=0):
    raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

os.pidfd_open = pidfd_open

_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _here])
if _spec is not None and _spec.loader is not None:
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
'''

# Each instance's first boot fails in its startup task with 3: a plain exit code, seen
# through the fallback (the task is watched by watch_exit too).
FAILS_ONCE = ('if [ ! -e "$ROLEHOST_OS_DIR/failed-once" ]; '
              'then touch "$ROLEHOST_OS_DIR/failed-once"; exit 3; fi')
EXTRA = f"""
[[roles.web.startup_tasks]]
command = {json.dumps(["sh", "-c", FAILS_ONCE])}
"""
FAST = {"backoff_initial": "100ms", "backoff_max": "800ms"}


@pytest.fixture
def without_pidfd(tmp_path: Path) -> dict[str, str]:
    """The environment of an interpreter whose pidfd_open fails with ENOSYS."""
    folder = tmp_path / "no-pidfd"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH"))
                                         if p)}
    # It is picked up: a child interpreter with this environment cannot open a pidfd.
    probe = subprocess.run(
        [sys.executable, "-c", "import os; os.pidfd_open(os.getpid())"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=30)
    assert probe.returncode == 1 and "Function not implemented" in probe.stderr, probe.stderr
    return env


def _log_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _children(service_probes: list[str]) -> dict[str, int]:
    """The pid of the child each instance's on_start started, by instance id."""
    found = {}
    for line in service_probes:
        event, instance = line.split()
        if event.startswith("child:"):
            found[instance] = int(event.removeprefix("child:"))
    return found


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_controller_without_pidfd(
    make_service: MakeService, without_pidfd: dict[str, str], loop: str
) -> None:
    service = make_service(
        """
        class Role(RoleEntryPoint):
            def on_start(self):
                self.child = subprocess.Popen(["sleep", "600"])
                probe(f"child:{self.child.pid}")
                return True
        """,
        instances=2, service=FAST, extra=EXTRA,
    )
    env = {**without_pidfd, "ROLEHOST_LOOP": loop}  # anything but "asyncio" is uvloop
    with service.harness(env=env) as h:
        rows = {r["id"]: r for r in h.wait_ready(30)["instances"]}
        controller_log = h.run_dir.logs / "controller.log"
        fallback = [e for e in _log_events(controller_log) if e["event"] == "pidfd_unavailable"]
        assert len(fallback) == 1, fallback  # logged once, not once per child
        assert fallback[0]["errno"] == "ENOSYS"
        assert fallback[0]["error"] == "Function not implemented"
        for row in rows.values():  # the task's exit 3 was seen, then the next boot's 0
            assert row["restarts"] == 1
            assert "startup task 1" in row["last_error"]
            assert "exited with 3" in row["last_error"]

        # A host killed with SIGKILL: the exit is seen, with its signal, and its tree swept.
        children = wait_until(lambda: len(c := _children(service.probes())) == 2 and c, 10,
                              "both instances' children")
        killed = h.kill("web/0")
        row = h.wait_replaced("web/0", killed, 30)
        assert row["restarts"] == 2 and row["last_error"] == "host killed by SIGKILL"
        assert h.wait_event(lambda e: e["event"] == "host_exited" and e["pid"] == killed, 10,
                            "host_exited of the killed host")["outcome"] == "killed by SIGKILL"
        wait_until(lambda: not _alive(children["web_IN_0"]), 10, "the killed host's child swept")
        assert h.instance("web/1")["pid"] == rows["web_IN_1"]["pid"]  # untouched
        assert _alive(children["web_IN_1"])
        pids = {p.pid for p in h.processes()}

        # `rolehost stop` ends everything, and sees each host exit with 0.
        stopped = subprocess.run(
            [sys.executable, "-m", "rolehost", "stop", "-f", str(service.toml),
             "--run-dir", str(h.run_dir.path)],
            capture_output=True, text=True, timeout=60)
        assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
        assert h.wait_controller_exit(10) == 0
        assert not run_dir_processes(h.run_dir.path)
        assert not [pid for pid in pids if _alive(pid)]
        events = _log_events(controller_log)
        stops = [e for e in events if e["event"] == "host_exited" and e["outcome"].startswith(
            "exited with 0")]
        assert {e["instance"] for e in stops} >= {"web_IN_0", "web_IN_1"}
        assert not [e for e in events if "Function not implemented" in json.dumps(e)
                    and e["event"] != "pidfd_unavailable"]


# In this process: watch_exit itself, on real children, with pidfd_open refused.


@pytest.fixture
def no_pidfd_here(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(pid: int, flags: int = 0) -> int:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))  # as a seccomp profile would

    monkeypatch.setattr(os, "pidfd_open", refuse)
    monkeypatch.setattr(process, "_pidfd_unavailable", None)
    monkeypatch.setattr(process, "_sigchld_loop", None)
    monkeypatch.setattr(process, "_reap_orphans", False)  # not a subreaper: reap no other
    previous = signal.getsignal(signal.SIGCHLD)
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, previous)
        assert not process._unwatched


def _loops() -> list[Any]:
    import uvloop

    return [pytest.param(asyncio.new_event_loop, id="asyncio"),
            pytest.param(uvloop.new_event_loop, id="uvloop")]


@pytest.mark.parametrize("new_loop", _loops())
@pytest.mark.timeout(60)
def test_watch_exit_without_pidfd(
    no_pidfd_here: None, new_loop: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    kept: list[subprocess.Popen[bytes]] = []  # a Popen collected while running is
    # reaped by the next Popen (subprocess._cleanup): kept, they are watch_exit's alone

    def spawn(script: str) -> int:
        kept.append(subprocess.Popen(["sh", "-c", script]))
        return kept[-1].pid

    async def main() -> None:
        # Exited before it is watched, and before any SIGCHLD handler is installed: its
        # SIGCHLD found nobody, and watch_exit still sees the exit.
        early = spawn("exit 5")
        os.waitid(os.P_PID, early, os.WEXITED | os.WNOWAIT)  # blocks until it exited
        zombies: dict[int, str] = {}

        def before_reap(pid: int) -> Callable[[], Any]:
            async def look() -> None:  # the exited child must still hold its pid
                zombies[pid] = psutil.Process(pid).status()
                assert pid in process._tracked
            return look

        watched = {early: process.watch_exit(early, before_reap(early))}
        # Several at once (SIGCHLDs coalesce), a signal, and one that outlives the others.
        for script in ("exit 0", "exit 1", "exit 77", "kill -TERM $$", "sleep 0.3; exit 9"):
            pid = spawn(script)
            watched[pid] = process.watch_exit(pid, before_reap(pid))
        codes = await asyncio.wait_for(asyncio.gather(*watched.values()), 20)
        assert codes == [5, 0, 1, 77, -signal.SIGTERM, 9]
        assert zombies == dict.fromkeys(watched, psutil.STATUS_ZOMBIE)
        for pid in watched:
            assert pid not in process._tracked
            with pytest.raises(ChildProcessError):  # reaped
                os.waitpid(pid, os.WNOHANG)

    loop = new_loop()
    try:
        with structlog.testing.capture_logs() as logged:
            loop.run_until_complete(main())
    finally:
        loop.close()
    fallback = [e for e in logged if e["event"] == "pidfd_unavailable"]
    assert len(fallback) == 1 and fallback[0]["errno"] == "EPERM", logged

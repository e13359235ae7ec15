"""Who owns a service's processes (issue 19): a start never sweeps a live controller's
hosts, a deleted run directory comes back, and two starts have one winner."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from rolehost.processes import cgroups
from rolehost.testing import ServiceHarness, run_dir_processes, wait_until
from support.cli import rolehost
from support.roles import IDLE
from support.service import MakeService, Service


def _hosts(cwd: Path) -> dict[str, tuple[int, float]]:
    """Each instance's host pid and its start time (a pid alone may be reused)."""
    answer = rolehost("status", "--json", cwd=cwd)
    assert answer.returncode == 0, answer.stderr
    return {i["id"]: (i["pid"], psutil.Process(i["pid"]).create_time())
            for i in json.loads(answer.stdout)["instances"]}


def _all_ready(cwd: Path) -> bool:
    answer = rolehost("status", "--json", cwd=cwd)
    return answer.returncode == 0 and all(
        i["state"] == "ready" for i in json.loads(answer.stdout)["instances"])


def _unchanged(before: dict[str, tuple[int, float]]) -> bool:
    for pid, created in before.values():
        try:
            if psutil.Process(pid).create_time() != created:
                return False
        except psutil.NoSuchProcess:
            return False
    return True


@pytest.fixture
def detached(make_service: MakeService, tmp_path: Path) -> Iterator[int]:
    """A service of two idle instances started with `--detach` in `tmp_path`: the
    controller's pid. Stopped (and anything left killed) at the end."""
    make_service(IDLE, instances=2, role={"stop_timeout": "2s"})
    started = rolehost("start", "--detach", cwd=tmp_path)
    try:
        assert started.returncode == 0, started.stderr
        pid = psutil.Process(json.loads(rolehost("status", "--json", cwd=tmp_path).stdout)["pid"])
        wait_until(lambda: _all_ready(tmp_path), 30, "both instances ready")
        yield pid.pid
    finally:
        rolehost("stop", cwd=tmp_path)
        for proc in run_dir_processes(tmp_path / ".rolehost"):
            proc.kill()


def test_a_deleted_run_directory_is_refused_and_comes_back(detached: int,
                                                           tmp_path: Path) -> None:
    """`rm -rf .rolehost; rolehost start` swept the live hosts of every update domain
    at once: with no lock left, they looked like a dead controller's leftovers. Now the
    hosts name their controller, a start that finds it alive touches nothing and says
    so, and the controller makes its run directory again, manageable as before."""
    run_dir = tmp_path / ".rolehost"
    before = _hosts(tmp_path)
    # Frozen, the controller cannot make its run directory again before the second
    # start looks: that start meets the hosts alone, with no lock and no socket.
    os.kill(detached, signal.SIGSTOP)
    try:
        shutil.rmtree(run_dir)
        again = rolehost("start", "--detach", cwd=tmp_path)
    finally:
        os.kill(detached, signal.SIGCONT)
    assert again.returncode == 1, again.stderr
    assert f"another controller (pid {detached}) is already running" in again.stderr
    assert _unchanged(before)
    # Back within a check or two: the same controller, the same hosts.
    wait_until(lambda: rolehost("status", cwd=tmp_path).returncode == 0, 15,
               "the controller answering again")
    assert _hosts(tmp_path) == before
    events = rolehost("logs", cwd=tmp_path).stdout
    assert "run dir restored" in events
    # Deleted while it runs: it comes back all the same, and a start is refused.
    shutil.rmtree(run_dir)
    wait_until(lambda: rolehost("status", cwd=tmp_path).returncode == 0, 15,
               "the controller answering again")
    refused = rolehost("start", "--detach", cwd=tmp_path)
    assert refused.returncode == 1, refused.stderr
    assert f"(pid {detached})" in refused.stderr
    assert _hosts(tmp_path) == before
    stopped = rolehost("stop", cwd=tmp_path)
    assert stopped.returncode == 0, stopped.stderr
    assert not run_dir_processes(run_dir)


def test_two_detached_starts_have_one_winner(make_service: MakeService,
                                             tmp_path: Path) -> None:
    """Two `rolehost start --detach` at once: both passed the lock check before either
    controller took the lock, and the loser, asking the socket, found the winner there
    and printed "started … (controller pid WINNER)", exit 0. It must say another
    controller runs, and exit 1."""
    make_service(IDLE, role={"stop_timeout": "2s"})
    starts = [subprocess.Popen([sys.executable, "-m", "rolehost", "start", "--detach"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for _ in range(2)]
    try:
        done = [start.communicate(timeout=60) for start in starts]
        codes = sorted(start.returncode for start in starts)
        assert codes == [0, 1], done
        winner = json.loads(rolehost("status", "--json", cwd=tmp_path).stdout)["pid"]
        (out, _), = [d for d, s in zip(done, starts, strict=True) if s.returncode == 0]
        (_, err), = [d for d, s in zip(done, starts, strict=True) if s.returncode == 1]
        assert f"(controller pid {winner}," in out
        assert f"rolehost: another controller (pid {winner}) is already running" in err
        assert "started" not in err
    finally:
        for start in starts:
            if start.poll() is None:
                start.kill()
                start.communicate()
        rolehost("stop", cwd=tmp_path)
        for proc in run_dir_processes(tmp_path / ".rolehost"):
            proc.kill()


# A role whose every boot leaves a daemon as detached as a process can be: a double
# fork, a session of its own, and an exec with an empty environment (no token, no run
# directory). Its pid goes to the probe file: "daemon PID".
DAEMONIZES = """
class Role(RoleEntryPoint):
    def run(self):
        probe_file = RoleEnvironment.get_setting("probe")
        child = os.fork()
        if child == 0:
            os.setsid()
            daemon = os.fork()
            if daemon == 0:
                os.execve("/bin/sleep", ["sleep", "300"], {})
            with open(probe_file, "a") as f:
                f.write(f"daemon {daemon}\\n")
            os._exit(0)
        os.waitpid(child, 0)
        while not RoleEnvironment.wait_for_stop(1):
            pass
"""


def _daemons(service: Service, known: list[psutil.Process]) -> list[psutil.Process]:
    """`known`, and the daemons the probe file names since (each taken while alive)."""
    pids = [int(line.split()[1]) for line in service.probes() if line.startswith("daemon ")]
    return known + [psutil.Process(pid) for pid in pids[len(known):]]


def _cgroup(pid: int) -> Path:
    """The folder of `pid`'s cgroup v2."""
    found = cgroups.unified(pid)
    assert found is not None
    mount, group = found
    return mount / group.lstrip("/")


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("mode", ["cgroups", "subreaper"])
def test_a_detached_daemon_dies_with_its_instance(make_service: MakeService,
                                                  mode: str) -> None:
    """fork, setsid, fork, execve("/bin/sleep", env={}) in `run()`: the daemon survived
    `stop` and a `kill -9` of the controller, and one more piled up at every boot. Where
    cgroup v2 can be written, the host is in its instance's cgroup, killed whole at its
    teardown, and a start ends what a killed controller's cgroups hold. Elsewhere (or
    with ROLEHOST_CGROUPS=off) the controller, its subreaper, ends it at the stop."""
    service = make_service(DAEMONIZES, role={"stop_timeout": "2s"})
    env = {"ROLEHOST_CGROUPS": "off"} if mode == "subreaper" else {}
    daemons: list[psutil.Process] = []
    try:
        with service.harness(env=env) as h:
            h.wait_ready(30)
            unavailable = [e for e in h.events() if e["event"] == "cgroups_unavailable"]
            if mode == "cgroups" and unavailable:
                pytest.skip(f"no cgroups here: {unavailable[0]['reason']}")
            wait_until(lambda: len(_daemons(service, [])) == 1, 30, "the first daemon")
            [first] = daemons = _daemons(service, [])
            # Once it has exec'd, nothing ties it to the instance but its cgroup.
            wait_until(lambda: first.cmdline() == ["sleep", "300"], 10, "the exec")
            assert first.environ() == {}
            group = None
            if mode == "cgroups":
                # The host's cgroup is its own, entered as a standby (a move at `take`
                # would wait for an RCU grace period), and the daemon was born in it;
                # the instance is written on it, since cgroup v2 cannot rename it.
                host = h.instance("web/0")
                group = _cgroup(host["pid"])
                assert group.name == f"host-{host['pid']}"
                assert _cgroup(first.pid) == group
                assert os.getxattr(group, cgroups.INSTANCE_XATTR).decode() == host["id"]
            h.restart("web/0")
            wait_until(lambda: len(_daemons(service, daemons)) == 2, 30, "the second daemon")
            daemons = _daemons(service, daemons)
            if mode == "cgroups":  # killed with its host's cgroup at the teardown
                wait_until(lambda: _gone(first), 10, "the first daemon to go at the restart")
                assert group is not None
                # Removed with its host: none piles up over restarts.
                wait_until(lambda: not group.exists(), 10, "the first host's cgroup to go")
            # A kill -9 of the controller: what its cgroups hold, the next start ends.
            h.signal_controller(signal.SIGKILL)
            h.wait_controller_exit(10)
            with ServiceHarness(service.toml, run_dir=h.run_dir.path, env=env) as second:
                second.wait_ready(30)
                if mode == "cgroups":
                    wait_until(lambda: all(_gone(d) for d in daemons), 10,
                               "the next start to end the killed controller's daemons")
                    swept = second.wait_event(
                        lambda e: e["event"] == "leftover_cgroups_swept", 10)
                    assert len(swept["cgroups"]) == 1
                wait_until(lambda: len(_daemons(service, daemons)) == 3, 30, "the third daemon")
                daemons = _daemons(service, daemons)
            # The harness stopped it (`stop`): the last daemon is gone, cgroups or not.
            assert _gone(daemons[-1])
            if mode == "cgroups":
                assert all(_gone(d) for d in daemons)
                # No cgroup is left of the run directory: rolehost-RUNDIR_HASH is gone.
                assert group is not None and not group.parent.parent.exists()
    finally:
        for daemon in daemons:
            if not _gone(daemon):
                daemon.kill()

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

from rolehost.testing import run_dir_processes, wait_until
from support.cli import rolehost
from support.roles import IDLE
from support.service import MakeService


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

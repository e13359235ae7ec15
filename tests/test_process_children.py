"""Children from /proc/PID/task/*/children: what psutil's scan of every process finds,
without reading every process's stat file (the reaper asks at every SIGCHLD)."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from rolehost import protocol
from rolehost.processes import process
from rolehost.processes.process import _scanned_children, child_pids, descendant_pids
from rolehost.testing import wait_until


def test_children_and_descendants_match_psutils_scan() -> None:
    # A child that starts a grandchild, which starts a great-grandchild; all sleep.
    script = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
              "\"import subprocess, time; subprocess.Popen(['sleep', '30']); time.sleep(30)\"]);"
              " print('up', flush=True); time.sleep(30)")
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE) as child:
        try:
            assert child.stdout is not None and child.stdout.readline() == b"up\n"
            assert child.pid in child_pids()
            assert sorted(child_pids()) == sorted(_scanned_children(None))
            # The great-grandchild may not be up yet: wait for psutil to see both.
            expected = wait_until(lambda: [p.pid for p in psutil.Process(
                child.pid).children(recursive=True)] if len(psutil.Process(
                    child.pid).children(recursive=True)) == 2 else None, 10, "two descendants")
            assert sorted(descendant_pids(child.pid)) == sorted(expected)
        finally:
            for p in psutil.Process(child.pid).children(recursive=True):
                p.kill()
            child.kill()
    assert descendant_pids(child.pid) == []


def test_an_instances_tree_reads_no_tracked_child(monkeypatch: pytest.MonkeyPatch) -> None:
    """`tree_of` looks for a token's orphans among the children that nothing waits for:
    the tracked ones (every instance's host, in a controller) are not read at all. It read
    each child's stat file, and every sweep of a stop of N instances did: O(N^2)."""
    token = "scale-test-token"
    argv = [sys.executable, "-c", "import time; time.sleep(30)"]
    tracked = subprocess.Popen(argv, env={**os.environ, protocol.TOKEN_ENV: token})
    orphan = subprocess.Popen(argv, env={**os.environ, protocol.TOKEN_ENV: f"{token}:h1"})
    other = subprocess.Popen(argv, env={**os.environ, protocol.TOKEN_ENV: "another"})
    read: list[int] = []
    real = process._processes
    monkeypatch.setattr(process, "_processes", lambda pids: read.extend(pids) or real(pids))
    process._tracked.add(tracked.pid)
    try:
        found = {p.pid for p in process.tree_of(None, token)}
        assert found == {orphan.pid}
        assert tracked.pid not in read and {orphan.pid, other.pid} <= set(read)
    finally:
        process._tracked.discard(tracked.pid)
        for child in (tracked, orphan, other):
            child.kill()
            child.wait(10)

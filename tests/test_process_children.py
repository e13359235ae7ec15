"""Children from /proc/PID/task/*/children: what psutil's scan of every process finds,
without reading every process's stat file (the reaper asks at every SIGCHLD)."""

from __future__ import annotations

import subprocess
import sys

import psutil

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

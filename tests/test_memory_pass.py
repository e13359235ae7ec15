"""The memory pass (fabric/memory.py): one read of /proc/PID/stat per process gives each
host's tree RSS and the host's CPU time, which the CPU load takes as its sample instead
of a read per heartbeat (issue 23: most of the idle controller's CPU at 500 instances)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from rolehost.fabric import memory
from rolehost.fabric.usage import CpuLoad
from rolehost.testing import wait_until

# A child that burns a little CPU, then starts a grandchild holding 50 MB; both sleep.
TREE = ("import subprocess, sys, time\n"
        "end = time.process_time() + 0.3\n"
        "while time.process_time() < end: pass\n"
        "subprocess.Popen([sys.executable, '-c', "
        "\"import time; x = 'x' * 50_000_000; print('up', flush=True); time.sleep(30)\"])\n"
        "time.sleep(30)\n")


def test_one_read_per_process_gives_the_trees_rss_and_the_hosts_cpu(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with subprocess.Popen([sys.executable, "-c", TREE]) as child:
        try:
            root = psutil.Process(child.pid)

            def settled() -> bool | None:  # the 50 MB made, and both asleep
                tree = [root, *root.children()]
                return (len(tree) == 2 and tree[1].memory_info().rss > 50 * 2**20 and all(
                    p.status() == psutil.STATUS_SLEEPING for p in tree)) or None

            wait_until(settled, 30, "the grandchild's 50 MB")
            tree = [root, *root.children(recursive=True)]
            rss = sum(p.memory_info().rss for p in tree)
            times = root.cpu_times()

            def no_psutil(*args: object, **kwargs: object) -> None:
                raise AssertionError("psutil's scan: three or four reads per process")

            monkeypatch.setattr(memory.psutil, "process_iter", no_psutil)
            usage = memory.tree_usage([child.pid, 2**22 + 1])  # the second: no such pid
            assert set(usage) == {child.pid}
            assert abs(usage[child.pid].rss - rss) < 2 * 2**20, (usage, rss)
            assert usage[child.pid].rss > 50 * 2**20
            # The host alone (not its grandchild), and whole ticks of it.
            assert abs(usage[child.pid].cpu - (times.user + times.system)) <= 0.02, usage
        finally:
            for p in psutil.Process(child.pid).children(recursive=True):
                p.kill()
            child.kill()


def test_a_load_from_the_pass_samples_needs_no_read_of_its_own(
        monkeypatch: pytest.MonkeyPatch) -> None:
    load = CpuLoad()

    def no_read(pid: int) -> None:
        raise AssertionError("a read of the host's stat file")

    monkeypatch.setattr("rolehost.fabric.usage.psutil.Process", no_read)
    load.record(os.getpid(), 10.0)
    began = time.monotonic()
    wait_until(lambda: time.monotonic() - began > 0.3 or None, 5, "0.3 s")
    load.record(os.getpid(), 10.15)
    figure = load.sample(os.getpid(), fresh_for=6)  # status: the pass's sample is recent
    assert figure is not None and 10 < figure < 50, figure
    load.record(os.getpid() + 1, 1.0)  # another host: its samples only
    assert load.sample(os.getpid() + 1, fresh_for=6) is None

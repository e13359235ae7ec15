"""Ending what a test started outside a harness, and seeing it gone."""

from __future__ import annotations

from pathlib import Path

import psutil

from rolehost.testing import run_dir_processes, wait_until

GONE_WITHIN = 10.0  # a SIGKILL acts at the process's next turn on a CPU: soon, not at once


def end_run_dir(run_dir: Path) -> list[psutil.Process]:
    """SIGKILL every process of `run_dir`, and wait until the kernel has acted on it: a
    killed process stays listed (as sleeping, then as a zombie until reaped) until it
    next runs, which on a loaded machine is a moment later. The processes that were
    found, for a test that expected none."""
    found = run_dir_processes(run_dir)
    for proc in found:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    wait_until(lambda: not run_dir_processes(run_dir), GONE_WITHIN,
               f"the killed processes of {run_dir} to be gone",
               lambda: str([p.pid for p in run_dir_processes(run_dir)]))
    return found

"""Which controller a process was started for, and whether that controller still runs.

Every process a controller starts for its instances (the hosts, the standby among them,
and the startup tasks) carries the controller's identity in its environment:
`ROLEHOST_CONTROLLER=PID:START`, START being the controller's process start time. A pid
alone is no identity: pids are reused. Descendants inherit it unless they drop their
environment, and those are a cgroup's to find (cgroups.py), not a sweep's.

A sweep of an earlier controller's leftovers signals only the processes whose
controller is provably gone: its pid is free, or taken by a process started at another
time. A live one means hands off. A deleted run directory used to look exactly like a
dead controller's (no lock, no socket): the second start swept the live hosts of every
update domain at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil

CONTROLLER_ENV = "ROLEHOST_CONTROLLER"
# psutil reads start times in clock ticks (10 ms) from a boot time it reads in whole
# seconds: the same process gives the same value, a reused pid another one.
_SAME_START = 0.05


class OwnerAlive(RuntimeError):
    """A process that looked left over belongs to a controller that still runs."""

    def __init__(self, pid: int, processes: list[int]) -> None:
        super().__init__(f"controller {pid} still runs processes {processes}")
        self.pid, self.processes = pid, processes


def identity(pid: int | None = None) -> str:
    """The identity of the controller `pid` (this process by default): `PID:START`."""
    proc = psutil.Process(pid or os.getpid())
    return f"{proc.pid}:{proc.create_time():.2f}"


@dataclass(frozen=True)
class Owner:
    """The controller a process names in its environment, and whether it still runs."""

    pid: int
    alive: bool


def owner(environment: dict[str, str]) -> Owner | None:
    """The owner that `environment` (a process's, as /proc shows it) names; None when it
    names none, or garbles it: nothing proves whose that process is."""
    pid_text, _, start_text = environment.get(CONTROLLER_ENV, "").partition(":")
    try:
        pid, start = int(pid_text), float(start_text)
    except ValueError:
        return None
    try:
        proc = psutil.Process(pid)
        alive = (abs(proc.create_time() - start) < _SAME_START
                 and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        alive = False
    except psutil.Error:  # there, but unreadable: not proven gone
        alive = True
    return Owner(pid, alive)

"""Each instance in a cgroup of its own, where cgroup v2 can be written: what a role
starts cannot leave it, whatever it does to its parentage, session or environment.

A role's `run()` that forks, calls setsid, forks again and execs with an empty
environment leaves a process that no parentage, process group or token finds: it is
re-parented to the controller (a child subreaper) and carries nothing of the instance.
It survived `stop` and a `kill -9` of the controller, and one more piled up with every
boot. The kernel's answer, systemd's too, is the cgroup: every host has a cgroup of its
own, which it enters as a standby, before it is given an instance and runs any of the
role's code, so everything the role starts is born there; the host's teardown writes
`cgroup.kill`, which SIGKILLs every process in it at once, and removes it.

Why a cgroup per host, made when the standby is spawned, and not one per instance that
the host enters when it is given the instance: a move into a cgroup waits for an RCU
grace period (6 to 7 ms here), which was a third of a respawn's time. The standby pays
it while nobody waits for it. The cgroup cannot be renamed to the instance's once it is
taken (cgroup v2 refuses rename(2): EPERM), so its instance is written on it instead, in
the extended attribute `user.rolehost.instance`.

The layout, under the controller's own cgroup (the unit's, under systemd):
`rolehost-RUNDIR_HASH/PID-START/host-PID`, PID-START being the controller's identity
(ownership.py) and PID the host's. A start sweeps the `PID-START` folders of its run
directory whose controller is gone: what a `kill -9` of the controller left is ended then.

Where no cgroup v2 hierarchy can be written (no root and no delegation, a container
that does not delegate, cgroup v1 only), nothing here does anything: `Cgroups.usable`
is False and `reason` says why. The controller is still the child subreaper, and at
its stop it ends every process re-parented to it that it did not start (process.py),
so a detached daemon outlives its instance's restarts, but not the controller's stop.
Startup tasks are not moved: their processes are found by their token, as before.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import time
from pathlib import Path

import structlog

from rolehost.processes import ownership

log = structlog.get_logger()

# A cgroup killed is empty within a few scheduler ticks; this bounds the wait for it.
_EMPTY_WITHIN = 2.0
INSTANCE_XATTR = "user.rolehost.instance"  # on a host's cgroup: the instance it was given


def unified(pid: int | None = None) -> tuple[Path, str] | None:
    """The cgroup v2 mount and the cgroup of `pid` (this process's by default) in it, or
    None."""
    mount = None
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as lines:
        for line in lines:
            fields = line.split()
            if " - cgroup2 " in line and len(fields) > 4:
                mount = Path(fields[4])
                break
    if mount is None:
        return None
    with contextlib.suppress(OSError), open(f"/proc/{pid or 'self'}/cgroup") as lines:
        for line in lines:
            if line.startswith("0::"):
                return mount, line[3:].strip()
    return None


class Cgroups:
    """The cgroups of one controller's instances (see the module's docstring)."""

    def __init__(self, run_dir: Path, owner: str) -> None:
        self.run_dir, self.owner = run_dir, owner
        self.service: Path | None = None  # rolehost-RUNDIR_HASH: the run directory's
        self.root: Path | None = None  # PID-START: this controller's
        self.reason = "not opened"

    def open(self) -> bool:
        """Make this controller's cgroup, once its run directory is its own; False, with
        `reason`, where none can be made."""
        if os.environ.get("ROLEHOST_CGROUPS") == "off":
            self.reason = "turned off (ROLEHOST_CGROUPS=off)"
            return False
        found = unified()
        if found is None:
            self.reason = "no cgroup v2 hierarchy is mounted"
            return False
        mount, own = found
        digest = hashlib.sha256(str(self.run_dir).encode()).hexdigest()[:16]
        service = mount / own.lstrip("/") / f"rolehost-{digest}"
        root = service / self.owner.replace(":", "-")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self.reason = f"cannot create a cgroup under {service.parent}: {exc.strerror}"
            return False
        if not (root / "cgroup.kill").exists():  # Linux before 5.14
            with contextlib.suppress(OSError):
                root.rmdir()
            self.reason = "the kernel has no cgroup.kill (Linux 5.14)"
            return False
        self.service, self.root, self.reason = service, root, ""
        return True

    @property
    def usable(self) -> bool:
        return self.root is not None

    def place(self, pid: int) -> Path | None:
        """Move host `pid` into a cgroup of its own; the cgroup, or None where there is
        none (or the move failed: logged). Blocking for a grace period: run it on a worker
        thread, ahead of need."""
        if self.root is None:
            return None
        group = self.root / f"host-{pid}"
        try:
            group.mkdir(exist_ok=True)  # a leftover of a pid reused: ended with this host
            (group / "cgroup.procs").write_text(f"{pid}\n")
        except OSError as exc:
            log.warning("cgroup_move_failed", pid=pid, error=exc.strerror or str(exc))
            with contextlib.suppress(OSError):
                group.rmdir()
            return None
        return group

    def close(self) -> None:
        """End whatever is left in this controller's cgroups and remove them."""
        if self.root is not None:
            remove(self.root)
            with contextlib.suppress(OSError):  # another controller's may be there
                assert self.service is not None
                self.service.rmdir()

    def sweep_dead(self) -> list[str]:
        """End the cgroups of this run directory's controllers that are gone (killed
        with `kill -9`, say), and remove them; their names, for the log. Another run
        directory's are only removed if empty: what they hold is that one's next start's
        to end, not this one's."""
        if self.service is None:
            return []
        swept = []
        for group in sorted(self.service.parent.glob("rolehost-*/*")):
            if not group.is_dir() or group == self.root or _alive(group.name):
                continue
            if group.parent == self.service:
                if _populated(group):
                    swept.append(group.name)
                remove(group)
            elif not _populated(group):
                remove(group)
                with contextlib.suppress(OSError):  # the last one of its run directory
                    group.parent.rmdir()
        return swept


def _alive(name: str) -> bool:
    """Whether the controller of the cgroup `PID-START` still runs."""
    owner = ownership.owner({ownership.CONTROLLER_ENV: name.replace("-", ":", 1)})
    return owner is None or owner.alive  # a name that is not one: not proven gone


def label(group: Path, instance: str) -> None:
    """Write on a host's cgroup the instance it was given (systemd-cgls, ps -o cgroup show
    only `host-PID`). A few microseconds: no grace period, unlike a move."""
    with contextlib.suppress(OSError):  # a kernel before 5.7 has no user xattrs there
        os.setxattr(group, INSTANCE_XATTR, instance.encode())


def kill(group: Path) -> None:
    """SIGKILL every process in `group` (and its descendants' cgroups), at once, and wait
    until it is empty (KILL_GRACE-like bound). Blocking: run it on a worker thread."""
    try:
        (group / "cgroup.kill").write_text("1\n")
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("cgroup_kill_failed", cgroup=str(group), error=exc.strerror)
        return
    deadline = time.monotonic() + _EMPTY_WITHIN
    while _populated(group) and time.monotonic() < deadline:
        time.sleep(0.01)


def _populated(group: Path) -> bool:
    try:
        return "populated 1" in (group / "cgroup.events").read_text()
    except OSError:
        return False


def remove(group: Path) -> None:
    """Kill what is in `group` and remove it, its children first. Blocking: run it on a
    worker thread."""
    kill(group)
    for path in sorted(group.glob("**/"), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            path.rmdir()

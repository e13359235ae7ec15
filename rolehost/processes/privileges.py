"""Who `limited` work runs as: the hosts and the `limited` startup tasks.

A controller that is not root runs everything as its own user; there is nothing to drop.
A controller that runs as root runs limited work as `[service] limited_user` (default
`nobody`), and only `elevated` tasks as root, as the platform runs role code without
administrator rights unless told otherwise.

The limited user must be able to run the interpreter and import rolehost, and to reach
the run directory's `instances/`. `decide` asks it by running the host's import as that
user once, at start. The run directory is then opened to it (0711: it can pass through
but not list; the control socket stays 0600, the logs 0700), and each instance's folders
are given to it. If the user was named and cannot, the start fails with the reason; if it
is the default `nobody` and cannot (an interpreter under a 0700 home, as pyenv puts it),
limited work runs as root and the reason is logged and shown in `status`.

Only a folder that is rolehost's is opened: a `--run-dir` such as /root, which holds
other files, would show their names to every user, so it is refused, whoever the user.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rolehost.fabric.rundir import RunDir
from rolehost.processes import process

DEFAULT_USER = "nobody"
_CAN_REACH = 3  # the probe's exit code when the interpreter runs but the folder is closed
_PROBE = ("import os, sys, rolehost.host; "
          f"sys.exit(0 if os.access(sys.argv[1], os.X_OK) else {_CAN_REACH})")


class Unusable(Exception):
    """The `limited_user` the definition names cannot run the service's hosts, or the
    run directory is not rolehost's to open to it."""


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int

    @classmethod
    def named(cls, name: str) -> User:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise Unusable(f"[service] limited_user: there is no user {name!r} on this "
                           "machine") from None
        return cls(name, entry.pw_uid, entry.pw_gid)

    def spawn_options(self) -> dict[str, Any]:
        """`subprocess.Popen` arguments that start a process as this user, and no group
        of root's: the drop happens in the child between fork and exec."""
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def environment(self, home: Path) -> dict[str, str]:
        """The user's own identity, and a home on the instance's OS disk: root's home is
        closed to it, and tools that write to `~` need one."""
        return {"USER": self.name, "LOGNAME": self.name, "HOME": str(home)}

    def give(self, *paths: Path) -> None:
        for path in paths:
            os.chown(path, self.uid, self.gid, follow_symlinks=False)

    def give_tree(self, root: Path) -> None:
        """Hand over a tree the controller made: from the leaves up, so that the user
        can change no folder (a link in place of a subfolder) before the walk is done
        with it."""
        for folder, dirs, files in os.walk(root, topdown=False):
            self.give(*(Path(folder, name) for name in (*dirs, *files)))
        self.give(root)


@dataclass(frozen=True)
class RunAs:
    """The decision, for the controller's log and `status`."""

    user: User | None  # None: limited work runs as the controller's own user
    reason: str
    degraded: bool = False  # root, and the default user could not be used

    @property
    def name(self) -> str:
        return self.user.name if self.user is not None else pwd.getpwuid(os.geteuid()).pw_name


def decide(limited_user: str | None, run_dir: Path) -> RunAs:
    """Who limited work runs as under a controller using `run_dir`; Unusable if the
    definition names a user that cannot run it."""
    me = pwd.getpwuid(os.geteuid()).pw_name
    if os.geteuid() != 0:
        return RunAs(None, f"the controller runs as {me}, not root: nothing to drop")
    name = limited_user or DEFAULT_USER
    if name == "root":
        return RunAs(None, "[service] limited_user = \"root\": limited work keeps root")
    user = User.named(name)
    if strangers := RunDir(run_dir).strangers():
        # Checked before anything is changed: even a moment at 0711 would show the names.
        shown = ", ".join(strangers[:3]) + (", ..." if len(strangers) > 3 else "")
        raise Unusable(
            f"the limited user {name} must pass through the run directory {run_dir}, and "
            f"rolehost opens to others (0711) no folder it did not make: {run_dir} holds "
            f"{shown}. Give --run-dir a new or empty folder, or set [service] limited_user "
            '= "root" to keep root for everything')
    instances = run_dir / "instances"
    instances.mkdir(parents=True, exist_ok=True)
    for folder in (run_dir, instances):
        os.chmod(folder, 0o711)
    problem = check(user, instances)
    if problem is None:
        return RunAs(user, f"limited work runs as {name}")
    for folder in (run_dir, instances):
        os.chmod(folder, 0o700)
    if limited_user is not None:
        raise Unusable(f"[service] limited_user = {name!r}: {problem}")
    return RunAs(None, f"limited work runs as root: {problem}; set [service] limited_user "
                       "to a user who can", degraded=True)


def check(user: User, instances: Path, python: str = sys.executable) -> str | None:
    """Why `user` cannot run a host on `python` whose folders are under `instances`,
    or None. Refused in a process whose orphan reaper is on: the reaper could reap the
    probe before `subprocess.run` waits for it, so `decide` comes before `adopt_orphans`."""
    if process.reaping_orphans():
        raise RuntimeError("this process reaps orphans: decide who runs limited work first")
    argv = [python, "-P", "-c", _PROBE, str(instances)]
    try:
        done = subprocess.run(argv, cwd="/", capture_output=True, text=True, timeout=60,
                              **user.spawn_options())
    except OSError as exc:
        return f"{user.name} cannot run {python}: {exc.strerror}"
    except subprocess.TimeoutExpired:
        return f"{user.name} could not import rolehost within 60s"
    if done.returncode == 0:
        return None
    if done.returncode == _CAN_REACH:
        return (f"{user.name} cannot reach {instances}: a folder above it is closed to "
                "it; choose a run directory it can pass through (--run-dir)")
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return f"{user.name} cannot run {python} with rolehost: {last}"

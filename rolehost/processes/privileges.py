"""Who `limited` work runs as: the hosts and the `limited` startup tasks.

A controller that is not root runs everything as its own user; there is nothing to drop.
A controller that runs as root runs limited work as `[service] limited_user`: by default
(`"dynamic"`) a user of its own for each role, allocated as systemd's DynamicUser does
(processes/identities.py), so that no role can signal or write another's processes and
folders; a named user runs every role. Only `elevated` tasks run as root, as the
platform runs role code without administrator rights unless told otherwise.

The limited user must be able to run the interpreter and import rolehost, and to reach
the run directory's `instances/`. `decide` asks it by running the host's import as that
user once, at start. The run directory is then opened to it (0711: it can pass through
but not list; the control socket stays 0600, the logs 0700), and each instance's folders
are given to it. If the user was named and cannot, the start fails with the reason; if it
is the default and cannot (an interpreter under a 0700 home, as pyenv puts it, is closed
to every user but its owner), limited work runs as `nobody`, or as root if that cannot
either, and the reason is logged and shown in `status`.

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

from rolehost.fabric.rundir import RunDir
from rolehost.processes import process
from rolehost.processes.identities import Identities
from rolehost.processes.users import Unusable as Unusable
from rolehost.processes.users import User as User

DEFAULT_USER = "nobody"
_CAN_REACH = 3  # the probe's exit code when the interpreter runs but the folder is closed
_PROBE = ("import os, sys, rolehost.host; "
          f"sys.exit(0 if os.access(sys.argv[1], os.X_OK) else {_CAN_REACH})")


DYNAMIC = "dynamic"  # a user of its own for each role (processes/identities.py)


@dataclass(frozen=True)
class RunAs:
    """The decision, for the controller's log and `status`."""

    user: User | None  # None: limited work runs as the controller's own user
    reason: str
    degraded: bool = False  # the default could not be used: nobody, or root, instead
    identities: Identities | None = None  # a user of its own for each role

    @property
    def name(self) -> str:
        if self.identities is not None:
            return DYNAMIC
        return self.user.name if self.user is not None else pwd.getpwuid(os.geteuid()).pw_name

    def user_of(self, role: str) -> User | None:
        """Who role `role`'s hosts and limited tasks run as (None: the controller's user)."""
        return self.identities.user_of(role) if self.identities is not None else self.user


def decide(limited_user: str | None, run_dir: Path) -> RunAs:
    """Who limited work runs as under a controller using `run_dir`; Unusable if the
    definition names a user that cannot run it. By default each role gets a user of its
    own; if those cannot run the hosts, every role runs as `nobody`; if it cannot either,
    as root (degraded, with the reasons)."""
    me = pwd.getpwuid(os.geteuid()).pw_name
    if os.geteuid() != 0:
        return RunAs(None, f"the controller runs as {me}, not root: nothing to drop")
    name = limited_user or DYNAMIC
    if name == "root":
        return RunAs(None, "[service] limited_user = \"root\": limited work keeps root")
    if strangers := RunDir(run_dir).strangers():
        # Checked before anything is changed: even a moment at 0711 would show the names.
        shown = ", ".join(strangers[:3]) + (", ..." if len(strangers) > 3 else "")
        who = "each role's user" if name == DYNAMIC else f"the limited user {name}"
        raise Unusable(
            f"{who} must pass through the run directory {run_dir}, and "
            f"rolehost opens to others (0711) no folder it did not make: {run_dir} holds "
            f"{shown}. Give --run-dir a new or empty folder, or set [service] limited_user "
            '= "root" to keep root for everything')
    instances = run_dir / "instances"
    instances.mkdir(parents=True, exist_ok=True)
    for folder in (run_dir, instances):
        os.chmod(folder, 0o711)
    problems = []
    if name == DYNAMIC:
        identities = Identities(run_dir)
        # Every allocated uid is one of "others" to the file system: one probe speaks for all.
        problem = check(identities.user_of(""), instances)
        if problem is None:
            return RunAs(None, "limited work runs as a user of its own for each role",
                         identities=identities)
        problems.append(problem)
    if name != DYNAMIC or limited_user is None:
        user = User.named(name if name != DYNAMIC else DEFAULT_USER)
        problem = check(user, instances)
        if problem is None:
            shared = f"; roles are not isolated from each other: {problems[0]}" \
                if problems else ""
            return RunAs(user, f"limited work runs as {user.name}{shared}",
                         degraded=bool(problems))
        problems.append(problem)
    for folder in (run_dir, instances):
        os.chmod(folder, 0o700)
    if limited_user is not None:
        raise Unusable(f"[service] limited_user = {name!r}: {'; '.join(problems)}")
    return RunAs(None, f"limited work runs as root: {'; '.join(problems)}; set [service] "
                       "limited_user to a user who can", degraded=True)


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

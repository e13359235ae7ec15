"""A systemd unit that runs `rolehost start` with the notify protocol (`Type=notify`).

systemd then knows the service is up once every role has a ready instance (READY=1),
shows the instance counts (STATUS=), restarts a controller that hangs (WatchdogSec) or
fails, and stops it with SIGTERM: the graceful stop of every instance, bounded by the
roles' stop_timeout and drain_timeout, before systemd's own SIGKILL.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rolehost.definition import Definition
from rolehost.fabric import descriptors

WATCHDOG_SECONDS = 30
MARGIN = 30  # seconds on top of rolehost's own deadlines before systemd steps in


def unit(definition: Definition, file: Path) -> str:
    file = file.resolve()
    longest_stop = max(
        (role.stop_timeout + max((e.drain_timeout for e in role.endpoints.values()), default=0))
        for role in definition.roles.values()
    )
    return "\n".join([
        "[Unit]",
        f"Description=rolehost service {definition.service.name}",
        "After=network.target",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"WorkingDirectory={_escape(str(file.parent))}",
        "ExecStart=" + " ".join(_quote(a) for a in (
            sys.executable, "-m", "rolehost", "start", "-f", str(file), "--no-console")),
        # The graceful stop first: `rolehost stop` returns once the controller has
        # stopped every instance and exited. Only then does systemd signal what is left
        # in the unit's cgroup, sub-cgroups included: a daemon a role detached, a
        # killed controller's hosts. The controller puts each host in a cgroup of
        # its own under the unit's, which Delegate=yes lets it create (cgroups.py).
        # "-": its exit code is not the unit's (1 when the controller had died already,
        # 3 when the stop was cut short: the controller's own exit says that).
        "ExecStop=-" + " ".join(_quote(a) for a in (
            sys.executable, "-m", "rolehost", "stop", "-f", str(file))),
        "KillMode=control-group",
        "Delegate=yes",
        f"TimeoutStartSec={int(definition.service.ready_deadline) + MARGIN}",
        f"TimeoutStopSec={int(longest_stop) + MARGIN}",
        f"WatchdogSec={WATCHDOG_SECONDS}",
        "Restart=on-failure",
        # 2: the definition is wrong; starting it again will not help.
        "RestartPreventExitStatus=2",
        # 3: stopped as asked, but an on_stop was cut short (or a second signal forced
        # the stop). A stop, not a failure: neither restarted after `rolehost stop` nor
        # a failed unit after `systemctl stop`; the journal says what was cut short.
        "SuccessExitStatus=3",
        # Descriptors: systemd's default soft limit, 1024, is for programs that use
        # select(); idle connections would exhaust it (fabric/descriptors.py).
        f"LimitNOFILE={descriptors.unit_limit(definition)}",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ])


def _escape(value: str) -> str:
    """`value` with systemd's specifiers (`%h`, ...) taken literally."""
    return value.replace("%", "%%")


def _quote(argument: str) -> str:
    """One argument of a command line as systemd splits them: quoted when it holds white
    space or quotes (a folder called `my service`), specifiers and variables (`$`)
    escaped either way."""
    escaped = _escape(argument).replace("$", "$$")
    if argument and not any(c.isspace() or c in "\"'\\;" for c in argument):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'

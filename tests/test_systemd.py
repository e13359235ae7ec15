"""systemd: the notify protocol against a fake NOTIFY_SOCKET, and the exported unit."""

from __future__ import annotations

import configparser
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.roles import IDLE
from support.service import MakeService


def test_notify_ready_status_watchdog_stopping(make_service: MakeService, tmp_path: Path) -> None:
    service = make_service(IDLE, instances=2)
    path = tmp_path / "notify.sock"
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(path))
    systemd.settimeout(10)
    received: list[str] = []

    def until(field: str, since: int = 0) -> None:
        deadline = time.monotonic() + 20
        while not any(field in message for message in received[since:]):
            assert time.monotonic() < deadline, f"no {field} in {received}"
            received.append(systemd.recv(4096).decode())

    with service.harness(env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"}) as h:
        until("READY=1")
        ready = next(m for m in received if "READY=1" in m)
        assert "STATUS=web " in ready and "/2 ready" in ready
        until("WATCHDOG=1")
        h.wait_ready(30)
        until("STATUS=web 2/2 ready")
        h.stop()
        until("STOPPING=1")
        stopping = next(i for i, m in enumerate(received) if "STOPPING=1" in m)
        until("0/2 ready", stopping)  # the counts still fall as the instances stop
    systemd.close()
    assert sum("READY=1" in m for m in received) == 1  # once, not at every change
    # `systemctl status` shows the last STATUS: it said "web 0/2 ready", as if the
    # service were up and failing, when it was stopping as asked.
    after = received[stopping:]
    statuses = [line for m in after for line in m.splitlines() if line.startswith("STATUS=")]
    assert statuses[0] == "STATUS=stopping" and len(statuses) > 1
    assert all(s.startswith("STATUS=stopping") for s in statuses), statuses
    assert statuses[-1] == "STATUS=stopping: web 0/2 ready"


def test_notify_says_stopping_and_never_ready_once_stopping(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop during startup: the counts that follow STOPPING=1 must not read as READY."""
    from rolehost.observability.notify import Notifier

    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(path))
        systemd.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        notifier = Notifier()
        notifier.counts({"web": (0, 2)})
        assert systemd.recv(4096) == b"STATUS=web 0/2 ready"
        notifier.stopping()
        assert systemd.recv(4096) == b"STOPPING=1\nSTATUS=stopping"
        notifier.counts({"web": (1, 2)})
        assert systemd.recv(4096) == b"STATUS=stopping: web 1/2 ready"
        notifier.counts({"web": (1, 2)})  # unchanged: nothing sent
        notifier.counts({"web": (0, 2)})
        assert systemd.recv(4096) == b"STATUS=stopping: web 0/2 ready"


def test_export_systemd_unit(tmp_path: Path) -> None:
    hello = Path(__file__).parent.parent / "samples" / "hello" / "rolehost.toml"
    done = subprocess.run([sys.executable, "-m", "rolehost", "export", "systemd", "-f", str(hello),
                           "-o", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    unit = configparser.ConfigParser(interpolation=None)
    unit.read(tmp_path / "rolehost-hello.service")
    service = unit["Service"]
    assert service["Type"] == "notify"
    # The graceful stop, then whatever is left in the unit's cgroups: a detached daemon
    # of a role, in its instance's cgroup, which Delegate=yes lets the controller make.
    assert service["ExecStop"] == f"-{sys.executable} -m rolehost stop -f {hello.resolve()}"
    assert service["KillMode"] == "control-group" and service["Delegate"] == "yes"
    assert service["ExecStart"] == (f"{sys.executable} -m rolehost start -f {hello.resolve()} "
                                    "--no-console")
    assert service["TimeoutStartSec"] == str(1800 + 30)  # ready_deadline (30 m) + margin
    assert service["TimeoutStopSec"] == str(30 + 30)  # the role's stop_timeout + margin
    assert service["RestartPreventExitStatus"] == "2"
    # A stop cut short (3) is a stop: not restarted by Restart=on-failure when asked for
    # by `rolehost stop`, and no failed unit after `systemctl stop`.
    assert service["SuccessExitStatus"] == "3"
    # Room for idle connections: systemd's default soft limit (1024) is not enough.
    assert service["LimitNOFILE"] == "65536"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_export_systemd_refuses_a_name_too_long_for_a_file(tmp_path: Path) -> None:
    # 300 characters: the unit's file name was too long, and the export a traceback.
    name = "s" * 300
    (tmp_path / "rolehost.toml").write_text(
        f'[service]\nname = "{name}"\n[roles.web]\nentry_point = "app:Web"\n')
    done = subprocess.run([sys.executable, "-m", "rolehost", "export", "systemd", "-f",
                           str(tmp_path / "rolehost.toml"), "-o", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "rolehost.toml: service.name: expected a string of at most 63 characters" in (
        done.stderr)
    assert "Traceback" not in done.stderr


def test_export_systemd_quotes_paths_systemd_would_split(tmp_path: Path) -> None:
    """A folder with a space, `%` and `$` in its name: systemd splits ExecStart at white
    space and expands `%` specifiers and `$` variables, so each is quoted or escaped."""
    folder = tmp_path / "my service" / "100% $HOME"
    folder.mkdir(parents=True)
    (folder / "rolehost.toml").write_text(
        '[service]\nname = "odd"\n[roles.web]\nentry_point = "app:Web"\n')
    (folder / "app.py").write_text(
        "from rolehost import RoleEntryPoint\nclass Web(RoleEntryPoint): pass\n")
    done = subprocess.run([sys.executable, "-m", "rolehost", "export", "systemd", "-f",
                           str(folder / "rolehost.toml"), "-o", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    unit = configparser.ConfigParser(interpolation=None)
    unit.read(tmp_path / "rolehost-odd.service")
    service = unit["Service"]
    assert service["WorkingDirectory"] == str(folder).replace("%", "%%")
    # systemd's splitting, approximated: double quotes, backslash escapes, then %% and $$
    argv = [a.replace("%%", "%").replace("$$", "$") for a in shlex.split(service["ExecStart"])]
    assert argv[-3:] == ["-f", str(folder / "rolehost.toml"), "--no-console"]
